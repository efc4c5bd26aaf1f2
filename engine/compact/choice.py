"""When ``--strategy auto`` compacts instead of walking: a plain table of at least
``MIN_ROWS`` rows (the planner's estimate) of which at least ``MIN_GARBAGE`` is garbage, that no
condition refuses, with no walk of an earlier run to continue, and no ``--archive-to`` file.

Measured (``benchmarks/compaction.py``, 10M rows spread evenly, PostgreSQL 18, BENCHMARKS.md, fifth
session): against the walk, compaction ran 0.72x as fast at 80% garbage, 1.27x at 90%, 1.81x at 95%,
2.27x at 99%, writing 0.22x, 0.11x, 0.05x and 0.01x its WAL: they cross near 85%. Below a million
rows its fixed costs (counting the old table to verify, the swap, the drop) weigh more than what it
saves; the share is held at 95% because every application write pays the capture trigger meanwhile
(1.03-1.18x a one-row update) and the old table's drop gives its space back at once (on a
filesystem with online discard the application's commits wait for it). A run with a budget
compaction cannot hold (rows, WAL rate, replica lag, application latency) walks.
"""

from __future__ import annotations

from psycopg import sql

from engine import runs
from engine.compact.preconditions import refusals
from engine.config import GcOptions
from engine.db import Connection, one_row, table_ident
from engine.planner import Plan
from engine.queries import Statements
from engine.target import Target

MIN_ROWS = 1_000_000
MIN_GARBAGE = 0.95


def chosen(conn: Connection, options: GcOptions, target: Target,
           plans: dict[str | None, Plan]) -> str | None:
    """Why ``auto`` compacts this table, or None when it walks it."""
    plan = plans.get(None)
    if options.strategy != "auto" or plan is None or options.archive_to or unheld(options):
        return None
    facts = plan.facts
    if facts.rows_estimate < MIN_ROWS or facts.garbage_fraction < MIN_GARBAGE:  # the planner's sample
        return None
    if runs.latest_resumable(conn, options.table.qualified, options.node) is not None:
        return None  # the walk an earlier run began goes on
    if refusals(conn, target):
        return None
    return (f"compacts: ~{facts.garbage_fraction:.0%} of ~{facts.rows_estimate:,} rows are garbage"
            f" (auto compacts from {MIN_GARBAGE:.0%} of {MIN_ROWS:,} rows)")


def unheld(options: GcOptions) -> list[str]:
    """The budgets a compaction cannot hold (it copies in one statement): a walk honours them."""
    flags = {"--max-rows": options.max_rows, "--max-wal-rate": options.max_wal_rate,
             "--max-replica-lag": options.max_replica_lag, "--max-app-latency": options.max_app_latency_ms}
    return [flag for flag, value in flags.items() if value is not None]


def live_share(conn: Connection, statements: Statements, params: dict[str, object]) -> float:
    """The share of rows that are not garbage, from about 1% of the blocks (all of a small
    table): the one sample the dry run and the run's disk check both size the copy by (``auto``
    decides on the planner's own sample, already taken)."""
    total, live = one_row(conn.execute(sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE ({g}) IS NOT TRUE) FROM {t}"
        " TABLESAMPLE SYSTEM (least(100, greatest(1, 100 * 1000.0 / greatest("
        "   (SELECT relpages FROM pg_class WHERE oid = {oid}), 1))))").format(
            g=statements.garbage, t=table_ident(statements.table), oid=sql.Literal(statements.target.oid)),
        params))
    return live / total if total else 0.0
