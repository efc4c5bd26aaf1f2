"""Health-aware throttling: before a batch, wait while the server is under pressure.

Four signals, each optional: the server's WAL against a rate budget (a token bucket, so bursts
average out, holding at most ``WAL_BURST_S`` of unused budget), the replay lag of the slowest
standby in ``pg_stat_replication``, autovacuum (or any VACUUM) working on the table, and the
latency guard (:mod:`engine.guard`): a probe's commit latency against a budget, turned into a
WAL rate that the same token bucket holds every worker to (with at most ``GUARD_BURST_S`` of it
banked, and each batch's WAL bounded to ``BATCH_PACE_S`` of it, so the rate arrives as a stream
of small batches, not as a burst that the application's commits queue behind). A guarded run
is also paced so that its WAL forces no checkpoint: the headroom left before ``max_wal_size``
forces one, spread over the time until the timed one (see :meth:`Throttle.checkpoint_pace`),
and its dirtied pages so that they do not outrun the server's cleaning (:mod:`engine.cleaning`).

Seeing other backends' progress and replication lag needs ``pg_read_all_stats`` (or superuser):
without it PostgreSQL hides those columns and the lag and vacuum signals never fire.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from engine.baseline import auto_budget_ms
from engine.cleaning import DirtyBucket, read_cleaning_pace
from engine.db import Connection, one_row
from engine.guard import Probe
from engine.probe_record import ProbeSite
from engine.rate_control import MIN_RATE

POLL_S = 0.2
APP_LATENCY = "app_latency"
CHECKPOINT_PACE = "checkpoint_pace"
CLEANING_PACE = "cleaning_pace"
GUARD_REASONS = (APP_LATENCY, CHECKPOINT_PACE, CLEANING_PACE)
"""Waits counted as the guard holding the run back."""
GUARD_BURST_S = 0.1
"""A guarded run banks at most this much of its rate: it never writes a second's worth at once."""
BATCH_PACE_S = 0.05
"""A guarded batch writes at most this many seconds of the granted rate (at least
``MIN_BATCH_WAL``): one batch cannot queue a burst of flushing ahead of the application."""
MIN_BATCH_WAL = 64 * 1024
BLOCK_BYTES = 8192
"""A heap page (PostgreSQL's default ``block_size``): what one dirtied page costs to write out."""
FIRST_BATCH_ROWS = 50
PACE_REFRESH_S = 1.0
"""How often the checkpoint pace reads the server's last checkpoint again."""
TIMED_SEEN_S = 2.0
"""A timed checkpoint seen this soon after it is due is taken to start now (see ``_timed_start``)."""
MAX_PAUSE_S = 5.0
"""A single wait is capped so budgets and signals are still honoured while throttled."""
WAL_BURST_S = 1.0
"""Seconds of WAL budget a run may bank while it writes less (or waits on another signal).

Without a cap, a run held for a minute by replica lag or a VACUUM would then write a minute's
worth of WAL at full speed: the very burst the budget exists to prevent.
"""

REPLICA_LAG_SQL = """
SELECT coalesce(max(CASE WHEN replay_lsn >= pg_current_wal_lsn() THEN 0
                         ELSE extract(epoch FROM replay_lag) END), 0)
FROM pg_stat_replication
"""
"""The slowest standby's replay lag in seconds; 0 for a standby that replayed all the WAL there is.

``replay_lag`` alone is not enough: it is the delay measured for the last WAL the standby
confirmed replaying, so when a stalled standby catches up it reports how late that WAL was, and
keeps showing it until the standby's next status reply (every ``wal_receiver_status_interval``,
10s by default). ``replay_lsn`` does not go stale that way: a standby that has replayed all it
received reports its position at once (``WalRcvForceReply``), so a caught-up standby counts as 0.
Measured on a real standby after ``pg_wal_replay_resume()``: ``replay_lag`` still showed 4.1s for
8s with nothing left to replay, and a run limited to 1s stayed paused 9.7s after the standby had
caught up (0.2s with this query). Walsenders that replay nothing (pg_basebackup, pg_receivewal)
have a NULL ``replay_lsn`` and ``replay_lag`` and count as 0.
"""


@dataclass(frozen=True)
class Limits:
    max_wal_rate: float | None = None
    """Bytes of WAL per second, server-wide, as a token bucket holding at most ``WAL_BURST_S``."""
    max_replica_lag: timedelta | None = None
    pause_for_vacuum: bool = False
    max_app_latency_ms: float | None = None
    """The probe's recent p99 commit latency the run keeps the application under."""
    latency_budget_auto: bool = False
    """That budget was measured before the run (``auto``): see :attr:`GcOptions.latency_budget_auto`."""

    @property
    def active(self) -> bool:
        return bool(self.max_wal_rate or self.max_replica_lag or self.pause_for_vacuum
                    or self.max_app_latency_ms)


CHECKPOINT_SQL = """
SELECT (redo_lsn - '0/0'::pg_lsn)::bigint, extract(epoch FROM now() - checkpoint_time)::float8,
       pg_size_bytes(current_setting('max_wal_size'))
         / (1 + current_setting('checkpoint_completion_target')::float8),
       extract(epoch FROM current_setting('checkpoint_timeout')::interval)::float8
FROM pg_control_checkpoint()
"""
"""Where the last checkpoint began (its redo), how long ago, the WAL after it that requests the
next one (PostgreSQL's ``CheckPointSegments``), and the timer's interval."""


@dataclass
class Pace:
    """The WAL rate that forces no checkpoint, as last read (see :meth:`Throttle.checkpoint_pace`)."""

    at: float = -math.inf
    rate: float | None = None
    refused: bool = False
    """``pg_control_checkpoint()`` refused to this role: no pace (the counts still show)."""
    timed: tuple[int, int | None] | None = None
    """A timed checkpoint in progress: the completed one's redo, and the WAL position when the
    run saw it start (None: seen too late to know)."""


class Throttle:
    """Shared by a run's workers; ``pauses`` and ``paused_s`` are reported with the run."""

    def __init__(self, limits: Limits, table_oid: int, probe_site: ProbeSite | None = None) -> None:
        self.limits = limits
        self.table_oid = table_oid
        self.probe = (Probe(limits.max_app_latency_ms, probe_site,
                            rebudget=auto_budget_ms if limits.latency_budget_auto else None)
                      if limits.max_app_latency_ms and probe_site else None)
        self.held_back_s = 0.0
        """Seconds the latency guard held workers back (also counted in ``paused_s``)."""
        self._batch_began: dict[int, float] = {}
        """Per worker thread: when its batch in flight (or its last one) began."""
        self._batch_lsn: dict[int, int] = {}
        """Per worker thread: the server's WAL position when its batch in flight began."""
        self._probe_started = False
        self.lock = threading.Lock()
        self.pauses = 0
        self.paused_s = 0.0
        self._wal_credit = 0.0
        """Bytes of WAL the run may still write now; negative when it must wait."""
        self._wal_seen: tuple[float, int] | None = None
        """(monotonic time, WAL position) when the credit was last brought up to date."""
        self._reasons: dict[str, int] = {}
        self._guard_credit = 0.0
        """Bytes of its own WAL the guard lets the run write now; negative when it must wait."""
        self._guard_seen: float | None = None
        self._decreases = 0
        """The guard's decreases already applied to the credit."""
        self._remaining_rows: int | None = None
        self._rows = 0
        self._own_wal = 0
        self._batch_cost = 0
        self._batch_s = 0.0
        self._pace = Pace()
        self._dirty: DirtyBucket | None = None
        """The pages a guarded run may dirty ahead of the server's cleaning (:mod:`engine.cleaning`)."""

    @property
    def reasons(self) -> dict[str, int]:
        return dict(self._reasons)

    def _wal_lsn(self, conn: Connection) -> int:
        return int(one_row(conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"))[0])

    def guard_rate(self, conn: Connection) -> tuple[float, str] | None:
        """The WAL rate the guard lets the run write now, and what sets it: the probe's
        controller, or the pace that forces no checkpoint (None without a guard)."""
        if self.probe is None:
            return None
        granted = (self.probe.rate(), APP_LATENCY)
        pace = self.checkpoint_pace(conn)
        return min(granted, (pace, CHECKPOINT_PACE)) if pace is not None else granted

    def checkpoint_pace(self, conn: Connection) -> float | None:
        """The rate that lets the run end without forcing a checkpoint: the WAL left before one
        is requested, spread over the time until the timer starts the next one; once a cycle's
        headroom is not enough, ``max_wal_size / (1 + completion target)`` per
        ``checkpoint_timeout``. None while the rest of the run (its rows still to delete, at the
        WAL per row written so far) fits in the headroom: then it forces none at any speed."""
        now = time.monotonic()
        with self.lock:
            if self._pace.refused or now - self._pace.at < PACE_REFRESH_S:
                return self._pace.rate
            self._pace.at = now
        try:
            redo, since, between, timeout = one_row(conn.execute(CHECKPOINT_SQL))
        except psycopg.errors.InsufficientPrivilege:
            if not conn.autocommit:
                conn.rollback()
            with self.lock:
                self._pace = Pace(now, None, refused=True)
            return None
        lsn = self._wal_lsn(conn)
        with self.lock:
            redo, since = self._timed_start(int(redo), float(since), float(timeout), lsn)
            headroom = between - (lsn - redo)
            remaining = self._remaining_wal()
            if remaining is None or remaining <= headroom:
                rate = None
            else:
                left = timeout - since
                rate = max(MIN_RATE, headroom / left if left > 1 and headroom > 0 else between / timeout)
            self._pace.rate = rate
            return rate

    def _timed_start(self, redo: int, since: float, timeout: float, lsn: int) -> tuple[int, float]:
        """The checkpoint a run must not outrun: ``pg_control_checkpoint()`` shows the last one
        completed, but a timed one starts ``checkpoint_timeout`` after it and takes its redo
        there while it spreads its writes (minutes): seen starting (within ``TIMED_SEEN_S``),
        its redo is the WAL position then, and the cycle's headroom counts from it."""
        if since < timeout:
            return redo, since
        if self._pace.timed is None or self._pace.timed[0] != redo:
            self._pace.timed = (redo, lsn) if since - timeout <= TIMED_SEEN_S else (redo, None)
        guess = self._pace.timed[1]
        return (redo, since) if guess is None else (guess, since - timeout)

    def _remaining_wal(self) -> float | None:
        """The WAL the rest of the run will write, from the WAL per row so far; None before a row."""
        if self._remaining_rows is None or self._rows <= 0:
            return None
        return self._own_wal / self._rows * max(0, self._remaining_rows - self._rows)

    def _wal_excess_s(self, conn: Connection) -> float:
        """Seconds to wait until the WAL written so far fits the rate budget (a token bucket)."""
        rate = self.limits.max_wal_rate
        if not rate:
            return 0.0
        lsn, now = self._wal_lsn(conn), time.monotonic()
        with self.lock:
            if self._wal_seen is None:
                self._wal_seen = (now, lsn)
            seen_at, seen_lsn = self._wal_seen
            if lsn >= seen_lsn:  # another worker may have read a newer position meanwhile
                self._wal_credit = min(rate * WAL_BURST_S, self._wal_credit + (now - seen_at) * rate)
                self._wal_credit -= lsn - seen_lsn
                self._wal_seen = (now, lsn)
            return max(0.0, -self._wal_credit / rate)

    def _guard_excess_s(self, conn: Connection) -> tuple[float, str]:
        """Seconds to wait until the run's own WAL (its batches', see :meth:`batch_cost`: not
        what the application writes between them) fits the guard's rate, and what set it; or
        until its dirtied pages fit the server's cleaning pace, if that is longer."""
        limit = self.guard_rate(conn)
        if limit is None:
            return 0.0, ""
        rate, reason = limit
        now = time.monotonic()
        with self.lock:
            if self.probe is not None and self.probe.decreases != self._decreases:
                self._decreases = self.probe.decreases  # slower now: nothing banked at the old rate
                self._guard_credit = min(0.0, self._guard_credit)
            seen = self._guard_seen if self._guard_seen is not None else now
            self._guard_credit = min(rate * GUARD_BURST_S, self._guard_credit + (now - seen) * rate)
            self._guard_seen = now
            waits = [(max(0.0, -self._guard_credit / rate), reason)]
            if self._dirty is not None:
                waits.append((self._dirty.wait_s(now), CLEANING_PACE))
            return max(waits)

    def _replica_lagging(self, conn: Connection) -> bool:
        if not self.limits.max_replica_lag:
            return False
        lag = one_row(conn.execute(REPLICA_LAG_SQL))[0]
        return float(lag) > self.limits.max_replica_lag.total_seconds()

    def _vacuum_running(self, conn: Connection) -> bool:
        if not self.limits.pause_for_vacuum:
            return False
        row = one_row(conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_vacuum WHERE relid = %s)", (self.table_oid,)
        ))
        return bool(row[0])

    def start(self, conn: Connection, remaining_rows: int | None = None) -> None:
        """Begin metering WAL here: what the server wrote before the run is not charged to it;
        the latency probe starts with the first pass of the workers, measures the application
        alone for a second before they start, and runs until :meth:`stop`. ``remaining_rows``
        (the garbage left to delete) lets the checkpoint pace judge whether the run needs it."""
        self._batch_began.clear()  # a new pass: thread ids may be reused
        self._batch_lsn.clear()
        if self.probe is not None and not self._probe_started:
            self._probe_started = True
            self.probe.start()
            self.probe.wait_ready()
        if self.limits.max_wal_rate or self.probe is not None:
            lsn = self._wal_lsn(conn)
            with self.lock:
                self._wal_credit = self._guard_credit = 0.0
                self._wal_seen = (time.monotonic(), lsn)
                self._guard_seen = None
                self._remaining_rows = remaining_rows
                self._own_wal = self._rows = 0
                self._pace = Pace()
        if self.probe is not None and self._dirty is None:  # once per run: passes share it
            self._dirty = DirtyBucket.full(read_cleaning_pace(conn), time.monotonic())

    def stop(self) -> None:
        """End the latency probe (its connection closed, the run's figures recorded)."""
        if self.probe is not None:
            with self.lock:
                self.probe.held_back_s = self.held_back_s
            self.probe.stop()

    def report(self) -> dict[str, Any]:
        """The latency guard's figures for the run's result (none without a guard)."""
        return self.probe.report() if self.probe is not None else {}

    def batch_cost(self, conn: Connection, rows: int, garbage_per_block: float | None = None) -> int | None:
        """After a worker's batch: what it cost, for the guard's bucket and for the sizer to
        bound the next one: the WAL the server wrote since it began (the batch's own, plus
        whatever other backends wrote meanwhile: an upper bound), or the pages it dirtied (one
        per ``garbage_per_block`` rows deleted, from the plan's sample) if more. Each dirty page
        is a block the server must write out later: a sparse delete writes ~100 bytes of WAL a
        row but dirties a whole 8 kB page for it, which a guard counting only WAL would let
        through at 80 times the rate. None without a guard (no query then)."""
        worker = threading.get_ident()
        if self.probe is None or (began := self._batch_lsn.get(worker)) is None:
            return None
        wal = max(0, self._wal_lsn(conn) - began)
        dirtied = math.ceil(rows / garbage_per_block) * BLOCK_BYTES if garbage_per_block else 0
        cost = max(wal, dirtied)
        seconds = time.monotonic() - self._batch_began.get(worker, time.monotonic())
        self.probe.charge(cost)
        with self.lock:
            self._guard_credit -= cost
            if self._dirty is not None:
                self._dirty.charge(dirtied or wal)  # no page count (an index walk): its WAL
            self._own_wal += wal
            self._rows += rows
            self._batch_cost += cost
            self._batch_s += seconds
            if self._batch_s > 0:
                self.probe.full_rate = self._batch_cost / self._batch_s
        return cost

    def first_batch_rows(self, rows: int) -> int:
        """A guarded walk starts with small batches (``FIRST_BATCH_ROWS``): their WAL per row is
        not known yet, and a sparse table's first 2,000 rows may write 15 MB at once."""
        return min(rows, FIRST_BATCH_ROWS) if self.probe is not None else rows

    def batch_cost_cap(self) -> int | None:
        """The most one batch may cost (its WAL, or its dirtied pages if more): ``BATCH_PACE_S``
        of the rate the guard grants."""
        if self.probe is None:
            return None
        return max(MIN_BATCH_WAL, round(self.probe.rate() * BATCH_PACE_S))

    def pressure(self, conn: Connection) -> tuple[str, float] | None:
        """The reason to wait and for how long, or None when the batch may go."""
        excess, reason = self._guard_excess_s(conn)
        if excess > 0:  # cut in steps: a lower rate applies from the next one
            return reason, min(excess, POLL_S)
        if (excess := self._wal_excess_s(conn)) > 0:
            return "wal_rate", min(excess, MAX_PAUSE_S)
        if self._replica_lagging(conn):
            return "replica_lag", POLL_S
        if self._vacuum_running(conn):
            return "vacuum", POLL_S
        return None

    def wait(self, conn: Connection, interrupted: Callable[[], bool],
             sleep: Callable[[float], object] = time.sleep) -> None:
        """Block in short steps until no limit is exceeded or the run must stop anyway."""
        if not self.limits.active:
            return
        worker = threading.get_ident()
        reasons: set[str] = set()
        while not interrupted() and (pressure := self.pressure(conn)) is not None:
            reason, seconds = pressure
            began = time.monotonic()
            sleep(seconds)
            with self.lock:
                if not reasons:
                    self.pauses += 1
                if reason not in reasons:  # one wait may be held by several signals in turn
                    reasons.add(reason)
                    self._reasons[reason] = self._reasons.get(reason, 0) + 1
                slept = time.monotonic() - began
                self.paused_s += slept
                if reason in GUARD_REASONS:
                    self.held_back_s += slept
                    if self.probe is not None:
                        self.probe.held_back_s = self.held_back_s
        if self.probe is not None:
            self._batch_lsn[worker] = self._wal_lsn(conn)
        self._batch_began[worker] = time.monotonic()
