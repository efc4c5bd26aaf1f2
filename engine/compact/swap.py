"""The swap: one short transaction under ``lock_timeout`` that puts the new table in the old
one's place, tried again with backoff (a catch-up round between tries keeps the log short).

Under the table's ACCESS EXCLUSIVE lock nobody writes: the last logged keys are synced, the
capture trigger goes, the indexes and tables trade names, and the new table takes over what the
old one carried (:mod:`engine.compact.carry`) and the capture trigger, which logs the application's
changes to it until the verification passes (a swap undone takes them back to the old table);
the record says ``swapped`` in the same commit.
"""

from __future__ import annotations

import time

from psycopg import errors as pg_errors
from psycopg import sql

from engine.compact import capture, carry, leaf
from engine.compact.catchup import catch_up, sync_round
from engine.compact.locking import ATTEMPTS, BACKOFF_S
from engine.compact.state import TRIGGER, TRUNCATED, Compaction, save
from engine.db import Connection, one_row, regclass_of, table_ident
from engine.errors import MsggcError


class SwapNotGranted(MsggcError):
    """The table's lock was never granted within lock_timeout: the compaction is undone."""


class ShapeChanged(MsggcError):
    """The application changed the table's columns, constraints or indexes meanwhile."""


def swap(conn: Connection, c: Compaction, names: list[str], lock_timeout_ms: int) -> None:
    """Swap, or raise :class:`SwapNotGranted` after every attempt waited its ``lock_timeout``."""
    for attempt in range(ATTEMPTS):
        try:
            with conn.transaction():
                locked = _swap_locked(conn, c, names, lock_timeout_ms)
            c.swap_ms = (time.monotonic() - locked) * 1000
            return
        except pg_errors.LockNotAvailable:
            time.sleep(BACKOFF_S * 2**attempt)
            catch_up(conn, c, names)
    raise SwapNotGranted(f"the lock on {c.table.qualified} was not granted within {lock_timeout_ms} ms"
                         f" in {ATTEMPTS} attempts (a long transaction of the application's holds it);"
                         " the compaction was undone, nothing changed")


def _swap_locked(conn: Connection, c: Compaction, names: list[str], lock_timeout_ms: int) -> float:
    """The swap inside its transaction; returns when (monotonic) the table's lock was granted."""
    conn.execute("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', '0', true),"
                 " set_config('synchronous_commit', 'on', true)", (f"{lock_timeout_ms}ms",))
    table, new = table_ident(c.table), table_ident(c.new)
    if c.parent:  # the parent first, as the application's statements take them
        conn.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(*c.parent)))
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
    locked = time.monotonic()
    old_oid, new_oid = regclass_of(conn, c.table), regclass_of(conn, c.new)
    assert old_oid is not None and new_oid is not None
    require_same_indexes(conn, c, old_oid)
    require_same_shape(conn, c, old_oid, new_oid)
    sync_round(conn, c, names, limit=None)
    for trigger in (TRIGGER, TRUNCATED):
        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), table))
    if c.parent:
        leaf.detach(conn, c)
    renamed = {}
    for number, (name, built) in enumerate(c.indexes):
        renamed[f"{c.prefix}_{number}"] = name
        conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
            sql.Identifier(c.schema, name), sql.Identifier(f"{c.prefix}_{number}")))
        conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
            sql.Identifier(c.schema, built), sql.Identifier(name)))
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(table, sql.Identifier(c.old.name)))
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(new, sql.Identifier(c.name)))
    carry.carry_all(conn, old_oid, new_oid, table, c.prefix, renamed)
    if c.parent:
        leaf.attach(conn, c)
    capture.attach(conn, c)  # the log is empty: from now on it holds the keys changed in the new table
    c.phase = "swapped"
    save(conn, c)
    return locked


def require_same_indexes(conn: Connection, c: Compaction, oid: int) -> None:
    """An index the application created or dropped meanwhile would be lost or doubled: refuse
    (:class:`ShapeChanged`). ``oid``: the table in place, whose index names are the old ones."""
    now = sorted(one_row(conn.execute(
        "SELECT coalesce(array_agg(c.relname::text), '{}') FROM pg_index x"
        " JOIN pg_class c ON c.oid = x.indexrelid WHERE x.indrelid = %s", (oid,)))[0])
    if now != sorted(name for name, _built in c.indexes):
        raise ShapeChanged(f"the indexes of {c.table.qualified} changed during the compaction"
                         f" ({', '.join(now)}); it was undone, nothing changed: run it again")


SHAPE = """
SELECT (SELECT jsonb_agg(jsonb_build_array(attname, atttypid, atttypmod, attnotnull, attidentity,
          attgenerated, pg_get_expr(d.adbin, d.adrelid), attcollation) ORDER BY attnum)
        FROM pg_attribute LEFT JOIN pg_attrdef d ON d.adrelid = attrelid AND d.adnum = attnum
        WHERE attrelid = %(oid)s AND attnum > 0 AND NOT attisdropped),
       (SELECT jsonb_agg(jsonb_build_array(conname,
          regexp_replace(pg_get_constraintdef(oid), ' NOT VALID$', '')) ORDER BY conname)
        FROM pg_constraint WHERE conrelid = %(oid)s AND contype = ANY(%(kinds)s::"char"[])
          AND conname NOT LIKE 'msggc%%' AND conparentid = 0)
"""


def require_same_shape(conn: Connection, c: Compaction, old: int, new: int,
                       foreign_keys: bool = True) -> None:
    """A column or constraint the application changed meanwhile would be lost: refuse
    (:class:`ShapeChanged`). ``foreign_keys`` False: CHECKs only (a leaf detached holds its
    parent's foreign keys as its own until attached again)."""
    kinds = ["c", "f"] if foreign_keys else ["c"]
    if conn.execute(SHAPE, {"oid": old, "kinds": kinds}).fetchone() != conn.execute(
            SHAPE, {"oid": new, "kinds": kinds}).fetchone():
        raise ShapeChanged(f"the columns or constraints of {c.table.qualified} changed during the compaction;"
                         " it was undone, nothing changed: run it again")
