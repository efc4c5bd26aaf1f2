"""What a run reports: its progress while it walks and its result at the end."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.config import StrategyName
from engine.status import RunStatus

EXIT_CODES = {RunStatus.COMPLETE: 0, RunStatus.DRY_RUN: 0, RunStatus.STOPPED: 3}
"""The CLI's exit code per status; any other status (failed) exits 1."""


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

    status: RunStatus
    strategy: StrategyName
    reason: str
    garbage_estimate: int
    rows_estimate: int
    run_id: int | None = None
    resumed_from: int | None = None
    workers: int = 1
    """The workers the run walked with (``--workers auto``: the planner's choice)."""
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
    app_latency_budget_ms: float | None = None
    """``--max-app-latency``: the latency guard's budget (None: no guard, no probe)."""
    app_latency_budget_measured_again_from_ms: float | None = None
    """An ``auto`` budget the application alone was over before the run wrote: the budget it was,
    before being measured again from those commits (``app_latency_budget_ms`` is the new one)."""
    app_latency_p50_ms: float | None = None
    app_latency_p99_ms: float | None = None
    """The probe's commit latency over the run: what an application's commit felt beside it."""
    app_probes: int = 0
    app_waits: dict[str, int] = field(default_factory=dict)
    """Other backends seen waiting (per wait event) in the probe's ``pg_stat_activity`` samples."""
    held_back_s: float = 0.0
    """Seconds the latency guard paused workers (part of ``throttled_s``)."""
    rate_share_min: float | None = None
    """The lowest share of time the guard let the workers spend in batches (1.0: never slowed)."""
    rate_decreases: int = 0
    app_latency_before_p99_ms: float | None = None
    """The probe's p99 before the workers started (a dry run: while nothing of msggc's ran):
    what the application's commits felt without the run."""
    guard_futile_steps: int = 0
    """Control steps over the budget in which the guard did not slow down, three halvings in a
    row having left the probe's p99 as high: the latency was not the run's doing."""
    guard_rate_min_bytes_per_s: int | None = None
    """The lowest WAL rate the guard granted (bytes per second)."""
    checkpoints_requested: int | None = None
    """Checkpoints the server requested (not its timer's) while the guard watched the run."""
    backend_writes: int | None = None
    """Buffers written by client backends themselves while the guard watched (dirty pages evicted
    by a backend, not the background writer): ``pg_stat_io`` from 16, ``buffers_backend`` before."""
    guard_series: list[dict[str, Any]] = field(default_factory=list)
    """Per control step (merged in pairs on a long run): seconds since the probe began, the WAL
    rate granted, the probe's p99, the WAL rate written, checkpoints and backend writes since."""
    budget_verdict: str | None = None
    """A dry run with ``--max-app-latency``: whether the budget can hold, and why not."""
    predicted_guarded_seconds: float | None = None
    """A dry run with ``--max-app-latency``: the predicted duration under the budget."""
    predicted_guarded_wal_rate: float | None = None
    """The WAL rate (bytes per second) that prediction assumes the guard settles at."""
    reclaim: dict[str, Any] | None = None
    """Sizes and dead tuples before and after the run; with ``--vacuum``, after VACUUM and its
    ``vacuum_s``, or ``vacuum_skipped`` and why (see :func:`engine.reclaim.vacuum`)."""
    garbage: str | None = None
    """The garbage predicate in force (processed column and ``--where``)."""
    foreign_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per foreign key onto the table: its child, action, and the rows it kept or changed."""
    checkpoint_advice: dict[str, Any] | None = None
    """A dry run whose predicted WAL forces checkpoints: how many, and the settings that avoid them."""
    partitioning_advice: dict[str, Any] | None = None
    """A plain table's dry run: the days (by arrival) wholly garbage a daily partitioning would drop."""
    partitions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """A partitioned table's leaves: how each was walked (or planned) and its rows deleted."""
    kept_referenced: dict[str, int] = field(default_factory=dict)
    """Per NO ACTION/RESTRICT foreign key: garbage rows left because a child row references them."""
    predicted_seconds: float | None = None
    predicted_wal_bytes: int | None = None
    compaction: dict[str, Any] | None = None
    """A dry run of ``--strategy compact``: the conditions checked (and the refusals), the live rows
    to copy, the predicted seconds, WAL and disk from a sample copy, and the walk's prediction."""

    @property
    def rows_per_s(self) -> float:
        return self.messages_deleted / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def vacuum_skipped(self) -> str | None:
        """Why ``--vacuum`` did not vacuum (the role may not), as ``reclaim`` records it."""
        return (self.reclaim or {}).get("vacuum_skipped")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 1)}


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
