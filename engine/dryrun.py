"""``--dry-run``: the plan, the garbage estimate, the batches, and a prediction; nothing deleted."""

from __future__ import annotations

from typing import Any

from psycopg import errors as pg_errors

from engine.config import GcOptions
from engine.db import Connection, one_row
from engine.errors import MsggcError
from engine.estimate import estimate
from engine.planner import Plan
from engine.queries import Statements
from engine.result import GcResult
from engine.sizer import DEFAULT_BATCH_ROWS
from engine.status import RunStatus
from engine.strategies import strategy_for


def _foreign_keys(conn: Connection, plan: Plan, options: GcOptions,
                  statements: Statements) -> dict[str, dict[str, Any]]:
    """Each foreign key onto the table, what a run would do about it, and how many rows (from
    the planner's block sample, scaled to the table)."""
    percent = plan.facts.sample_percent
    reports: dict[str, dict[str, Any]] = {}
    for ref in statements.target.references:
        sampled = one_row(conn.execute(statements.sample_foreign_key(ref),
                                       {"percent": percent, "cutoff": plan.cutoff}))[0]
        reports[ref.name] = {**ref.report(round(sampled * 100 / percent), options.delete_dependents),
                             "estimated": True}
    return reports


def dry_run(conn: Connection, plan: Plan, options: GcOptions, statements: Statements) -> GcResult:
    """The prediction comes from real batches that are rolled back (see :mod:`engine.estimate`)."""
    strategy = strategy_for(plan.strategy, plan.facts.integer_key)
    size = strategy.units_for_rows(options.batch_size or DEFAULT_BATCH_ROWS, plan.facts)
    target_s = None if options.batch_size else options.target_batch_ms / 1000
    try:
        sample = estimate(conn, plan, strategy, statements, {"cutoff": plan.cutoff, "run_id": 0}, size,
                          target_s, options.archive_to is not None)
    except pg_errors.ForeignKeyViolation as exc:
        raise MsggcError(
            f"garbage rows of {options.table.qualified} are still referenced by a foreign key"
            f" ({exc.diag.message_primary}): a GC cannot delete them while the reference exists"
        ) from None
    return GcResult(
        status=RunStatus.DRY_RUN,
        garbage=statements.target.describe(),
        foreign_keys=_foreign_keys(conn, plan, options, statements),
        strategy=plan.strategy,
        reason=plan.reason,
        garbage_estimate=plan.facts.garbage_rows_estimate,
        rows_estimate=plan.facts.rows_estimate,
        planned_batches=sample.batches,
        predicted_seconds=sample.predicted_seconds,
        predicted_wal_bytes=sample.predicted_wal_bytes,
    )
