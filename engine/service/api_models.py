"""Pydantic models of the HTTP API: the request body, and every answer for the OpenAPI schema.

The answers themselves are built by :mod:`engine.service.contract` (the seed's bodies, key order kept);
these models describe them, so ``/openapi.json`` documents exactly what the service sends.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from engine.config import parse_duration
from engine.errors import MsggcError

T = TypeVar("T")


def _duration(value: Any) -> Any:
    """``"30d"``, ``"12h"``, ``"90s"`` or a number of seconds, never negative."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30d, 12h, 90s or a number of seconds")
    try:
        if isinstance(value, str):
            return parse_duration(value)
    except MsggcError as exc:
        raise ValueError(str(exc)) from None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        try:
            return timedelta(seconds=value)
        except (OverflowError, ValueError):  # inf, nan, or beyond timedelta's range
            raise ValueError("must be a finite, reasonable number of seconds") from None
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^\d+(\.\d+)?[smhdw]?$"},
                              {"type": "number", "minimum": 0}],
                    "examples": ["30d", 3600]}),
]



def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than zero")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


class GcRequest(BaseModel):
    """Optional body of the PUT: a budget and a retention for this run; omitted keys take the
    configured defaults. A PUT that joins a GC already running does not change its budget."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"max_seconds": 600, "older_than": "30d"}]})

    strategy: Literal["auto", "physical", "index", "key", "compact"] | None = Field(
        None, description="How to collect: a walk (auto: the planner's choice), or compact (copy the live"
                          " rows into a new table and swap it in; refused where a rename cannot carry the"
                          " table).")
    max_seconds: float | None = Field(None, gt=0, allow_inf_nan=False,
                                      description="Stop after this many seconds (resumable).")
    max_rows: int | None = Field(None, ge=1, description="Stop after about this many deleted rows.")
    older_than: Duration | None = Field(
        None, description="Only messages processed longer ago than this: 30d, 12h, 90s or seconds.")
    archive: bool | None = Field(None, description="Move deleted rows to messages_archive (restorable).")
    archive_to_file: bool | None = Field(
        None, description="Stream deleted rows with COPY into a gzip CSV file in the service's archive_dir,"
                          " one file per run (restorable with `msggc restore --file`).")
    vacuum: bool | None = Field(None, description="VACUUM (ANALYZE) the table after the run.")
    async_commit: bool | None = Field(None, description="Batch commits skip the WAL flush wait.")
    max_wal_rate: int | None = Field(None, gt=0, le=2**40,
                                     description="Pause batches beyond this many WAL bytes per second.")
    max_replica_lag: PositiveDuration | None = Field(None, description="Pause while a standby lags more.")
    pause_for_vacuum: bool | None = Field(None, description="Pause while (auto)vacuum works on the table.")
    max_app_latency_ms: float | None = Field(
        None, gt=0, le=60_000, allow_inf_nan=False,
        description="Slow down while a probe's commit latency (recent p99, ms) exceeds this.")

    def overrides(self) -> dict[str, Any]:
        """Only the keys the client sent: an explicit ``null`` lifts the default budget."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class Meta(BaseModel):
    api_status: Literal["stable"]
    version: str


class ErrorEntry(BaseModel):
    code: int = Field(description="1014 Internal error (the seed's); 1005, 1006, 1009, 1025 for requests")
    title: str
    details: str


class ErrorAnswer(BaseModel):
    """An HTTP error: the seed's single-instance error shape."""

    meta: Meta
    errors: list[ErrorEntry]


class Processing(BaseModel):
    status: Literal["processing"]


class NodeFailure(BaseModel):
    """A multiconnect node that could not be reached or used; the others go on."""

    errors: list[ErrorEntry]


class GcOf(BaseModel, Generic[T]):
    gc: T


class MessageOf(BaseModel, Generic[T]):
    message: GcOf[T]


class AnswerOf(BaseModel, Generic[T]):
    services: MessageOf[T]
    meta: Meta


class SingleStartAnswer(AnswerOf[Processing]):
    """Single instance: the GC is queued, or already running and joined."""


class MultiStartAnswer(AnswerOf[dict[str, Processing | NodeFailure]]):
    """Multiconnect: one key per configured node."""


StoredStatus = Literal["queued", "running", "stopped", "complete", "failed", "superseded"]
"""engine.status.RunStatus's stored values (a unit test keeps them equal): OpenAPI lists them."""
WorkerState = Literal["running", "stopped", "disabled"]


class GuardPoint(BaseModel):
    """One control step of the latency guard."""

    t_s: float = Field(description="Seconds since the probe began.")
    rate_bytes_per_s: float | None = Field(default=None, description="WAL rate the guard granted.")
    p99_ms: float | None = Field(default=None, description="The probe's commit p99 over the step.")
    wal_bytes_per_s: float | None = Field(default=None, description="WAL rate the server wrote.")
    checkpoints_requested: int | None = Field(default=None, description="Requested since the run began.")
    backend_writes: int | None = Field(
        default=None, description="Buffers written by client backends since the run began.")


class AutoBaseline(BaseModel):
    """What an ``auto`` latency budget came from (:meth:`engine.baseline.Baseline.describe`)."""

    model_config = ConfigDict(extra="allow")

    p99_ms: float = Field(description="The probe's commit p99 before the run (the application alone).")
    p50_ms: float | None = None
    samples: int | None = None
    seconds: float | None = None
    factor: float | None = Field(default=None, description="budget = factor x p99 ...")
    floor_ms: float | None = Field(default=None, description="... never under this.")
    budget_ms: float | None = None


class LatestRun(BaseModel):
    """The newest run of a node (beyond the seed)."""

    status: Literal["idle"] | StoredStatus
    run_id: int | None = None
    messages_deleted: int = 0
    rows_per_s: float | None = None
    batches: int = 0
    requested_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    error: str | None = None
    throttle_pauses: int = 0
    throttled_seconds: float = 0.0
    app_latency_budget_ms: float | None = Field(
        default=None, description="The latency budget the run goes by: the number set, or the one"
        " `auto` resolved to (null while an `auto` budget is not measured yet, or without a budget).")
    app_latency_auto: bool = Field(default=False, description="The budget is `auto`: measured before"
                                   " the run (see app_latency_baseline).")
    app_latency_baseline: AutoBaseline | None = Field(
        default=None, description="`auto`: the probe's commit latency before the run that the budget"
        " was made of.")
    app_latency_p50_ms: float | None = Field(
        default=None, description="--max-app-latency: the probe's commit latency over the run (p50).")
    app_latency_p99_ms: float | None = Field(default=None, description="The same, p99.")
    held_back_seconds: float = Field(default=0.0, description="Time the latency guard paused the run.")
    app_latency_before_p99_ms: float | None = Field(
        default=None, description="--max-app-latency: the probe's p99 in the second before the run"
        " (the application alone).")
    guard_series: list[GuardPoint] | None = Field(
        default=None, description="--max-app-latency: the guard's time series, one point per control"
        " step (pairs merged on a long run), written every few steps while the run goes and whole at"
        " its end.")
    reclaim: dict[str, Any] | None = Field(default=None, description="Sizes and dead tuples before, after.")
    garbage: str | None = Field(default=None, description="The garbage predicate in force.")
    foreign_keys: dict[str, int] | None = Field(
        default=None, description="Per foreign key onto the table: garbage rows it kept (NO ACTION,"
        " RESTRICT) or child rows deleted or changed (--delete-dependents, CASCADE, SET NULL/DEFAULT).")


class SingleStatusAnswer(AnswerOf[LatestRun]):
    """Single instance: the newest run (status ``idle`` before the first)."""


class MultiStatusAnswer(AnswerOf[dict[str, LatestRun | NodeFailure]]):
    """Multiconnect: the newest run of every node."""


class WebhookError(BaseModel):
    code: Literal[1014]
    details: str


class CompletionGc(BaseModel):
    messages_deleted: int
    node: str | None = Field(None, description="Multiconnect only; absent for a single instance.")
    errors: list[WebhookError] | None = Field(None, description="Only when status is failed.")
    status: Literal["complete", "failed"]


class CompletionWebhook(BaseModel):
    """POSTed to the callback URL when a node's GC ends (``X-Msggc-Signature: sha256=<hmac>``
    when a secret is configured). ``failed`` includes a run stopped by its budget: PUT again
    to continue where it stopped."""

    services: list[MessageOf[CompletionGc]]


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    version: str
    worker: WorkerState
    schedule: str | None = Field(default=None, description="The worker's own GC requests, e.g. every 1:00:00")
    next_scheduled_gc: datetime | None = Field(default=None, description="When the worker next requests a GC")


class ThrottleFigures(BaseModel):
    """Pauses of the run so far: health throttling (WAL rate, replica lag, vacuum) and the guard."""

    pauses: int = 0
    paused_s: float = Field(default=0.0, description="Seconds paused, the guard's included.")
    held_back_s: float = Field(default=0.0, description="Seconds the latency guard held the run back.")
    reasons: dict[str, int] = Field(default_factory=dict, description="Pauses per reason.")


class GuardFigures(BaseModel):
    """The latency guard as it sees the application: its probe's commit latency."""

    budget_ms: float | None = Field(default=None, description="The run's latency budget.")
    p50_ms: float | None = None
    p99_ms: float | None = Field(default=None, description="The probe's recent p99 (live while it runs).")
    before_p99_ms: float | None = Field(default=None, description="The p99 before the run began.")
    rate_share: float | None = Field(default=None, description="WAL rate granted as a share of full speed.")


class ChartPoint(BaseModel):
    t_s: float = Field(description="Seconds since the run started (the end of the interval).")
    rows_per_s: float
    wal_bytes_per_s: float = Field(description="WAL the server wrote (the application's included).")


class RunSummary(BaseModel):
    """A run as the status page lists it."""

    run_id: int
    status: StoredStatus
    strategy: str | None = None
    messages_deleted: int
    rows_skipped_locked: int = Field(description="Left for the next run: locked by the application.")
    kept_by_foreign_keys: int = Field(description="Garbage rows a foreign key's child row still references.")
    batches: int
    requested_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = Field(default=None, description="Started to finished (or to now).")
    rows_per_s: float | None = Field(default=None, description="Recent rate while running, else overall.")
    throttle: ThrottleFigures
    error: str | None = None


class RunDetail(RunSummary):
    """The newest run with what its plan expected and its chart."""

    reason: str | None = Field(default=None, description="Why the planner chose its strategy.")
    workers: int | None = None
    garbage_estimate: int | None = Field(default=None, description="Garbage the planner estimated.")
    garbage_left: int | None = Field(default=None, description="That estimate minus the rows deleted since"
                                     " (0 once complete).")
    eta_s: float | None = Field(default=None, description="Garbage left at the recent rate (running only).")
    guard: GuardFigures | None = None
    chart: list[ChartPoint] = Field(default_factory=list)


class OutboxWaiting(BaseModel):
    waiting: int = Field(description="Completion webhooks not delivered yet.")
    attempts: int = Field(description="The most attempts one of them has had.")
    last_error: str | None = None
    next_attempt_at: datetime | None = None


class NodeOverview(BaseModel):
    node: str = Field(description="The node's name (the single instance: postgresql).")
    address: str = Field(description="host:port of its database.")
    error: ErrorEntry | None = Field(default=None, description="1014 when its database cannot be read.")
    latest: RunDetail | None = None
    recent: list[RunSummary] = Field(default_factory=list, description="The newest runs, newest first.")
    outbox: OutboxWaiting | None = None


class Overview(BaseModel):
    """Everything the status page shows, read from every node's database."""

    version: str
    generated_at: datetime
    worker: WorkerState
    schedule: str | None = None
    next_scheduled_gc: datetime | None = None
    nodes: list[NodeOverview]
