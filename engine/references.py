"""Foreign keys that point at the collected table: the application's rules, kept, never broken.

A garbage row that a child row still references is the application's business: under NO ACTION
or RESTRICT it stays, and is counted, unless the operator asks for the dependents to go first
(``--delete-dependents``); under CASCADE, SET NULL or SET DEFAULT PostgreSQL changes the child rows
itself, and msggc counts them (and with ``--archive`` keeps a copy of those it deletes).

A key of the table onto itself (a reply onto the message it answers) is different: its child rows
are rows of the table, garbage only by the predicate. Whatever the flags, such a key holds its
parent like NO ACTION without ``--delete-dependents``: a garbage row that a row staying in the
table descends from stays, and is counted; a garbage row goes only with its whole subtree, every
row of it garbage (see :meth:`engine.queries.Statements.delete_range`).
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
    self_referencing: bool = False
    """The child is the table itself (or, for a partition, its partitioned table or a partition of
    it): the child rows are rows of the table, never deleted as dependents."""
    indexed: bool = True
    """An index of the child leads with the referencing columns; without one, PostgreSQL's check
    (or cascade) for each deleted parent row reads the whole child table."""

    @property
    def blocks(self) -> bool:
        """A referenced parent row is not deleted while the child row stays (a self-reference
        always: its child is a row of the table, see :data:`SAFE_SELF_ACTIONS`)."""
        return self.self_referencing or self.action in ("no action", "restrict")

    @property
    def removes_children(self) -> bool:
        return self.action == "cascade" and not self.self_referencing

    def deletes_dependents(self, delete_dependents: bool) -> bool:
        """``--delete-dependents`` deletes this key's child rows first (never rows of the table)."""
        return delete_dependents and self.blocks and not self.self_referencing

    def effect(self, delete_dependents: bool) -> str:
        """What a run does about this key's rows: the count it reports is of rows ``kept`` (the
        garbage parents), else of child rows ``deleted``, ``cascaded``, ``set null``/``default``."""
        if self.blocks:
            return "deleted" if self.deletes_dependents(delete_dependents) else "kept"
        return "cascaded" if self.removes_children else self.action

    @property
    def missing_index(self) -> str | None:
        """Why its deletes are slow, when they are: said in the dry run and in the result."""
        if self.indexed:
            return None
        return (f"foreign key {self.name} has no index on ({', '.join(self.child_columns)}):"
                f" each deleted row scans {self.child.qualified}")

    def report(self, rows: int, delete_dependents: bool) -> dict[str, str | int]:
        reported: dict[str, str | int] = {
            "child": self.child.qualified, "action": self.action,
            "effect": self.effect(delete_dependents), "rows": rows}
        if (missing := self.missing_index) is not None:
            reported["no_index"] = missing
        return reported

    def describe(self) -> str:
        return (f"{self.name}: {self.child.qualified} ({', '.join(self.child_columns)})"
                f" ON DELETE {self.action.upper()}")


SAFE_SELF_ACTIONS = ("no action", "restrict")
"""The actions of a key onto the table itself that a run accepts. Under CASCADE, SET NULL or SET
DEFAULT, deleting a garbage row changes the rows that reference it, rows of the table itself, and
one that the application inserts (or un-processes) after the DELETE's snapshot and before its row
lock would be deleted or altered with it: no statement can rule that out, so such a table is
refused. Under NO ACTION or RESTRICT, PostgreSQL itself refuses to leave such a row dangling."""

ROOT_NAME = (
    "(WITH RECURSIVE up(parent, name) AS (SELECT c.conparentid, c.conname::text UNION ALL"
    " SELECT p.conparentid, p.conname::text FROM up JOIN pg_constraint p ON p.oid = up.parent)"
    " SELECT name FROM up WHERE parent = 0)"
)
"""A foreign key onto a partitioned table is cloned onto each leaf: named by the one declared."""

UNCLONED_ONTO_LEAF = (
    " OR (c.conparentid = 0 AND c.confrelid <> %(oid)s"
    "     AND c.confrelid IN (SELECT relid FROM pg_partition_ancestors(%(oid)s))"
    "     AND NOT EXISTS (WITH RECURSIVE up(id) AS ("
    "       SELECT d.conparentid FROM pg_constraint d WHERE d.contype = 'f' AND d.confrelid = %(oid)s"
    "       UNION ALL SELECT p.conparentid FROM pg_constraint p JOIN up ON p.oid = up.id)"
    "     SELECT 1 FROM up WHERE up.id = c.oid))"
)
"""A key declared onto a partitioned table that has no clone onto this leaf of it. PostgreSQL
before 13.21, 14.18, 15.13, 16.9 and 17.5 made none for a key of a partitioned table onto itself
(and a key made then stays so after the upgrade until it is created again): the server does not
check a delete from the leaf against it, so msggc must know it to keep the leaf's referenced rows.
Measured on 16.2: without this, a run deleted the garbage parents of live replies."""


def referencing(conn: Connection, oid: int) -> tuple[Reference, ...]:
    """Every foreign key onto the table, from any schema (and the table itself), by name, with
    whether it is a key of the table onto itself and whether an index serves its checks; for a
    leaf, also the keys onto its partitioned table that the server failed to clone onto it."""
    rows = conn.execute(
        "SELECT " + ROOT_NAME + ", n.nspname, cl.relname, c.conrelid::int8, c.confdeltype::text,"
        " ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, i)"
        "       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum ORDER BY k.i),"
        " ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY AS k(attnum, i)"
        "       JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum ORDER BY k.i)"
        ", cl.relkind = 'p',"
        " c.conrelid = c.confrelid OR c.conrelid IN"
        "  (SELECT relid FROM pg_partition_tree(pg_partition_root(c.confrelid))),"
        " EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid AND i.indisvalid"
        "  AND i.indpred IS NULL AND i.indnkeyatts >= cardinality(c.conkey)"
        "  AND (SELECT bool_and(i.indkey[s] = ANY (c.conkey))"
        "       FROM generate_series(0, cardinality(c.conkey) - 1) AS s))"
        " FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid"
        " JOIN pg_namespace n ON n.oid = cl.relnamespace"
        " WHERE c.contype = 'f' AND (c.confrelid = %(oid)s" + UNCLONED_ONTO_LEAF + ")"
        # not a partition's copy of its partitioned table's key (the key onto this table is that one)
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint p"
        "                 WHERE p.oid = c.conparentid AND p.confrelid = c.confrelid)"
        " ORDER BY c.conname",
        {"oid": oid},
    ).fetchall()
    return tuple(
        Reference(name, TableSpec(name=table, schema=schema), child_oid, tuple(child), tuple(parent),
                  ACTIONS[kind], partitioned, self_referencing, indexed)
        for name, schema, table, child_oid, kind, child, parent, partitioned, self_referencing, indexed
        in rows
    )
