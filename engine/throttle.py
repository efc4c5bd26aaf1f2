"""Health-aware throttling: before a batch, wait while the server is under pressure.

Three signals, each optional: the WAL written since the run began against a rate budget
(a token bucket, so bursts average out), the replay lag of the slowest standby in
``pg_stat_replication``, and autovacuum (or any VACUUM) working on the table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from engine.db import Connection

POLL_S = 0.2
MAX_PAUSE_S = 5.0
"""A single wait is capped so budgets and signals are still honoured while throttled."""


@dataclass(frozen=True)
class Limits:
    max_wal_rate: float | None = None
    """Bytes of WAL per second, server-wide, averaged since the run began."""
    max_replica_lag: timedelta | None = None
    pause_for_vacuum: bool = False

    @property
    def active(self) -> bool:
        return bool(self.max_wal_rate or self.max_replica_lag or self.pause_for_vacuum)


class Throttle:
    """Shared by a run's workers; ``pauses`` and ``paused_s`` are reported with the run."""

    def __init__(self, limits: Limits, table_oid: int) -> None:
        self.limits = limits
        self.table_oid = table_oid
        self.lock = threading.Lock()
        self.pauses = 0
        self.paused_s = 0.0
        self._start_lsn: int | None = None
        self._started = time.monotonic()
        self._reasons: dict[str, int] = {}

    @property
    def reasons(self) -> dict[str, int]:
        return dict(self._reasons)

    def _wal_lsn(self, conn: Connection) -> int:
        return conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()[0]

    def _wal_excess_s(self, conn: Connection) -> float:
        """Seconds to wait so the WAL written since the start fits the rate budget."""
        if not self.limits.max_wal_rate:
            return 0.0
        written = self._wal_lsn(conn) - (self._start_lsn or 0)
        allowed_at = written / self.limits.max_wal_rate
        return max(0.0, allowed_at - (time.monotonic() - self._started))

    def _replica_lagging(self, conn: Connection) -> bool:
        if not self.limits.max_replica_lag:
            return False
        lag = conn.execute(
            "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0) FROM pg_stat_replication"
        ).fetchone()[0]
        return float(lag) > self.limits.max_replica_lag.total_seconds()

    def _vacuum_running(self, conn: Connection) -> bool:
        if not self.limits.pause_for_vacuum:
            return False
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_vacuum WHERE relid = %s)", (self.table_oid,)
        ).fetchone()
        return bool(row[0])

    def start(self, conn: Connection) -> None:
        if self.limits.max_wal_rate:
            self._start_lsn = self._wal_lsn(conn)
        self._started = time.monotonic()

    def pressure(self, conn: Connection) -> tuple[str, float] | None:
        """The reason to wait and for how long, or None when the batch may go."""
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
        counted = False
        while not interrupted() and (pressure := self.pressure(conn)) is not None:
            reason, seconds = pressure
            began = time.monotonic()
            sleep(seconds)
            with self.lock:
                if not counted:
                    self.pauses += 1
                    self._reasons[reason] = self._reasons.get(reason, 0) + 1
                    counted = True
                self.paused_s += time.monotonic() - began
