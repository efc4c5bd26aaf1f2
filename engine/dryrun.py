"""``--dry-run``: the plan, the garbage estimate, the batches, and a prediction; nothing deleted."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import make_conninfo

from engine import partitions
from engine.budget_prediction import ALONE_S, CommitTimer, predict_under_budget
from engine.cleaning import CleaningPace, read_cleaning_pace
from engine.config import GcOptions
from engine.db import Connection, one_row, table_ident
from engine.errors import MsggcError
from engine.estimate import Estimate, estimate
from engine.planner import DROP_WHOLE_REASON, Plan, partitioned_reason
from engine.queries import Statements
from engine.result import GcResult
from engine.sizer import DEFAULT_BATCH_ROWS
from engine.status import RunStatus
from engine.strategies import SWEEP, strategy_for
from engine.target import Target


def _foreign_keys(conn: Connection, plan: Plan, options: GcOptions,
                  statements: Statements) -> dict[str, dict[str, Any]]:
    """Each foreign key onto the table, what a run would do about it, and how many rows (from
    the planner's block sample, scaled to the table); unknown, with the reason, when the count
    meets a statement_timeout (a key without an index reads its child table per sampled row)."""
    percent = plan.facts.sample_percent
    reports: dict[str, dict[str, Any]] = {}
    for ref in statements.target.references:
        try:
            sampled = one_row(conn.execute(statements.sample_foreign_key(ref),
                                           {"percent": percent, "cutoff": plan.cutoff}))[0]
        except pg_errors.QueryCanceled as exc:
            reports[ref.name] = {**ref.report(0, options.delete_dependents), "rows": None,
                                 "unknown": f"its count was cancelled ({exc.diag.message_primary})"}
            continue
        reports[ref.name] = {**ref.report(round(sampled * 100 / percent), options.delete_dependents),
                             "estimated": True}
    return reports


def dry_run(conn: Connection, plans: dict[str | None, Plan], whole: dict[str, partitions.Leaf],
            legs: dict[str | None, Statements], options: GcOptions, target: Target) -> GcResult:
    """The plan of each table the run would delete from (the table, or each leaf partition), and
    a prediction from real batches that are rolled back (see :mod:`engine.estimate`) of the walks:
    leaves dropped whole or walked by their sweep alone are not sampled."""
    with _commit_timer(conn, options) as timer:  # a budget: the application's commits, timed
        if timer is not None:
            time.sleep(ALONE_S)
        alone = timer.take() if timer is not None else []
        samples = {leaf: _sample(conn, plan, options, legs[leaf]) for leaf, plan in plans.items()
                   if leaf not in whole and not plan.sweep_only}  # a leaf swept alone: one read, no walk
        during = timer.take() if timer is not None else []
    walks = Counter(plan.strategy for plan in plans.values())
    only = plans.get(None)
    reason = only.reason if only else partitioned_reason(plans.values())
    unknown = next((sample.unknown for sample in samples.values() if sample.unknown), None)
    wal = sum(sample.predicted_wal_bytes for sample in samples.values())
    seconds = None if unknown else sum(sample.predicted_seconds for sample in samples.values())
    advice = None if unknown else _checkpoint_advice(conn, wal)
    budget = (predict_under_budget(options.max_app_latency_ms, alone, during, None if unknown else wal,
                                   seconds, _cycle(conn) if advice else None,
                                   _cleaning(conn, [plans[leaf] for leaf in samples]))
              if options.max_app_latency_ms else None)
    return GcResult(
        status=RunStatus.DRY_RUN,
        garbage=target.describe(),
        foreign_keys=_foreign_keys(conn, only, options, legs[None]) if only else {},
        strategy=only.strategy if only else walks.most_common(1)[0][0] if walks else "physical",
        reason=f"{reason}; {PREDICTION_UNKNOWN}: {unknown}" if unknown else reason,
        garbage_estimate=sum(plan.facts.garbage_rows_estimate for plan in plans.values()),
        rows_estimate=sum(plan.facts.rows_estimate for plan in plans.values()),
        planned_batches=None if unknown else sum(sample.batches for sample in samples.values()),
        predicted_seconds=seconds,
        predicted_wal_bytes=None if unknown else wal,
        checkpoint_advice=advice,
        app_latency_budget_ms=options.max_app_latency_ms,
        app_latency_before_p99_ms=budget.alone_p99_ms if budget else None,
        budget_verdict=budget.verdict if budget else None,
        predicted_guarded_seconds=budget.seconds if budget else None,
        predicted_guarded_wal_rate=budget.rate if budget else None,
        partitioning_advice=_advice_unless_cancelled(conn, only, legs[None]) if only else None,
        partitions={leaf: {"strategy": SWEEP if plan.sweep_only else plan.strategy, "reason": plan.reason,
                           "garbage_estimate": plan.facts.garbage_rows_estimate,
                           **_drop_verdict(conn, plan, legs[leaf], options, target, leaf in whole)}
                    for leaf, plan in plans.items() if leaf is not None},
    )


@contextmanager
def _commit_timer(conn: Connection, options: GcOptions) -> Iterator[CommitTimer | None]:
    """With a latency budget, probe commits on a connection of their own (the dry run's own is
    busy with its samples), to the same server as the dry run's, password included."""
    if not options.max_app_latency_ms:
        yield None
        return
    password = conn.pgconn.password
    dsn = make_conninfo(conn.info.dsn, **({"password": password.decode()} if password else {}))
    with CommitTimer(dsn, options.table.qualified, options.node) as timer:
        yield timer


PREDICTION_UNKNOWN = "duration and WAL unknown"
"""Said, with the reason, when no sample batch finished: a guess would be worse than none."""


def _checkpoint_advice(conn: Connection, wal_bytes: int) -> dict[str, Any] | None:
    """When the run's WAL would force checkpoints: a checkpoint starts every ``max_wal_size /
    (1 + checkpoint_completion_target)`` of WAL, and while it writes pages out the application's
    commits wait longer (measured: a 10M-row delete, 2.7 GB of WAL against 1 GB, made the load's
    p99 19-83x its p99 alone, whatever the batch rate). The pace that leaves checkpoints to
    their timer is that much WAL per ``checkpoint_timeout``; None when the run stays under it."""
    max_wal, timeout, completion = one_row(conn.execute(
        "SELECT pg_size_bytes(current_setting('max_wal_size')),"
        " extract(epoch FROM current_setting('checkpoint_timeout')::interval)::float8,"
        " current_setting('checkpoint_completion_target')::float8"))
    between = max_wal / (1 + completion)
    if wal_bytes < between:
        return None
    return {"forced_checkpoints": int(wal_bytes // between), "max_wal_size_bytes": int(max_wal),
            "wal_between_checkpoints_bytes": round(between),
            "max_wal_size_to_avoid_them_bytes": round(wal_bytes * (1 + completion)),
            "timed_wal_rate_bytes_per_s": round(between / timeout)}


def _cycle(conn: Connection) -> tuple[float, float]:
    """The WAL that requests a checkpoint and the timer's interval: a guarded run's pace."""
    between, timeout = one_row(conn.execute(
        "SELECT pg_size_bytes(current_setting('max_wal_size'))"
        " / (1 + current_setting('checkpoint_completion_target')::float8),"
        " extract(epoch FROM current_setting('checkpoint_timeout')::interval)::float8"))
    return float(between), float(timeout)


def _cleaning(conn: Connection, walked: list[Plan]) -> CleaningPace:
    """The heap the walks dirty (garbage rows over garbage rows per page) against shared_buffers
    and the server's cleaning pace (:class:`CleaningPace`)."""
    return read_cleaning_pace(conn, sum(plan.facts.garbage_rows_estimate / plan.facts.garbage_per_block
                                        for plan in walked if plan.facts.garbage_per_block))


ADVICE_COLUMNS = ("created_at", "inserted_at", "sent_at", "received_at")
"""Where a messaging table keeps the time a row arrived: what a daily partitioning would split on."""


def _advice(conn: Connection, plan: Plan, statements: Statements) -> dict[str, Any] | None:
    """For a table that is not partitioned: had it been partitioned by day of arrival, how many
    days (and rows) were wholly garbage, which a run would drop instead of deleting row by row."""
    target = statements.target
    column = next((c for c in ADVICE_COLUMNS if target.columns.get(c, "").startswith("timestamp")), None)
    if column is None:
        return None
    days, droppable, rows = one_row(conn.execute(sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE whole), coalesce(sum(n) FILTER (WHERE whole), 0)"
        " FROM (SELECT count(*) AS n, bool_and(({garbage}) IS TRUE) AS whole FROM {t}"
        "       GROUP BY date_trunc('day', {c})) AS per_day"
    ).format(garbage=statements.garbage, t=table_ident(statements.table), c=sql.Identifier(column)),
        {"cutoff": plan.cutoff, "run_id": 0}))
    return {"column": column, "interval": "day", "partitions": int(days), "droppable": int(droppable),
            "rows": int(rows)}


def _advice_unless_cancelled(conn: Connection, plan: Plan, statements: Statements) -> dict[str, Any] | None:
    """:func:`_advice` reads the whole table: under a statement_timeout of the role or database
    it may be cancelled, and a dry run then leaves it out rather than fail."""
    try:
        return _advice(conn, plan, statements)
    except pg_errors.QueryCanceled:
        return None


def _drop_verdict(conn: Connection, plan: Plan, statements: Statements, options: GcOptions,
                  target: Target, dropped: bool) -> dict[str, Any]:
    """Whether a run would drop the leaf whole, and why (or why not)."""
    if dropped:
        return {"drop": True, "why": DROP_WHOLE_REASON}
    archived = options.archive or options.archive_to
    why = ("--no-drop" if options.no_drop else "its rows are archived" if archived
           else "a foreign key points at the table" if target.references
           else "not a range leaf, owned by this role, that a later leaf with rows follows"
           if partitions.droppable(conn, statements.target.oid) is None
           else "not all its rows are garbage")
    return {"drop": False, "why": f"walked row by row: {why}"}


def _sample(conn: Connection, plan: Plan, options: GcOptions, statements: Statements) -> Estimate:
    strategy = strategy_for(plan.strategy, plan.facts)
    size = strategy.units_for_rows(options.batch_size or DEFAULT_BATCH_ROWS, plan.facts)
    target_s = None if options.batch_size else options.target_batch_ms / 1000
    try:
        return estimate(conn, plan, strategy, statements, {"cutoff": plan.cutoff, "run_id": 0}, size,
                        target_s, options.archive_to is not None)
    except pg_errors.ForeignKeyViolation as exc:
        raise MsggcError(
            f"garbage rows of {statements.table.qualified} are still referenced by a foreign key"
            f" ({exc.diag.message_primary}): a GC cannot delete them while the reference exists"
        ) from None
