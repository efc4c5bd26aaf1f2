"""One compaction run, phase by phase, each recorded; any way out of it closes the run, and a
compaction stopped or failed before its swap is undone before the run closes."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from engine import runs
from engine.compact import capture, copy, leaf, preconditions, recover, swap
from engine.compact.catchup import catch_up
from engine.compact.choice import live_share, unheld
from engine.compact.state import AFTER_SWAP, BEFORE_SWAP, Compaction, load, names_of, save
from engine.config import GcOptions
from engine.db import Connection, connect, one_row, regclass_of, table_ident
from engine.errors import MsggcError
from engine.finish import Finisher, close
from engine.planner import cutoff_of
from engine.queries import Statements
from engine.result import GcResult
from engine.status import RunStatus
from engine.target import Target


class Stopped(Exception):
    """A budget or a signal: the compaction stops at a phase boundary and is undone."""


@dataclass
class Budget:
    stop: threading.Event
    deadline: float | None

    def check(self) -> None:
        if self.stop.is_set():
            raise Stopped("a signal")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Stopped("--max-seconds reached")


def compact(conn: Connection, dsn: str, options: GcOptions, target: Target, statements: Statements | None,
            finisher: Finisher, stop: threading.Event, run_id: int | None = None,
            reason: str = "compaction asked for (--strategy compact)", checked: bool = False) -> GcResult:
    """Compact the (plain) table: refused in one line before any run exists if it cannot be;
    ``reason``: why it compacts (asked for, or ``auto``'s choice); ``checked``: the refusals were
    just found empty (``auto`` chose it under the same GC lock), not asked again."""
    started = time.monotonic()
    if not checked:
        preconditions.require(conn, target)
    assert statements is not None  # a plain table: its one leg
    if options.max_rows is not None:
        raise preconditions.CompactRefused("--strategy compact cannot stop after --max-rows (it copies the"
                                           " live rows in one statement): use the walk, or --max-seconds")
    if options.archive_to:
        raise preconditions.CompactRefused("--strategy compact keeps its archive in the database (--archive):"
                                           " drop --archive-to, or use the walk")
    schema, name = names_of(conn, target.oid)
    cutoff = cutoff_of(conn, options)
    disk = preconditions.free_disk(conn, _copy_bytes(conn, target.oid, statements, cutoff))
    names = copy.columns(conn, target.oid)
    with conn.transaction():  # the run and its record in one commit: never a run without it
        run = runs.start(conn, target.qualified, options.node, "compact", [], options.describe(),
                         resumed_from=None, run_id=run_id, garbage=target.describe(), key=target.key)
        parent = leaf.parent_of(conn, target.oid)
        c = Compaction(run.id, schema, name, list(target.key), statements.garbage.as_string(conn),
                       cutoff.isoformat() if cutoff else None, never_null=copy.never_null(target),
                       archive=options.archive,
                       parent=list(parent[:2]) if parent else None, bound=parent[2] if parent else None)
        save(conn, c)
    budget = Budget(stop, started + options.max_seconds if options.max_seconds else None)
    status, failure = RunStatus.COMPLETE, None
    try:
        _until_swap(conn, c, target.oid, names, options, budget, copy.live_rows(c.predicate, c.never_null))
        with c.timed("swap"):
            swap.swap(conn, c, names, options.lock_timeout_ms)
        with c.timed("verify"):
            recover.finish_swapped(conn, c, options.lock_timeout_ms)
        save(conn, c)  # with the verify's seconds
    except Stopped as exc:
        status, failure = RunStatus.STOPPED, f"compaction stopped ({exc}) before its swap and undone"
    except (MsggcError, psycopg.Error) as exc:
        status, failure = RunStatus.FAILED, str(exc).strip().splitlines()[0]

    def reconnect() -> Connection:
        return _reconnected(dsn, target.oid)[0]  # the row is closed with or without the table's lock

    used, held = _reconnected(dsn, target.oid) if conn.broken or conn.closed else (conn, True)
    if failure is not None and held:
        status, failure = _settled(used, c.run_id, options.lock_timeout_ms, status, failure)
    elif failure is not None:  # another run holds the table: it finishes or undoes the compaction first
        failure = f"{failure}; another run took the table's GC lock meanwhile and finishes or undoes it"
    closed = close(used, run.id, options.node, lambda: (status, failure), finisher, reconnect=reconnect)
    if not closed.conn.closed:
        for oid in (target.oid, regclass_of(closed.conn, c.table)):
            if oid is not None:
                runs.unlock_table(closed.conn, oid)
    for other in {used, closed.conn} - {conn}:
        other.close()
    deleted = closed.outcome.messages_deleted
    return GcResult(status=closed.outcome.status, strategy="compact",
                    reason=f"{reason}; {disk}{_held(c)}{_unpaced(options)}",
                    garbage_estimate=deleted, rows_estimate=c.live + deleted, run_id=run.id,
                    error=closed.outcome.failure,
                    stop_reason=failure if status is RunStatus.STOPPED else None,
                    messages_deleted=deleted, batches=1, elapsed_s=time.monotonic() - started,
                    garbage=target.describe(), notification_error=closed.notification_error)


def _held(c: Compaction) -> str:
    return f"; the swap held the table's lock {c.swap_ms:.0f} ms" if c.swap_ms is not None else ""


def _unpaced(options: GcOptions) -> str:
    """The pacing budgets asked for that a compaction does not apply (it has no batches to pace)."""
    flags = [flag for flag in unheld(options) if flag != "--max-rows"]
    if not flags:
        return ""
    return f"; not paced by {', '.join(flags)} (no batches: the swap waits lock_timeout at most)"


def _settled(conn: Connection, run_id: int, lock_timeout_ms: int, status: RunStatus,
             failure: str) -> tuple[RunStatus, str | None]:
    """After a failure, what the record says (not what this process believed: a transaction whose
    connection went away did not commit): undone before the swap, finished after it."""
    try:
        c = load(conn, run_id)
        if c is not None and c.phase in BEFORE_SWAP:
            recover.undo(conn, c, lock_timeout_ms)
        elif c is not None and c.phase in AFTER_SWAP:
            recover.finish_swapped(conn, c, lock_timeout_ms)
            return RunStatus.COMPLETE, None
    except (MsggcError, psycopg.Error) as exc:
        return status, f"{failure}; {str(exc).strip().splitlines()[0]}"
    return status, failure


def _reconnected(dsn: str, oid: int) -> tuple[Connection, bool]:
    """A fresh connection, and whether it holds the table's GC lock again (the lost one's went
    with it, and another run may have taken it since: then only that run may touch the table)."""
    fresh = connect(dsn)
    return fresh, runs.try_lock_table(fresh, oid)


def _until_swap(conn: Connection, c: Compaction, oid: int, names: list[str], options: GcOptions,
                budget: Budget, live: sql.Composable) -> None:
    """Capture (with the new table, recorded in the same commit), copy, indexes and foreign keys,
    catch-up rounds: each a transaction of its own, the budget checked between them."""

    def begin() -> None:
        capture.create(conn, c)
        copy.create_table(conn, c, oid)
        c.phase = "capture"
        save(conn, c)

    with c.timed("capture"):
        recover.locking(conn, begin, options.lock_timeout_ms)
    new_oid = regclass_of(conn, c.new)
    assert new_oid is not None
    runs.try_lock_table(conn, new_oid)  # a GC of the table once swapped waits for this run's end
    budget.check()
    with c.timed("copy"), conn.transaction():
        c.live = copy.copy_live(conn, c, names, live)
        c.phase = "copied"
        save(conn, c)
    budget.check()
    with c.timed("indexes"), conn.transaction():
        copy.build_indexes(conn, c, oid)
        save(conn, c)

    def foreign_keys() -> None:
        c.validate = copy.add_foreign_keys(conn, c, oid)
        c.phase = "indexed"
        save(conn, c)

    with c.timed("foreign keys"):
        recover.locking(conn, foreign_keys, options.lock_timeout_ms)
    with c.timed("analyze"):
        # statistics before the application's queries meet the table (else planned blind until autovacuum's)
        conn.execute(sql.SQL("ANALYZE {}").format(table_ident(c.new)))
    with c.timed("catch-up"):
        catch_up(conn, c, names, budget.check)


def _copy_bytes(conn: Connection, oid: int, statements: Statements, cutoff: object) -> int:
    """The new table's size, about: the table's (with indexes) times its live share."""
    size = one_row(conn.execute("SELECT pg_total_relation_size(%s)", (oid,)))[0]
    return int(size * live_share(conn, statements, {"cutoff": cutoff}))
