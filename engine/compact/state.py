"""The compaction's record in its run's ``gc_runs.cursor``: names, phase and counts.

Written in the transaction of every change it describes, so a run killed at any instant leaves
a record that says exactly what exists: :mod:`engine.compact.recover` reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from psycopg import sql
from psycopg.types.json import Jsonb

from engine.config import TableSpec
from engine.db import Connection, one_row

Phase = Literal["planned", "capture", "copied", "indexed", "swapped", "undoing", "done", "undone",
                "unswapped", "kept"]
BEFORE_SWAP: tuple[Phase, ...] = ("planned", "capture", "copied", "indexed")
AFTER_SWAP: tuple[Phase, ...] = ("swapped", "undoing")
"""``undoing``: the verification failed; from then on the old table takes the new one's changes
back (:mod:`engine.compact.unswap`) and is never verified again. ``unswapped``: it is back."""
TRIGGER = "msggc_compact_capture"
TRUNCATED = "msggc_compact_truncated"
"""The capture triggers' names on the application's table (never carried to the new one)."""


@dataclass
class Compaction:
    """One compaction of ``schema.name`` by run ``run_id``; the other tables live beside it."""

    run_id: int
    schema: str
    name: str
    key: list[str]
    garbage: str
    """The garbage predicate as SQL text rendered by this run (its cutoff a parameter)."""
    cutoff: str | None
    never_null: bool = False
    """The garbage predicate is never NULL (the processed column alone, no ``--where``): its
    negation is ``NOT (garbage)``, which an index on the column answers
    (:func:`engine.compact.copy.live_rows`)."""
    phase: Phase = "planned"
    """``planned`` is recorded as the run starts, before anything is built."""
    live: int = 0
    """Rows in the new table: the copy's, plus inserted minus deleted by every catch-up round."""
    archive: bool = False
    validate: list[str] = field(default_factory=list)
    """Outgoing foreign keys added ``NOT VALID`` to validate once swapped (valid on the old)."""
    swap_ms: float | None = None
    """How long the swap's transaction held the table's lock, from the lock granted to the commit."""
    parent: list[str] | None = None
    """A leaf's parent (schema, name): swapped by DETACH and ATTACH with ``bound``."""
    bound: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    """How long each phase took so far, by name."""
    indexes: list[list[str]] = field(default_factory=list)
    """``[old name, new name]`` of each index of the table, built on the new one under a name of
    its own and given the old one's at the swap."""
    triggers: dict[str, str] = field(default_factory=dict)
    """A swap being undone: the old table's own triggers (name -> ``tgenabled``), disabled while
    the application's changes are taken back into it (they fired on the new table already) and
    enabled as they were once it is back."""

    @property
    def table(self) -> TableSpec:
        return TableSpec(name=self.name, schema=self.schema)

    @property
    def new(self) -> TableSpec:
        return TableSpec(name=f"msggc_new_{self.run_id}", schema=self.schema)

    @property
    def log(self) -> TableSpec:
        return TableSpec(name=f"msggc_log_{self.run_id}", schema=self.schema)

    @property
    def old(self) -> TableSpec:
        """The application's table once swapped out: frozen, then dropped or kept as the archive."""
        return TableSpec(name=f"msggc_old_{self.run_id}", schema=self.schema)

    @property
    def function(self) -> tuple[str, str]:
        return (self.schema, f"msggc_capture_{self.run_id}")

    @property
    def predicate(self) -> sql.Composable:
        return sql.SQL(self.garbage)  # this run's own rendering of the checked predicate

    @property
    def prefix(self) -> str:
        """What the old table's indexes and sequences are renamed to at the swap (plus a number)."""
        return f"msggc_{self.run_id}_old"

    @property
    def params(self) -> dict[str, object]:
        return {"cutoff": self.cutoff}

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """The phase's seconds into :attr:`seconds` (recorded with the next save)."""
        began = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] = round(time.monotonic() - began, 3)


def names_of(conn: Connection, oid: int) -> tuple[str, str]:
    """The table's schema and name, as the catalog spells them now."""
    schema, name = one_row(conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                                        " ON n.oid = c.relnamespace WHERE c.oid = %s", (oid,)))
    return schema, name


def save(conn: Connection, compaction: Compaction) -> None:
    """Record where the compaction stands (inside the transaction of the change it describes)."""
    conn.execute("UPDATE gc_runs SET cursor = jsonb_set(coalesce(cursor, '{}'), '{compact}', %s),"
                 " heartbeat_at = now() WHERE id = %s", (Jsonb(asdict(compaction)), compaction.run_id))


def unfinished(conn: Connection, schema: str, name: str) -> list[Compaction]:
    """Every compaction of this table that a run started and did not see through: its phase
    says so, or its run was killed after the last phase and before its own close."""
    rows = conn.execute(
        "SELECT cursor -> 'compact' FROM gc_runs WHERE cursor ? 'compact'"
        " AND (cursor #>> '{compact,phase}' NOT IN ('done', 'undone', 'unswapped', 'kept')"
        "      OR status = 'running')"
        " AND cursor #>> '{compact,schema}' = %s AND cursor #>> '{compact,name}' = %s ORDER BY id",
        (schema, name)).fetchall()
    return [_loaded(record) for (record,) in rows]


def load(conn: Connection, run_id: int) -> Compaction | None:
    row = conn.execute("SELECT cursor -> 'compact' FROM gc_runs WHERE id = %s AND cursor ? 'compact'",
                       (run_id,)).fetchone()
    return _loaded(row[0]) if row else None


def _loaded(record: dict[str, Any]) -> Compaction:
    return Compaction(**record)
