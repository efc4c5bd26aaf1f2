"""Predict a run's duration and WAL before deleting anything.

A few real batches run at spread positions of the walk inside a transaction that is rolled
back: they cost what the run's batches will cost (same plans, same full-page images), and
scaling them by the share of the walk they covered predicts the whole run. Nothing is deleted;
rows locked by the application are skipped (the samples use the skip-locked path's lock wait of
zero through a short lock_timeout and are dropped when they meet one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from psycopg import errors as pg_errors

from engine.archive_file import drain
from engine.db import Connection
from engine.planner import Plan
from engine.queries import SET_TIMEOUTS, Statements
from engine.strategies import Strategy

SAMPLES = 4
SAMPLE_TIMEOUTS = {"lock_timeout": "20ms", "statement_timeout": "5s"}


@dataclass(frozen=True)
class Estimate:
    sampled_rows: int
    sampled_seconds: float
    sampled_wal_bytes: int
    coverage: float
    """Share of the walk the samples covered."""

    @property
    def predicted_seconds(self) -> float:
        return self.sampled_seconds / self.coverage if self.coverage else 0.0

    @property
    def predicted_wal_bytes(self) -> int:
        return round(self.sampled_wal_bytes / self.coverage) if self.coverage else 0


def _wal_insert_lsn(conn: Connection) -> int:
    return conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint").fetchone()[0]


def estimate(conn: Connection, plan: Plan, strategy: Strategy, statements: Statements,
             params: dict[str, Any], size: int, to_file: bool = False) -> Estimate:
    """Sample ``SAMPLES`` batches of ``size`` units, one at the start of each quarter of the walk;
    ``to_file`` includes the COPY and compression of ``--archive-to`` in each sample's cost."""
    parts = strategy.slices(plan.facts, SAMPLES)
    rows = walked = 0
    seconds = 0.0
    wal = 0
    with conn.transaction(force_rollback=True):
        conn.execute(SET_TIMEOUTS, SAMPLE_TIMEOUTS)
        for part in parts:
            began, lsn = time.monotonic(), _wal_insert_lsn(conn)
            try:
                with conn.transaction(force_rollback=True):
                    outcome = strategy.run_batch(conn, statements, part, size, params, skip_locked=False)
                    if to_file:
                        drain(conn)
            except pg_errors.LockNotAvailable:
                continue
            seconds += time.monotonic() - began
            wal += _wal_insert_lsn(conn) - lsn
            rows += outcome.deleted
            walked += outcome.position - part.position
    return Estimate(rows, seconds, wal, _coverage(plan, strategy, parts, walked, rows))


def _coverage(plan: Plan, strategy: Strategy, parts: list[Any], walked: int, rows: int) -> float:
    """The index walk advances by garbage rows; the others by blocks or keys of the table."""
    if strategy.name == "index":
        garbage = plan.facts.garbage_rows_estimate
        return min(1.0, rows / garbage) if garbage else 1.0
    extent = sum(part.end - part.position for part in parts)
    return min(1.0, walked / extent) if extent else 1.0
