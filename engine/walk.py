"""The walk: workers take slices and delete them batch by batch, each batch with its checkpoint.

Each batch is one short transaction that deletes and advances the run's checkpoint together,
under ``SET LOCAL lock_timeout/statement_timeout``. A crash at any instant therefore resumes
exactly after the last committed batch and counts every deleted row once. Any error in any
worker stops the whole walk and becomes its failure: a walk never ends quietly short.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pg_errors

from engine import archive_file, progress, runs
from engine.archive_file import ArchiveFile
from engine.config import GcOptions
from engine.db import Connection, connect, helpful_lines, primary_message
from engine.errors import DatabaseUnreachable, GcAlreadyRunning, MsggcError
from engine.planner import Plan
from engine.queries import SET_BATCH_SETTINGS, SET_SWEEP_SETTINGS, Statements
from engine.result import Progress
from engine.sizer import DEFAULT_BATCH_ROWS, BatchSizer
from engine.strategies import SWEEP, BatchOutcome, Slice, Strategy, SweepStrategy
from engine.throttle import Throttle

if TYPE_CHECKING:
    from engine.partitions import Drop

LOCKED_TABLE_RETRIES = 5
RECONNECT_WINDOW_S = 30.0

SWEEP_STRATEGY = SweepStrategy()

log = logging.getLogger("msggc.walk")


@dataclass(frozen=True)
class Leg:
    """A table the walk deletes from: the target itself, or one leaf partition of it, each with
    its own plan, walk and statements."""

    plan: Plan
    strategy: Strategy
    statements: Statements


@dataclass
class Walk:
    """State shared by the workers of one run."""

    options: GcOptions
    run: runs.Run
    legs: dict[str | None, Leg]
    """By leaf name (None: a plain table); every slice names its leg."""
    oid: int
    """The target's: its advisory lock is the run's."""
    dsn: str
    stop: threading.Event
    on_progress: Callable[[Progress], None] | None
    throttle: Throttle
    archive_file: ArchiveFile | None = None
    drops: dict[str, Drop] = field(default_factory=dict)
    """Leaves to drop whole, by name: the worker that takes a leaf's (one) slice tries it first
    (see :class:`engine.partitions.Drop`), so workers drop leaves side by side."""
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    deleted: int = 0
    skipped: int = 0
    skipped_by_leaf: Counter[str | None] = field(default_factory=Counter)
    """Rows the walk (not the sweep) left locked, per leg: the sweep reads them again."""
    batches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    foreign_keys: Counter[str] = field(default_factory=Counter)
    """Per foreign key onto the table: garbage rows kept, or child rows deleted or changed."""
    by_leaf: Counter[str] = field(default_factory=Counter)
    """Rows deleted per leaf partition."""
    dropped: set[str] = field(default_factory=set)
    """Leaves dropped whole (their rows all garbage)."""
    stop_reason: str | None = None
    error: str | None = None
    rewound: bool = False
    sampler: progress.Sampler = field(default_factory=progress.Sampler)

    @property
    def walked_to_end(self) -> bool:
        return all(part.done for part in self.run.slices)

    @property
    def garbage_estimate(self) -> int:
        return sum(leg.plan.facts.garbage_rows_estimate for leg in self.legs.values())

    def leg(self, part: Slice) -> Leg:
        leg = self.legs[part.leaf]
        return replace(leg, strategy=SWEEP_STRATEGY) if part.strategy == SWEEP else leg

    def budget_reason(self) -> str | None:
        if self.stop.is_set():
            return self.stop_reason or "interrupted"
        if self.options.max_rows is not None and self.deleted >= self.options.max_rows:
            return f"max_rows={self.options.max_rows}"
        elapsed = time.monotonic() - self.started
        if self.options.max_seconds is not None and elapsed >= self.options.max_seconds:
            return f"max_seconds={self.options.max_seconds:g}"
        return None

    def record(self, part: Slice, outcome: BatchOutcome, seconds: float) -> None:
        with self.lock:
            self.deleted += outcome.deleted
            if part.leaf is not None:
                self.by_leaf[part.leaf] += outcome.deleted
            self.skipped += outcome.skipped_locked
            if part.strategy != SWEEP:
                self.skipped_by_leaf[part.leaf] += outcome.skipped_locked
            self.foreign_keys.update(outcome.references)
            self.batches += 1
            self.latencies_ms.append(seconds * 1000)
            progress = Progress(self.run.id, self.deleted, self.batches,
                                time.monotonic() - self.started, self.garbage_estimate, seconds)
        if self.on_progress:
            self.on_progress(progress)

    def live(self) -> progress.Live | None:
        """The throttle's figures when this batch's checkpoint is to carry a progress sample."""
        if not self.sampler.due():
            return None
        throttle = self.throttle
        return progress.Live(throttle.pauses, throttle.paused_s, throttle.held_back_s, throttle.reasons)

    def take_drop(self, part: Slice) -> Drop | None:
        """The drop of the slice's leaf, to try once, by the worker that asks first."""
        with self.lock:
            return self.drops.pop(part.leaf, None) if part.leaf is not None else None

    def record_drop(self, leaf: str, rows: int) -> None:
        """A leaf dropped whole: its rows count as deleted, its slices are done."""
        with self.lock:
            self.deleted += rows
            self.by_leaf[leaf] += rows
            self.dropped.add(leaf)
            for part in self.run.slices:
                if part.leaf == leaf:
                    part.finished = True

    def rewind(self, conn: Connection) -> None:
        """After the server went away, believe only what it kept: with ``--async-commit`` a crash
        loses the last batches that looked committed, so every slice goes back to its recorded
        checkpoint (a finished slice is walked again) and the archive file to its recorded end."""
        with self.lock:
            for part, kept in zip(self.run.slices, runs.recorded_slices(conn, self.run.id), strict=True):
                part.position, part.finished = kept.position, kept.finished
            self.rewound = True
        if self.archive_file is not None:
            self.archive_file.stale = True

    def totals_with(self, references: dict[str, int]) -> dict[str, int]:
        """The run's foreign-key counts with a batch's not yet recorded (for its checkpoint)."""
        with self.lock:
            return dict(self.foreign_keys + Counter(references)) if references or self.foreign_keys else {}

    def fail(self, message: str) -> None:
        with self.lock:
            self.error = self.error or message
        self.stop.set()

    def new_sizer(self, leg: Leg) -> BatchSizer:
        rows = self.throttle.first_batch_rows(self.options.batch_size or DEFAULT_BATCH_ROWS)
        strategy = leg.strategy
        return BatchSizer(strategy.units_for_rows(rows, leg.plan.facts), strategy.max_units,
                          self.options.target_batch_ms / 1000, self.options.batch_size,
                          strategy.units_are_rows)

    def batch_size(self, leg: Leg, sizer: BatchSizer) -> int:
        """The sizer's choice, capped so a ``max_rows`` budget is not overshot by much."""
        if self.options.max_rows is None:
            return sizer.size
        remaining = max(1, self.options.max_rows - self.deleted)
        return min(sizer.size, leg.strategy.units_for_rows(remaining, leg.plan.facts))

    def prepared(self, conn: Connection) -> Connection:
        """A worker's connection, with its session temp table when rows go to a file."""
        if self.archive_file is not None:
            archive_file.prepare(conn, self.options.table)
        return conn

    @property
    def params(self) -> dict[str, Any]:
        return {"cutoff": next(iter(self.legs.values())).plan.cutoff, "run_id": self.run.id}

    @property
    def settings(self) -> dict[str, str | None]:
        return {"lock_timeout": f"{self.options.lock_timeout_ms}ms",
                "statement_timeout": f"{self.options.statement_timeout_ms}ms",
                "synchronous_commit": "off" if self.options.async_commit else None}


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
                leg = walk.leg(part)
                outcome = leg.strategy.run_batch(conn, leg.statements, part, walk.batch_size(leg, sizer),
                                                 walk.params, skip_locked)
                reached = Slice(outcome.position, part.end, outcome.finished, part.leaf, part.strategy)
                runs.checkpoint(conn, walk.run.id, index, reached, outcome.deleted, outcome.skipped_locked,
                                turn.append(conn) if turn else None, walk.totals_with(outcome.references),
                                walk.live())
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
        except pg_errors.ForeignKeyViolation:
            # a child row arrived between the batch's NOT EXISTS test and its end: the next
            # attempt's statement sees it and keeps the parent
            locked_retries += 1
            if locked_retries > LOCKED_TABLE_RETRIES:
                raise
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
    """A worker's connection, made again with backoff after the server went away (or made the
    first time for a helper: a connection lost before its first batch is no different); the
    lock holder takes its lock back."""
    deadline = time.monotonic() + RECONNECT_WINDOW_S
    delay = 0.5
    while True:
        try:
            return _ready(walk, connect(walk.dsn), holds_lock)
        except (DatabaseUnreachable, psycopg.OperationalError):
            if time.monotonic() + delay > deadline or walk.stop.is_set():
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _ready(walk: Walk, conn: Connection, holds_lock: bool) -> Connection:
    """The table lock taken back (the lock holder) and the session prepared, or closed."""
    try:
        if holds_lock and not runs.try_lock_table(conn, walk.oid):
            raise GcAlreadyRunning("lost the table lock while reconnecting: another GC took over")
        return walk.prepared(conn)
    except BaseException:
        conn.close()
        raise


def work(link: Link, walk: Walk, todo: queue.SimpleQueue[int]) -> None:
    """A worker: takes slices from the queue and walks each to its end or to the budget."""
    sizers: dict[tuple[str | None, str | None], BatchSizer] = {}
    while True:
        try:
            index = todo.get_nowait()
        except queue.Empty:
            return
        part = walk.run.slices[index]
        walked_as = (part.leaf, part.strategy)
        if walked_as not in sizers:
            sizers[walked_as] = walk.new_sizer(walk.leg(part))
        sizer = sizers[walked_as]
        while not part.done:
            if (reason := walk.budget_reason()) is not None:
                with walk.lock:
                    walk.stop_reason = walk.stop_reason or reason
                return
            if (drop := walk.take_drop(part)) is not None:
                try:
                    rows = drop(link.conn)
                except psycopg.OperationalError:
                    link.conn.close()
                    link.conn = reconnect(walk, link.holds_lock)
                    walk.rewind(link.conn)
                    rows = drop.resumed(link.conn)  # what of it committed, seen through
                if rows is not None:
                    walk.record_drop(str(part.leaf), rows)
                    continue
            try:
                walk.throttle.wait(link.conn, lambda: walk.budget_reason() is not None, walk.stop.wait)
                began = time.monotonic()
                outcome = run_batch(link.conn, walk, index, part, sizer)
                seconds = time.monotonic() - began
                cost = walk.throttle.batch_cost(link.conn, outcome.deleted,  # None without a guard
                                                walk.leg(part).plan.facts.garbage_per_block)
            except psycopg.OperationalError:
                link.conn.close()
                link.conn = reconnect(walk, link.holds_lock)
                walk.rewind(link.conn)
                continue
            part.position, part.finished = outcome.position, outcome.finished
            sizer.observe(seconds, outcome.deleted + outcome.skipped_locked, cost,
                          walk.throttle.batch_cost_cap())
            walk.record(part, outcome, seconds)
            if walk.options.sleep:
                walk.stop.wait(walk.options.sleep)


def guarded(walk: Walk, action: Callable[[], None]) -> None:
    """Run a part of the walk; any error stops the whole walk and becomes the run's failure."""
    try:
        action()
    except MsggcError as exc:
        walk.fail(str(exc))
    except psycopg.Error as exc:  # the server's line, its DETAIL/HINT where they help, no CONTEXT
        walk.fail(f"database error: {primary_message(exc)}{helpful_lines(exc)}")
    except Exception as exc:
        log.exception("run %s: a worker crashed", walk.run.id)
        walk.fail(f"internal error: {type(exc).__name__}: {exc}".strip())


def _helper(walk: Walk, todo: queue.SimpleQueue[int]) -> None:
    link = Link(reconnect(walk, holds_lock=False), holds_lock=False)
    try:
        work(link, walk, todo)
    finally:
        link.conn.close()


def walk_run(conn: Connection, walk: Walk) -> Connection:
    """Run the workers until every slice is done or the run stops; a rewind after a server
    restart may reopen slices that workers had already left, so they are walked again. A walk
    that reached its end is followed by its sweep (see :func:`_add_sweeps`). Returns the live
    connection of the lock holder (a reconnect may have replaced ``conn``)."""
    while True:
        walk.rewound = False
        conn = _run_workers(conn, walk)
        if walk.error or walk.stop_reason:
            return conn
        if not walk.walked_to_end:
            if walk.rewound:
                continue
            return conn
        conn, more = _more_to_walk(conn, walk)
        if not more:
            return conn


def _more_to_walk(conn: Connection, walk: Walk) -> tuple[Connection, bool]:
    """After every slice is done: the lock holder's live connection, and whether the walk must
    go on (see :func:`_sweep_or_rewind`); an error fails the walk like any worker's."""
    link = Link(conn, holds_lock=True)
    more: list[bool] = []
    guarded(walk, lambda: more.append(_sweep_or_rewind(link, walk)))
    return link.conn, any(more)


def _sweep_or_rewind(link: Link, walk: Walk) -> bool:
    """Whether the walk has more to do: its sweep, or (the connection lost after the last
    batch) the batches the server did not keep."""
    try:
        return _add_sweeps(link.conn, walk)
    except psycopg.OperationalError:
        link.conn.close()
        link.conn = reconnect(walk, holds_lock=True)
        walk.rewind(link.conn)
        return True


def _add_sweeps(conn: Connection, walk: Walk) -> bool:
    """The sweep, once per walk: the keys of the garbage still there, read in one statement per
    leg, become a slice deleted by key. A heap walk needs it: a garbage row the application
    updates gets a new version wherever the free space map says, maybe in blocks already walked.
    A walk resumed from an earlier run needs it on every leg: that run left garbage behind it
    that appeared after it had passed. So does every leaf of a partitioned table: an update of
    the partition key moves a row into another leaf, maybe one walked already. A key walk of a
    plain table starting afresh does not: keys do not move."""
    if any(part.strategy == SWEEP for part in walk.run.slices):
        return False
    added = False
    for leaf, leg in walk.legs.items():
        moves = leaf is not None or walk.run.continues or leg.strategy.name == "physical"
        if leaf in walk.dropped or not moves:
            continue
        retried = walk.skipped_by_leaf[leaf]  # rows left locked are read again: no longer skipped
        with conn.transaction():
            conn.execute(SET_SWEEP_SETTINGS, walk.settings)
            rows = conn.execute(leg.statements.fill_sweep, {**walk.params, "leaf": leaf or ""}).rowcount
            part = Slice(0, rows, leaf=leaf, strategy=SWEEP)
            runs.add_sweep(conn, walk.run.id, part if rows else None, retried)
        with walk.lock:
            walk.skipped -= retried
            walk.skipped_by_leaf[leaf] = 0
            if rows:
                walk.run.slices.append(part)
        added = added or rows > 0
    return added


def _run_workers(conn: Connection, walk: Walk) -> Connection:
    """One pass of the workers; the calling connection (which holds the table lock) is worker 0."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index, part in enumerate(walk.run.slices):
        if not part.done:
            todo.put(index)
    helpers = [threading.Thread(target=guarded, args=(walk, lambda: _helper(walk, todo)), daemon=True)
               for _ in range(min(walk.options.worker_count, len(walk.run.slices)) - 1)]
    link = Link(conn, holds_lock=True)

    def lead() -> None:
        walk.throttle.start(link.conn, max(0, walk.garbage_estimate - walk.deleted))
        for thread in helpers:
            thread.start()
        work(link, walk, todo)

    try:
        guarded(walk, lead)
    finally:
        for thread in helpers:
            if thread.ident is not None:
                thread.join()
    return link.conn
