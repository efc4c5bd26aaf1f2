"""Health-aware throttling: before a batch, wait while the server is under pressure.

Four signals, each optional: the server's WAL against a rate budget (a token bucket, so bursts
average out, holding at most ``WAL_BURST_S`` of unused budget), the replay lag of the slowest
standby in ``pg_stat_replication``, autovacuum (or any VACUUM) working on the table, and the
latency guard (:mod:`engine.guard`): a probe's commit latency against a budget, turned into the
share of its time each worker may spend in batches (it pauses after each batch for the rest).

Seeing other backends' progress and replication lag needs ``pg_read_all_stats`` (or superuser):
without it PostgreSQL hides those columns and the lag and vacuum signals never fire.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from engine.db import Connection, one_row
from engine.guard import Probe, ProbeSite

POLL_S = 0.2
APP_LATENCY = "app_latency"
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

    @property
    def active(self) -> bool:
        return bool(self.max_wal_rate or self.max_replica_lag or self.pause_for_vacuum
                    or self.max_app_latency_ms)


class Throttle:
    """Shared by a run's workers; ``pauses`` and ``paused_s`` are reported with the run."""

    def __init__(self, limits: Limits, table_oid: int, probe_site: ProbeSite | None = None) -> None:
        self.limits = limits
        self.table_oid = table_oid
        self.probe = (Probe(limits.max_app_latency_ms, probe_site)
                      if limits.max_app_latency_ms and probe_site else None)
        self.held_back_s = 0.0
        """Seconds the latency guard held workers back (also counted in ``paused_s``)."""
        self._batch_began: dict[int, float] = {}
        """Per worker thread: when its batch in flight (or its last one) began."""
        self._probe_started = False
        self.lock = threading.Lock()
        self.pauses = 0
        self.paused_s = 0.0
        self._wal_credit = 0.0
        """Bytes of WAL the run may still write now; negative when it must wait."""
        self._wal_seen: tuple[float, int] | None = None
        """(monotonic time, WAL position) when the credit was last brought up to date."""
        self._reasons: dict[str, int] = {}

    @property
    def reasons(self) -> dict[str, int]:
        return dict(self._reasons)

    def _wal_lsn(self, conn: Connection) -> int:
        return int(one_row(conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"))[0])

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

    def start(self, conn: Connection) -> None:
        """Begin metering WAL here: what the server wrote before the run is not charged to it;
        the latency probe starts with the first pass of the workers and runs until :meth:`stop`."""
        self._batch_began.clear()  # a new pass: thread ids may be reused
        if self.probe is not None and not self._probe_started:
            self._probe_started = True
            self.probe.start()
        if self.limits.max_wal_rate:
            lsn = self._wal_lsn(conn)
            with self.lock:
                self._wal_credit = 0.0
                self._wal_seen = (time.monotonic(), lsn)

    def stop(self) -> None:
        """End the latency probe (its connection closed, the run's figures recorded)."""
        if self.probe is not None:
            with self.lock:
                self.probe.held_back_s = self.held_back_s
            self.probe.stop()

    def report(self) -> dict[str, Any]:
        """The latency guard's figures for the run's result (none without a guard)."""
        return self.probe.report() if self.probe is not None else {}

    def _held_back_s(self, worked_s: float, since: float) -> float:
        """Seconds this worker still owes the latency guard after working ``worked_s``."""
        if self.probe is None:
            return 0.0
        return self.probe.pause_after(worked_s) - (time.monotonic() - since)

    def pressure(self, conn: Connection, worked_s: float = 0.0,
                 since: float | None = None) -> tuple[str, float] | None:
        """The reason to wait and for how long, or None when the batch may go; ``worked_s`` is
        how long the worker's last batch took, ``since`` when it began waiting after it."""
        if (owed := self._held_back_s(worked_s, time.monotonic() if since is None else since)) > 0:
            return APP_LATENCY, min(owed, POLL_S)
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
        since = time.monotonic()
        worked = since - self._batch_began.get(worker, since)
        reasons: set[str] = set()
        while not interrupted() and (pressure := self.pressure(conn, worked, since)) is not None:
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
                if reason == APP_LATENCY:
                    self.held_back_s += slept
                    if self.probe is not None:
                        self.probe.held_back_s = self.held_back_s
        self._batch_began[worker] = time.monotonic()
