"""The bounded loop: ``plan -> walk -> delete batch + checkpoint -> report``.

Each batch is one short transaction that deletes and advances the run's checkpoint together,
under ``SET LOCAL lock_timeout/statement_timeout``. A crash at any instant therefore resumes
exactly after the last committed batch and counts every deleted row once.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from engine import archive_file, reclaim, runs
from engine.archive import resolve as resolve_archive
from engine.archive import table_columns
from engine.archive_file import ArchiveFile
from engine.config import GcOptions
from engine.db import Connection, connect, require_bookkeeping, require_target
from engine.errors import DatabaseUnreachable, GcAlreadyRunning, MsggcError
from engine.estimate import estimate
from engine.planner import Plan, make_plan
from engine.queries import SET_BATCH_SETTINGS, Archive, Statements
from engine.service import outbox
from engine.service.contract import completion
from engine.service.notify import Notifier, encode
from engine.strategies import STRATEGIES, BatchOutcome, Slice, Strategy
from engine.throttle import Limits, Throttle

DEFAULT_BATCH_ROWS = 2000
LOCKED_TABLE_RETRIES = 5
RECONNECT_WINDOW_S = 30.0


@dataclass(frozen=True)
class Progress:
    run_id: int
    deleted: int
    batches: int
    elapsed_s: float
    garbage_estimate: int
    batch_s: float
    """Duration of the batch this report follows."""


@dataclass
class GcResult:
    """What a run did; ``status`` is complete, stopped (resumable), failed or dry-run."""

    status: str
    strategy: str
    reason: str
    garbage_estimate: int
    rows_estimate: int
    run_id: int | None = None
    stop_reason: str | None = None
    error: str | None = None
    messages_deleted: int = 0
    rows_skipped_locked: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    batch_ms_p50: float | None = None
    batch_ms_p99: float | None = None
    batch_ms_max: float | None = None
    planned_batches: int | None = None
    notification_error: str | None = None
    throttle_pauses: int = 0
    throttled_s: float = 0.0
    throttle_reasons: dict[str, int] = field(default_factory=dict)
    reclaim: dict[str, Any] | None = None
    predicted_seconds: float | None = None
    predicted_wal_bytes: int | None = None

    @property
    def rows_per_s(self) -> float:
        return self.messages_deleted / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "dry-run": 0, "stopped": 3}.get(self.status, 1)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}


class BatchSizer:
    """Steers the batch size so a batch takes about the target duration (or keeps it fixed)."""

    def __init__(self, initial: int, maximum: int, target_s: float, adaptive: bool) -> None:
        self.size = max(1, min(initial, maximum))
        self.maximum = maximum
        self.target_s = target_s
        self.adaptive = adaptive

    def observe(self, seconds: float) -> None:
        if self.adaptive and seconds > 0:
            factor = min(2.0, max(0.5, self.target_s / seconds))
            self.size = max(1, min(self.maximum, round(self.size * factor)))

    def shrink(self) -> bool:
        """Halve after a statement timeout; False when there is nothing left to halve."""
        if self.size == 1:
            return False
        self.size = max(1, self.size // 2)
        return True


@dataclass
class Walk:
    """State shared by the workers of one run."""

    options: GcOptions
    plan: Plan
    run: runs.Run
    strategy: Strategy
    statements: Statements
    dsn: str
    stop: threading.Event
    on_progress: Callable[[Progress], None] | None
    throttle: Throttle
    archive_file: ArchiveFile | None = None
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    deleted: int = 0
    skipped: int = 0
    batches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    error: str | None = None
    rewound: bool = False

    def budget_reason(self) -> str | None:
        if self.stop.is_set():
            return self.stop_reason or "interrupted"
        if self.options.max_rows is not None and self.deleted >= self.options.max_rows:
            return f"max_rows={self.options.max_rows}"
        elapsed = time.monotonic() - self.started
        if self.options.max_seconds is not None and elapsed >= self.options.max_seconds:
            return f"max_seconds={self.options.max_seconds:g}"
        return None

    def record(self, outcome: BatchOutcome, seconds: float) -> None:
        with self.lock:
            self.deleted += outcome.deleted
            self.skipped += outcome.skipped_locked
            self.batches += 1
            self.latencies_ms.append(seconds * 1000)
            progress = Progress(self.run.id, self.deleted, self.batches,
                                time.monotonic() - self.started,
                                self.plan.facts.garbage_rows_estimate, seconds)
        if self.on_progress:
            self.on_progress(progress)

    def rewind(self, conn: Connection) -> None:
        """After the server went away, believe only what it kept: with ``--async-commit`` a crash
        loses the last batches that looked committed, so every slice goes back to its recorded
        checkpoint (a finished slice is walked again) and the archive file to its recorded end."""
        with self.lock:
            for part, position in zip(self.run.slices, runs.positions(conn, self.run.id), strict=True):
                part.position = position
            self.rewound = True
        if self.archive_file is not None:
            self.archive_file.stale = True

    def fail(self, message: str) -> None:
        with self.lock:
            self.error = self.error or message
        self.stop.set()

    def batch_size(self, sizer: BatchSizer) -> int:
        """The sizer's choice, capped so a ``max_rows`` budget is not overshot by much."""
        if self.options.max_rows is None:
            return sizer.size
        remaining = max(1, self.options.max_rows - self.deleted)
        return min(sizer.size, self.strategy.units_for_rows(remaining, self.plan.facts))

    def prepared(self, conn: Connection) -> Connection:
        """A worker's connection, with its session temp table when rows go to a file."""
        if self.archive_file is not None:
            archive_file.prepare(conn, self.options.table)
        return conn

    @property
    def params(self) -> dict[str, Any]:
        return {"cutoff": self.plan.cutoff, "run_id": self.run.id}

    @property
    def settings(self) -> dict[str, str | None]:
        return {"lock_timeout": f"{self.options.lock_timeout_ms}ms",
                "statement_timeout": f"{self.options.statement_timeout_ms}ms",
                "synchronous_commit": "off" if self.options.async_commit else None}


def _initial_size(walk: Walk) -> int:
    rows = walk.options.batch_size or DEFAULT_BATCH_ROWS
    return walk.strategy.units_for_rows(rows, walk.plan.facts)


def run_batch(conn: Connection, walk: Walk, index: int, part: Slice,
              sizer: BatchSizer) -> BatchOutcome:
    """One batch and its checkpoint in one transaction; retried smaller or skip-locked."""
    skip_locked = False
    locked_retries = 0
    while True:
        try:
            file = walk.archive_file
            with file.turn() if file else nullcontext() as turn, conn.transaction():
                conn.execute(SET_BATCH_SETTINGS, walk.settings)
                outcome = walk.strategy.run_batch(conn, walk.statements, part, walk.batch_size(sizer),
                                                  walk.params, skip_locked)
                runs.checkpoint(conn, walk.run.id, index, outcome.position, outcome.deleted,
                                outcome.skipped_locked, turn.append(conn) if turn else None)
            return outcome
        except pg_errors.LockNotAvailable:
            if skip_locked:
                locked_retries += 1
                if locked_retries > LOCKED_TABLE_RETRIES:
                    raise MsggcError(
                        f"{walk.options.table.qualified} stayed locked by another transaction"
                    ) from None
                time.sleep(0.1 * 2**locked_retries)
            skip_locked = True
        except pg_errors.QueryCanceled:
            if not sizer.shrink():
                raise MsggcError(
                    "a batch of the smallest size still exceeds statement_timeout"
                    f" ({walk.options.statement_timeout_ms} ms)"
                ) from None


@dataclass
class Link:
    """A worker's connection, replaced in place when the server comes back after a restart, so
    whoever closes the run uses (and finally closes) the live one, table lock included."""

    conn: Connection
    holds_lock: bool


def reconnect(walk: Walk, holds_lock: bool) -> Connection:
    """Reconnect with backoff after the server went away; the lock holder takes its lock back."""
    deadline = time.monotonic() + RECONNECT_WINDOW_S
    delay = 0.5
    while True:
        try:
            conn = connect(walk.dsn)
        except DatabaseUnreachable:
            if time.monotonic() + delay > deadline or walk.stop.is_set():
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if holds_lock and not runs.try_lock_table(conn, walk.plan.facts.oid):
            conn.close()
            raise GcAlreadyRunning("lost the table lock while reconnecting: another GC took over")
        return walk.prepared(conn)


def work(link: Link, walk: Walk, todo: queue.SimpleQueue[int]) -> None:
    """A worker: takes slices from the queue and walks each to its end or to the budget."""
    sizer = BatchSizer(_initial_size(walk), walk.strategy.max_units,
                       walk.options.target_batch_ms / 1000, walk.options.batch_size is None)
    while True:
        try:
            index = todo.get_nowait()
        except queue.Empty:
            return
        part = walk.run.slices[index]
        while not part.done:
            if (reason := walk.budget_reason()) is not None:
                with walk.lock:
                    walk.stop_reason = walk.stop_reason or reason
                return
            try:
                walk.throttle.wait(link.conn, lambda: walk.budget_reason() is not None, walk.stop.wait)
                began = time.monotonic()
                outcome = run_batch(link.conn, walk, index, part, sizer)
            except psycopg.OperationalError:
                link.conn.close()
                link.conn = reconnect(walk, link.holds_lock)
                walk.rewind(link.conn)
                continue
            seconds = time.monotonic() - began
            part.position = outcome.position
            sizer.observe(seconds)
            walk.record(outcome, seconds)
            if walk.options.sleep:
                walk.stop.wait(walk.options.sleep)


def _guarded(walk: Walk, action: Callable[[], None]) -> None:
    """Run a worker; an error stops the whole run and becomes its failure."""
    try:
        action()
    except MsggcError as exc:
        walk.fail(str(exc))
    except psycopg.Error as exc:
        walk.fail(f"database error: {exc}".strip())


def _helper_worker(walk: Walk, todo: queue.SimpleQueue[int]) -> None:
    link = Link(walk.prepared(connect(walk.dsn)), holds_lock=False)
    try:
        work(link, walk, todo)
    finally:
        link.conn.close()


def walk_run(conn: Connection, walk: Walk) -> Connection:
    """Run the workers until every slice is done or the run stops; a rewind after a server
    restart may reopen slices that workers had already left, so they are walked again."""
    while True:
        walk.rewound = False
        conn = _run_workers(conn, walk)
        if not walk.rewound or walk.error or walk.stop_reason or all(p.done for p in walk.run.slices):
            return conn


def _run_workers(conn: Connection, walk: Walk) -> Connection:
    """One pass of the workers; the calling connection (which holds the table lock) is worker 0."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index, part in enumerate(walk.run.slices):
        if not part.done:
            todo.put(index)
    helpers = [threading.Thread(target=_guarded, args=(walk, lambda: _helper_worker(walk, todo)),
                                daemon=True)
               for _ in range(min(walk.options.workers, len(walk.run.slices)) - 1)]
    walk.throttle.start(conn)
    for thread in helpers:
        thread.start()
    link = Link(conn, holds_lock=True)
    try:
        _guarded(walk, lambda: work(link, walk, todo))
    finally:
        for thread in helpers:
            thread.join()
    return link.conn


def _failure_details(walk: Walk) -> str | None:
    if walk.error:
        return walk.error
    if walk.stop_reason:
        return (f"GC stopped ({walk.stop_reason}) before the end of the table;"
                " run it again to continue from its checkpoint")
    return None


def _status(walk: Walk) -> str:
    if walk.error:
        return "failed"
    if all(part.done for part in walk.run.slices):
        return "complete"
    return "stopped"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(conn: Connection, walk: Walk, notifier: Notifier | None) -> GcResult:
    """Close the run and queue its notice in one transaction, then deliver the notice."""
    status = _status(walk)
    details = None if status == "complete" else _failure_details(walk)
    try:
        with conn.transaction():
            deleted = runs.finish(conn, walk.run.id, status, walk.error or walk.stop_reason,
                                  walk.throttle.pauses, walk.throttle.paused_s)
            body = encode(completion(deleted, node=walk.options.node or None, failure=details))
            if notifier is not None and notifier.target:
                outbox.enqueue(conn, walk.run.id, notifier.target, body)
    except psycopg.OperationalError as exc:
        return _report_unrecorded(walk, notifier, f"database connection lost: {exc}".strip())
    result = _result(walk, status)
    result.messages_deleted = deleted
    if notifier is not None:
        result.notification_error = _deliver(conn, notifier, walk.run.id, body)
    return result


def _report_unrecorded(walk: Walk, notifier: Notifier | None, error: str) -> GcResult:
    """The database is gone (the reconnect window ran out): the run stays resumable at its last
    checkpoint, and its failure notice is sent directly, as there is nowhere durable to queue it."""
    walk.fail(error)
    result = _result(walk, "failed")
    if notifier is not None:
        body = encode(completion(walk.deleted, node=walk.options.node or None,
                                 failure=_failure_details(walk)))
        try:
            notifier.send(body)
        except MsggcError as exc:
            result.notification_error = str(exc)
    return result


def _deliver(conn: Connection, notifier: Notifier, run_id: int, body: bytes) -> str | None:
    if notifier.target:
        return outbox.deliver_run(conn, notifier, run_id)
    try:
        notifier.send(body)
    except MsggcError as exc:
        return str(exc)
    return None


def _result(walk: Walk, status: str) -> GcResult:
    latencies = sorted(walk.latencies_ms)
    return GcResult(
        status=status,
        strategy=walk.plan.strategy,
        reason=walk.plan.reason,
        garbage_estimate=walk.plan.facts.garbage_rows_estimate,
        rows_estimate=walk.plan.facts.rows_estimate,
        run_id=walk.run.id,
        stop_reason=walk.stop_reason if status == "stopped" else None,
        error=walk.error,
        messages_deleted=walk.deleted,
        rows_skipped_locked=walk.skipped,
        batches=walk.batches,
        elapsed_s=time.monotonic() - walk.started,
        batch_ms_p50=_percentile(latencies, 50),
        batch_ms_p99=_percentile(latencies, 99),
        batch_ms_max=latencies[-1] if latencies else None,
        throttle_pauses=walk.throttle.pauses,
        throttled_s=walk.throttle.paused_s,
        throttle_reasons=walk.throttle.reasons,
    )


def reclaim_space(conn: Connection, options: GcOptions, oid: int,
                  before: dict[str, Any]) -> dict[str, Any]:
    """Sizes and dead tuples before and after the run, and after VACUUM when asked for."""
    space: dict[str, Any] = {"before": before, "after_gc": reclaim.health(conn, oid)}
    if options.vacuum:
        space["vacuum_s"] = reclaim.vacuum(conn, options.table)
        space["after_vacuum"] = reclaim.health(conn, oid)
    return space


def dry_run(conn: Connection, plan: Plan, options: GcOptions, statements: Statements) -> GcResult:
    """The plan, the garbage estimate, the batches, and a prediction from rolled-back samples."""
    strategy = STRATEGIES[plan.strategy]
    size = strategy.units_for_rows(options.batch_size or DEFAULT_BATCH_ROWS, plan.facts)
    target_s = None if options.batch_size else options.target_batch_ms / 1000
    sample = estimate(conn, plan, strategy, statements, {"cutoff": plan.cutoff, "run_id": 0}, size,
                      target_s, options.archive_to is not None)
    return GcResult(
        status="dry-run",
        strategy=plan.strategy,
        reason=plan.reason,
        garbage_estimate=plan.facts.garbage_rows_estimate,
        rows_estimate=plan.facts.rows_estimate,
        planned_batches=sample.batches,
        predicted_seconds=sample.predicted_seconds,
        predicted_wal_bytes=sample.predicted_wal_bytes,
    )


def _archive_target(conn: Connection, options: GcOptions, oid: int) -> Archive | None:
    """Where the batch statements move deleted rows: the archive table, or with a file this
    session's outgoing temp table, which each batch drains with COPY."""
    if options.archive:
        return resolve_archive(conn, options.table, oid)
    if options.archive_to:
        archive_file.prepare(conn, options.table)
        return archive_file.outgoing_archive(tuple(table_columns(conn, oid)))
    return None


def resume_or_start(conn: Connection, options: GcOptions, plan: Plan, run_id: int | None) -> runs.Run:
    """Continue the latest unfinished run of this table and node, or start a fresh walk.

    ``run_id`` names a queued run to promote (the API's worker); if it had already walked part of
    the table before its worker died, it goes on in place from its checkpoint.
    """
    if run_id is not None and (in_place := runs.walked_so_far(conn, run_id)) is not None:
        return in_place
    table = options.table.qualified
    previous = runs.latest_resumable(conn, table, options.node, exclude=run_id)
    if previous is not None and options.strategy in ("auto", previous[1]):
        _, strategy, slices = previous
    else:
        strategy = plan.strategy
        slices = STRATEGIES[plan.strategy].slices(plan.facts, options.workers)
    return runs.start(conn, table, options.node, strategy, slices, options.describe(),
                      resumed_from=previous[0] if previous else None, run_id=run_id)


def collect(
    dsn: str,
    options: GcOptions | None = None,
    notifier: Notifier | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    run_id: int | None = None,
) -> GcResult:
    """Run one GC on ``dsn`` and return what it did. Raises :class:`MsggcError` on bad input.

    ``stop`` ends the run after the batch in flight (resumable); ``run_id`` executes a run
    queued by :func:`engine.runs.enqueue` instead of opening a new one.
    """
    options = options or GcOptions()
    conn = connect(dsn)
    try:
        require_bookkeeping(conn)
        oid = require_target(conn, options.table)
        archive = _archive_target(conn, options, oid)
        statements = Statements.for_table(options.table, options.older_than is not None, archive)
        plan = make_plan(conn, options, oid, statements)
        if options.dry_run:
            return dry_run(conn, plan, options, statements)
        if not runs.try_lock_table(conn, oid):
            holder = runs.lock_holder(conn, oid)
            raise GcAlreadyRunning(
                f"another GC is already running on {options.table.qualified}"
                + (f" (backend pid {holder})" if holder else "")
            )
        run = resume_or_start(conn, options, plan, run_id)
        strategy = STRATEGIES[run.strategy]  # type: ignore[index]
        limits = Limits(options.max_wal_rate, options.max_replica_lag, options.pause_for_vacuum)
        file = (ArchiveFile.open(conn, Path(options.archive_to), options.table, archive.columns, run)
                if options.archive_to and archive else None)
        walk = Walk(options=options, plan=plan, run=run, strategy=strategy,
                    statements=statements, dsn=dsn, stop=stop or threading.Event(),
                    on_progress=on_progress, throttle=Throttle(limits, oid), archive_file=file)
        before = reclaim.health(conn, oid)
        conn = walk_run(conn, walk)
        result = report(conn, walk, notifier)
        if not conn.closed:
            result.reclaim = reclaim_space(conn, options, oid, before)
            runs.record_reclaim(conn, run.id, result.reclaim)
        return result
    finally:
        conn.close()
