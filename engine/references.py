"""Foreign keys that point at the collected table: the application's rules, kept, never broken.

A garbage row that a child row still references is the application's business: under NO ACTION
or RESTRICT it stays, and is counted, unless the operator asks for the dependents to go first
(``--delete-dependents``); under CASCADE, SET NULL or SET DEFAULT PostgreSQL changes the child rows
itself, and msggc counts them (and with ``--archive`` keeps a copy of those it deletes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import TableSpec
from engine.db import Connection

Action = Literal["no action", "restrict", "cascade", "set null", "set default"]
ACTIONS: dict[str, Action] = {"a": "no action", "r": "restrict", "c": "cascade", "n": "set null",
                              "d": "set default"}


@dataclass(frozen=True)
class Reference:
    """One foreign key of a child table onto the collected table."""

    name: str
    child: TableSpec
    child_oid: int
    child_columns: tuple[str, ...]
    parent_columns: tuple[str, ...]
    action: Action
    child_partitioned: bool = False
    """Its changes are counted on the child's leaves, not on the child itself."""

    @property
    def blocks(self) -> bool:
        """A referenced parent row cannot be deleted while the child row exists."""
        return self.action in ("no action", "restrict")

    @property
    def removes_children(self) -> bool:
        return self.action == "cascade"

    def effect(self, delete_dependents: bool) -> str:
        """What a run does about this key's rows: the count it reports is of rows ``kept`` (the
        garbage parents), else of child rows ``deleted``, ``cascaded``, ``set null``/``default``."""
        if self.blocks:
            return "deleted" if delete_dependents else "kept"
        return "cascaded" if self.removes_children else self.action

    def report(self, rows: int, delete_dependents: bool) -> dict[str, str | int]:
        return {"child": self.child.qualified, "action": self.action,
                "effect": self.effect(delete_dependents), "rows": rows}

    def describe(self) -> str:
        return (f"{self.name}: {self.child.qualified} ({', '.join(self.child_columns)})"
                f" ON DELETE {self.action.upper()}")


ROOT_NAME = (
    "(WITH RECURSIVE up(parent, name) AS (SELECT c.conparentid, c.conname::text UNION ALL"
    " SELECT p.conparentid, p.conname::text FROM up JOIN pg_constraint p ON p.oid = up.parent)"
    " SELECT name FROM up WHERE parent = 0)"
)
"""A foreign key onto a partitioned table is cloned onto each leaf: named by the one declared."""


def referencing(conn: Connection, oid: int) -> tuple[Reference, ...]:
    """Every foreign key onto the table, from any schema (and the table itself), by name."""
    rows = conn.execute(
        "SELECT " + ROOT_NAME + ", n.nspname, cl.relname, c.conrelid::int8, c.confdeltype::text,"
        " ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, i)"
        "       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum ORDER BY k.i),"
        " ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY AS k(attnum, i)"
        "       JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum ORDER BY k.i)"
        ", cl.relkind = 'p'"
        " FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid"
        " JOIN pg_namespace n ON n.oid = cl.relnamespace"
        " WHERE c.contype = 'f' AND c.confrelid = %s ORDER BY c.conname",
        (oid,),
    ).fetchall()
    return tuple(
        Reference(name, TableSpec(name=table, schema=schema), child_oid, tuple(child), tuple(parent),
                  ACTIONS[kind], partitioned)
        for name, schema, table, child_oid, kind, child, parent, partitioned in rows
    )
