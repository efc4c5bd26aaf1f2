"""A swap undone: its verification failed (``rows(old) != rows(new) + garbage(old)``: the new
table may lack a row), so the old table, which holds every row the compaction started from,
goes back in place, and the new one is dropped.

After the swap the application wrote to the new table; the capture trigger the swap put on it
logged each key it changed. Those keys are synced back into the old table (present -> its row,
garbage or not; gone -> deleted), in rounds without a lock and a last one under the table's
lock, in the transaction that also trades the names back (tables, indexes, identity sequences),
gives the sequences back, drops the new table and records ``unswapped``. The old table's own
triggers are off meanwhile (each change fired the new table's already) and enabled as they were
once it is back. ``undoing`` is recorded
before the old table is first written, so a run killed anywhere in here is undone again by the
next (:func:`engine.compact.recover.recover`), never verified again.

Where the undo cannot be done right (the application changed the new table's columns,
constraints or indexes, made an object depend on it, or wrote a unique value a garbage row of the
old table holds), the new table stays in place, the old one is kept beside it as
``msggc_old_<run>`` with the changes synced so far, its triggers off and its foreign keys dropped
(nothing of it acts on the application), and the run fails saying so (``kept``).
"""

from __future__ import annotations

from typing import NoReturn

from psycopg import errors as pg_errors
from psycopg import sql

from engine.compact import capture, carry, leaf
from engine.compact.carry import ENABLED
from engine.compact.catchup import catch_up, sync_round
from engine.compact.copy import columns
from engine.compact.locking import locking
from engine.compact.state import Compaction, save
from engine.compact.swap import ShapeChanged, require_same_indexes, require_same_shape
from engine.db import Connection, regclass_of, table_ident
from engine.errors import MsggcError

UNDOABLE: dict[type[Exception], str] = {
    ShapeChanged: "the application changed its columns, constraints or indexes since the swap",
    pg_errors.DependentObjectsStillExist: "an object made since the swap depends on the new table",
    pg_errors.UniqueViolation: "a row written since the swap takes a unique value the old table holds",
}
"""What makes a swap impossible to undo right (the old table is then kept beside the new), and
how the run's error says it."""


class CompactionUndone(MsggcError):
    """The verification failed after the swap: the swap was undone, every change carried back."""


class CompactionKept(MsggcError):
    """The verification failed and the swap could not be undone: the old table is kept beside."""


def begin(conn: Connection, c: Compaction) -> None:
    """Record ``undoing`` (inside the caller's transaction, before the old table is written):
    from now on the old table's own triggers are off, their states kept in the record."""
    old = table_ident(c.old)
    c.triggers = dict(conn.execute("SELECT tgname::text, tgenabled::text FROM pg_trigger"
                                   " WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal",
                                   (old.as_string(conn),)).fetchall())
    conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(old))
    c.phase = "undoing"
    save(conn, c)


def unswap(conn: Connection, c: Compaction, lock_timeout_ms: int, why: str) -> NoReturn:
    """Undo the swap (its phase recorded ``undoing``); raises :class:`CompactionUndone` when
    done, :class:`CompactionKept` when it cannot be, a lock error when the table's lock was not
    granted (``undoing`` stays: the next run goes on with it)."""
    old = regclass_of(conn, c.old)
    assert old is not None
    names = columns(conn, old)
    try:
        if c.parent:
            with conn.transaction():
                leaf.bound_on_old(conn, c)
        _require_unchanged(conn, c)  # before the rounds too: nothing taken back in vain
        catch_up(conn, c, names, back=True)
        locking(conn, lambda: _swapped_back(conn, c, names), lock_timeout_ms)
    except pg_errors.LockNotAvailable:
        raise MsggcError(f"{why}; undoing the swap: the lock on {c.table.qualified} was not granted within"
                         f" {lock_timeout_ms} ms; the next run undoes it") from None
    except tuple(UNDOABLE) as exc:
        said = next(said for kind, said in UNDOABLE.items() if isinstance(exc, kind))
        _keep(conn, c, lock_timeout_ms, why, said)
    raise CompactionUndone(f"{why}; the swap was undone: {c.table.qualified} is the table it was, with"
                           " every change since")


def _swapped_back(conn: Connection, c: Compaction, names: list[str]) -> None:
    """The undo's one transaction (``lock_timeout`` set by the caller): the last keys synced
    back, the new table dropped, the old one in its place under its own names."""
    if c.parent:  # the parent first, as the application's statements take them
        conn.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(*c.parent)))
    table, old_ident = table_ident(c.table), table_ident(c.old)
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
    new = _require_unchanged(conn, c)
    sync_round(conn, c, names, limit=None, back=True)
    capture.drop(conn, c)
    sequences = carry.sequences_back(conn, new, old_ident)
    if c.parent:
        leaf.detach(conn, c)
    conn.execute(sql.SQL("DROP TABLE {}").format(table))  # RESTRICT: an object on it keeps it
    for number, (name, _built) in enumerate(c.indexes):
        conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
            sql.Identifier(c.schema, f"{c.prefix}_{number}"), sql.Identifier(name)))
    for sequence, name in sequences:
        conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(
            sql.SQL(sequence), sql.Identifier(name)))  # regclass text: quoted as needed
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(old_ident, sql.Identifier(c.name)))
    for trigger, enabled in c.triggers.items():
        conn.execute(sql.SQL("ALTER TABLE {} {} {}").format(
            table, sql.SQL(ENABLED.get(enabled, "ENABLE TRIGGER")), sql.Identifier(trigger)))
    if c.parent:
        leaf.attach(conn, c)
    c.phase = "unswapped"
    save(conn, c)


def _require_unchanged(conn: Connection, c: Compaction) -> int:
    """The new table's columns, constraints and indexes as the old one's (raises
    :class:`ShapeChanged`); returns the new table's oid."""
    new, old = regclass_of(conn, c.table), regclass_of(conn, c.old)
    assert new is not None and old is not None
    require_same_indexes(conn, c, new)
    require_same_shape(conn, c, old, new, foreign_keys=not c.parent)
    return new


def _keep(conn: Connection, c: Compaction, lock_timeout_ms: int, why: str, reason: str) -> NoReturn:
    """The undo cannot be done right: the capture goes, the old table stays beside (``kept``)."""

    def kept() -> None:
        capture.drop(conn, c)
        old = table_ident(c.old)  # its triggers are off already; its foreign keys would hold the others
        for (name,) in conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s)"
                                    " AND contype = 'f'", (old.as_string(conn),)).fetchall():
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(old, sql.Identifier(name)))
        c.phase = "kept"
        save(conn, c)

    locking(conn, kept, lock_timeout_ms)
    raise CompactionKept(f"{why}; the swap could not be undone ({reason}): {c.table.qualified} stays the"
                         f" compacted table, the old one is kept beside it as {c.old.qualified}")
