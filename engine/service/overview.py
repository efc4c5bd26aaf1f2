"""What the status page shows of every node, read from its database at each poll.

Read from ``gc_runs``, ``gc_outbox`` and ``gc_probe`` rather than from this process's memory, so the
page tells the truth whichever process runs the GCs (the in-service worker, ``msggc worker``, the
CLI) and across restarts. A node that cannot be read is shown with its 1014, the others still are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from engine import probe_record, progress, runs
from engine.db import require_bookkeeping
from engine.service import contract, outbox
from engine.service.api_models import (
    ChartPoint,
    ErrorEntry,
    GuardFigures,
    NodeOverview,
    OutboxWaiting,
    RunDetail,
    RunSummary,
    ThrottleFigures,
)
from engine.service.nodes import Node
from engine.service.requests import NodeResult, on_every_node
from engine.service.settings import ServiceSettings
from engine.status import ACTIVE, RunStatus

RECENT_RUNS = 10


def read_nodes(settings: ServiceSettings) -> list[NodeOverview]:
    """Every node's overview, in configuration order."""
    return [_node_overview(result) for result in on_every_node(settings, lambda node: _read(settings, node))]


def _read(settings: ServiceSettings, node: Node) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                          dict[str, Any] | None]:
    with settings.slots_of(node).connection(node.dsn, settings.connect_timeout_s) as conn:
        require_bookkeeping(conn)
        table = settings.table_name(node)
        return (runs.newest(conn, table, node.name, RECENT_RUNS), outbox.waiting(conn, node.name),
                probe_record.latest_figures(conn, table, node.name))


def _node_overview(result: NodeResult[tuple[list[dict[str, Any]], dict[str, Any],
                                            dict[str, Any] | None]]) -> NodeOverview:
    node = result.node
    view = NodeOverview(node=node.label, address=node.address)
    if result.value is None:
        view.error = ErrorEntry.model_validate(contract.error(result.error or "unknown error"))
        return view
    rows, waiting, probe = result.value
    view.recent = [summary(row) for row in rows]
    view.latest = detail(rows[0], probe) if rows else None
    view.outbox = OutboxWaiting.model_validate(waiting)
    return view


def summary(row: dict[str, Any]) -> RunSummary:
    return RunSummary(**_summary_fields(row))


def _summary_fields(row: dict[str, Any]) -> dict[str, Any]:
    recorded = row["progress"] or {}
    kept = set(recorded.get("kept_by", ()))
    running = row["status"] in ACTIVE
    duration = _duration_s(row["started_at"], row["finished_at"] or (datetime.now(UTC) if running else None))
    rate = progress.recent_rate(recorded.get("series", [])) if running else None
    if rate is None and duration:
        rate = row["messages_deleted"] / duration
    return {
        "run_id": row["run_id"], "status": row["status"], "strategy": row["strategy"],
        "messages_deleted": row["messages_deleted"], "rows_skipped_locked": row["rows_skipped_locked"],
        "kept_by_foreign_keys": sum(n for name, n in (row["foreign_keys"] or {}).items() if name in kept),
        "batches": row["batches"], "requested_at": row["requested_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "duration_s": duration,
        "rows_per_s": round(rate, 1) if rate is not None else None,
        "throttle": _throttle(row, recorded, running), "error": row["error"],
    }


def detail(row: dict[str, Any], probe: dict[str, Any] | None) -> RunDetail:
    """The newest run: its summary, the plan's estimate and what is left of it, the chart."""
    fields = _summary_fields(row)
    recorded = row["progress"] or {}
    estimate = recorded.get("garbage_estimate")
    left = None
    if row["status"] == RunStatus.COMPLETE:
        left = 0  # what complete promises: every row garbage at its start and still garbage is gone
    elif estimate is not None:
        left = max(0, estimate - (row["messages_deleted"] - recorded.get("deleted_at_plan", 0)))
    running = row["status"] in ACTIVE
    rate = fields["rows_per_s"]
    return RunDetail(
        **fields, reason=recorded.get("reason"), workers=recorded.get("workers"),
        garbage_estimate=estimate, garbage_left=left,
        eta_s=round(left / rate, 1) if running and left is not None and rate else None,
        guard=_guard(row, probe),
        chart=[ChartPoint(**point) for point in progress.rates(recorded.get("series", []))])


def _throttle(row: dict[str, Any], recorded: dict[str, Any], running: bool) -> ThrottleFigures:
    """Live figures from the last sample while it runs; the run's own columns once closed."""
    if running:
        return ThrottleFigures.model_validate(recorded.get("throttle", {}))
    return ThrottleFigures(pauses=row["throttle_pauses"], paused_s=round(row["throttled_seconds"], 2),
                           held_back_s=round(row["held_back_seconds"], 2),
                           reasons=recorded.get("throttle", {}).get("reasons", {}))


def _guard(row: dict[str, Any], probe: dict[str, Any] | None) -> GuardFigures | None:
    """The probe's live row while it belongs to this run, else what the run recorded."""
    budget = (row["options"] or {}).get("max_app_latency_ms")
    if probe is not None and probe["run_id"] == row["run_id"]:
        return GuardFigures(budget_ms=budget, p50_ms=probe["p50_ms"], p99_ms=probe["p99_ms"],
                            before_p99_ms=probe["before_p99_ms"], rate_share=probe["rate_share"])
    if budget is None and row["app_latency_p99_ms"] is None:
        return None
    return GuardFigures(budget_ms=budget, p50_ms=row["app_latency_p50_ms"], p99_ms=row["app_latency_p99_ms"],
                        before_p99_ms=row["app_latency_before_p99_ms"])


def _duration_s(started: datetime | None, ended: datetime | None) -> float | None:
    if started is None or ended is None:
        return None
    return round(max(0.0, (ended - started).total_seconds()), 1)
