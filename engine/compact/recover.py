"""Seeing a compaction through, or undoing it: for the run itself, and for the next run on the
table (whatever its flags) when the one that started it was killed.

Before the swap the application's table is untouched but for the capture trigger: undoing
removes the trigger, its function, the log and the half-built table. After the swap the old
table is frozen: it is verified (``rows(old) = rows(new) + garbage(old)``), its garbage counted
as the run's deleted rows, then dropped (or kept with ``--archive``); the capture trigger the
swap put on the new table goes once the count adds up. If it does not, the swap is undone
(:mod:`engine.compact.unswap`) and the run fails.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg import errors as pg_errors
from psycopg import sql

from engine.compact import capture, copy, tally, unswap
from engine.compact.locking import locking
from engine.compact.state import AFTER_SWAP, BEFORE_SWAP, Compaction, names_of, save, unfinished
from engine.compact.unswap import CompactionKept, CompactionUndone
from engine.db import Connection, one_row, table_ident
from engine.errors import MsggcError
from engine.finish import Finisher, SilentFinisher, close
from engine.status import RunStatus

__all__ = ["CompactionKept", "CompactionUndone", "finish_swapped", "locking", "recover", "recover_table",
           "undo"]


def undo(conn: Connection, c: Compaction, lock_timeout_ms: int) -> None:
    """Remove what a compaction built before its swap, in one transaction (the trigger's drop
    waits at most ``lock_timeout`` for the table, retried with backoff)."""

    def removed() -> None:
        capture.drop(conn, c)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table_ident(c.new)))
        c.phase = "undone"
        save(conn, c)

    _removing_capture(conn, c, removed, lock_timeout_ms, "")


def finish_swapped(conn: Connection, c: Compaction, lock_timeout_ms: int) -> int:
    """Validate the carried foreign keys, verify and count the old table, remove the capture
    from the new one, drop the old table (or keep it as the archive); returns the garbage it
    held: the run's deleted rows, exact. A count that does not add up undoes the swap
    (:func:`engine.compact.unswap.unswap` raises); so does a compaction found ``undoing``."""
    if c.phase == "undoing":
        unswap.unswap(conn, c, lock_timeout_ms, f"compaction of {c.table.qualified} did not add up")
    for name in c.validate:
        conn.execute(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
            table_ident(c.table), sql.Identifier(name)))
    with c.timed("count"):
        rows, garbage = tally.counts(conn, table_ident(c.old), c.predicate,
                                     copy.live_rows(c.predicate, c.never_null), c.params)
    if rows != c.live + garbage:
        with conn.transaction():  # before the old table is first written: never verified again
            unswap.begin(conn, c)
        why = (f"compaction of {c.table.qualified} did not add up: the old table held {rows} rows,"
               f" the new one {c.live} and garbage {garbage}")
        unswap.unswap(conn, c, lock_timeout_ms, why)
    _drop_capture(conn, c, lock_timeout_ms)
    # not under the table's lock: the archive's delete may take a while
    with c.timed("drop"), conn.transaction():
        if c.archive:
            _keep_garbage_only(conn, c)
        else:
            conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(c.old)))
        c.phase = "done"
        save(conn, c)
        conn.execute("UPDATE gc_runs SET messages_deleted = messages_deleted + %s, batches = batches + 1"
                     " WHERE id = %s",
                     (garbage, c.run_id))
    return int(garbage)


def _drop_capture(conn: Connection, c: Compaction, lock_timeout_ms: int) -> None:
    """The verification passed: the capture trigger leaves the new table (the application's
    writes pay it no longer), under ``lock_timeout``; not granted, the next run finishes."""
    _removing_capture(conn, c, lambda: capture.drop(conn, c), lock_timeout_ms, " after the swap")


def _removing_capture(conn: Connection, c: Compaction, step: Callable[[], None], lock_timeout_ms: int,
                      when: str) -> None:
    """``step`` (it drops the capture trigger) under ``lock_timeout`` with retries; never granted,
    a one-line error: the next run removes it."""
    try:
        locking(conn, step, lock_timeout_ms)
    except pg_errors.LockNotAvailable:
        raise MsggcError(f"the capture trigger on {c.table.qualified} could not be removed{when}: its"
                         f" lock was not granted within {lock_timeout_ms} ms; the next run removes it"
                         ) from None


def _keep_garbage_only(conn: Connection, c: Compaction) -> None:
    """The old table as the run's archive: its live rows (now in the new table) deleted, and
    nothing of it that acts on the application: its triggers disabled, its foreign keys dropped
    (a referenced row the application deletes must not be held by the archive)."""
    old = table_ident(c.old)
    conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(old))
    for (name,) in conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s)"
                                " AND contype = 'f'", (old.as_string(conn),)).fetchall():
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(old, sql.Identifier(name)))
    conn.execute(sql.SQL("DELETE FROM {} WHERE ({}) IS NOT TRUE").format(old, c.predicate), c.params)


def recover(conn: Connection, schema: str, name: str, lock_timeout_ms: int,
            finisher: Finisher | None = None, continuing: int | None = None) -> list[str]:
    """Undo or finish every compaction of ``schema.name`` a killed run left; returns what was
    done, one line each. The killed run is closed (failed when undone, complete when finished)
    with its notice, but for ``continuing``: the run a worker claimed again goes on in its row
    (its count so far kept there) and tells its end once."""
    done = []
    for c in unfinished(conn, schema, name):
        finisher_of = None if c.run_id == continuing else finisher or SilentFinisher()
        if c.phase in BEFORE_SWAP:
            undo(conn, c, lock_timeout_ms)
            _close(conn, c.run_id, RunStatus.FAILED, "killed before its swap: undone by the next run",
                   finisher_of)
            done.append(f"run {c.run_id}'s compaction, killed before its swap, undone")
        elif c.phase in AFTER_SWAP:
            try:
                deleted = finish_swapped(conn, c, lock_timeout_ms)
            except (CompactionUndone, CompactionKept) as exc:
                _close(conn, c.run_id, RunStatus.FAILED, f"killed after its swap: {exc}", finisher_of)
                done.append(f"run {c.run_id}'s compaction, killed after its swap: {exc}")
                continue
            _close(conn, c.run_id, RunStatus.COMPLETE, None, finisher_of)
            done.append(f"run {c.run_id}'s compaction, killed after its swap, finished: {deleted} rows")
        else:  # killed between its last phase and its close: the record says how it ended
            failure = None if c.phase == "done" else f"killed before its close, compaction {c.phase}"
            ended = RunStatus.COMPLETE if failure is None else RunStatus.FAILED
            _close(conn, c.run_id, ended, failure, finisher_of)
    return done


def recover_table(conn: Connection, oid: int, lock_timeout_ms: int,
                  finisher: Finisher | None = None, continuing: int | None = None) -> list[str]:
    """:func:`recover` for the table ``oid`` (every run calls it, under the table's GC lock)."""
    return recover(conn, *names_of(conn, oid), lock_timeout_ms, finisher, continuing)


def _close(conn: Connection, run_id: int, status: RunStatus, error: str | None,
           finisher: Finisher | None) -> None:
    """A killed run's row, if it still says running (a run that closed itself keeps its word),
    closed with its notice, as it would have closed itself; None: left to the run going on in it."""
    row = one_row(conn.execute("SELECT status, node FROM gc_runs WHERE id = %s", (run_id,)))
    if row[0] == "running" and finisher is not None:
        close(conn, run_id, row[1], lambda: (status, error), finisher)
