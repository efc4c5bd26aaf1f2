"""The pace the server cleans dirty pages at, which a budgeted run does not outrun.

A run that dirties more heap than shared_buffers can hold leaves its dirty pages in the way of
the application's reads, which then write them out themselves (evictions) and wait for it; the
background writer cleans at most ``bgwriter_lru_maxpages`` per ``bgwriter_delay``. So a guarded
run's dirtied pages go through a token bucket (:class:`DirtyBucket`) that holds ``BURST_SHARE``
of shared_buffers and fills at that pace plus the ``EVICTING_FLOOR`` the guard lets backends
write: a run whose pages fit goes at the probe's rate, a larger one at the cleaning pace once its
burst is spent, from its first seconds (the probe's halvings found that pace anyway, but only
after slow start had dirtied ~100 MB/s for a few seconds: PostgreSQL 15, 10M dense). The dry run
predicts the same floor (:class:`CleaningPace`).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.db import Connection, one_row
from engine.guard import EVICTING_FLOOR
from engine.rate_control import MiB

BURST_SHARE = 0.5
"""The share of shared_buffers a guarded run may dirty ahead of the cleaning pace."""

SETTINGS_SQL = (
    "SELECT current_setting('block_size')::int, pg_size_bytes(current_setting('shared_buffers')),"
    " current_setting('bgwriter_lru_maxpages')::int,"
    " extract(epoch FROM current_setting('bgwriter_delay')::interval)::float8")


@dataclass(frozen=True)
class CleaningPace:
    """The heap a run dirties against the server's shared_buffers and cleaning pace. Measured
    (shared_buffers 128 MB, defaults, 10M rows, budget 2x beside pgbench, BENCHMARKS.md): dense
    485 s against 480 s predicted, aged 400 against 394, sparse 165 against 171 on PostgreSQL
    15, dense 486 against 480 on 18, pgbench's p99 at 0.47-0.60 of the budget; one ``DELETE``
    took 1-6 s."""

    dirtied_bytes: float
    shared_buffers_bytes: float
    clean_bytes_per_s: float

    @property
    def burst_bytes(self) -> float:
        return self.shared_buffers_bytes * BURST_SHARE

    @property
    def floor_seconds(self) -> float | None:
        """The least time the run takes at that pace (None: its pages fit in its burst)."""
        excess = self.dirtied_bytes - self.burst_bytes
        return excess / self.clean_bytes_per_s if excess > 0 else None

    def describe(self) -> str:
        return (f"; this run dirties ~{self.dirtied_bytes / MiB:,.0f} MB of heap, more than half of"
                f" shared_buffers ({self.shared_buffers_bytes / MiB:,.0f} MB): the guard holds it to the"
                f" pace the server cleans pages at (~{self.clean_bytes_per_s / MiB:.1f} MB/s), at least"
                f" {self.floor_seconds or 0:,.0f} s (raise bgwriter_lru_maxpages or shared_buffers, or run"
                " without a budget at a quiet hour)")


def cleaning_pace(dirtied_bytes: float, shared_buffers_bytes: float, block_bytes: int,
                  lru_maxpages: int, bgwriter_delay_s: float) -> CleaningPace:
    """The pace from the server's settings (see :class:`CleaningPace`)."""
    pages_per_s = lru_maxpages / bgwriter_delay_s + EVICTING_FLOOR
    return CleaningPace(dirtied_bytes, shared_buffers_bytes, pages_per_s * block_bytes)


def read_cleaning_pace(conn: Connection, dirtied_pages: float = 0.0) -> CleaningPace:
    """The pace from this server's settings, for a run dirtying ``dirtied_pages`` heap pages."""
    block, buffers, lru_maxpages, delay = one_row(conn.execute(SETTINGS_SQL))
    block = int(block)
    return cleaning_pace(dirtied_pages * block, float(buffers), block, int(lru_maxpages), float(delay))


@dataclass
class DirtyBucket:
    """Bytes of pages a run may dirty now: starts with the burst, refills at the cleaning pace,
    never holds more than the burst; negative when the run must wait. Not thread-safe: the
    throttle holds its lock."""

    pace: CleaningPace
    credit: float
    seen: float

    @classmethod
    def full(cls, pace: CleaningPace, now: float) -> DirtyBucket:
        return cls(pace, pace.burst_bytes, now)

    def wait_s(self, now: float) -> float:
        """Seconds until the pages dirtied so far are cleaned down to the burst."""
        rate = self.pace.clean_bytes_per_s
        self.credit = min(self.pace.burst_bytes, self.credit + (now - self.seen) * rate)
        self.seen = now
        return max(0.0, -self.credit / rate)

    def charge(self, dirtied_bytes: float) -> None:
        self.credit -= dirtied_bytes
