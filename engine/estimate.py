"""Predict a run's duration and WAL before deleting anything.

A few real batches run at spread positions of the walk inside a transaction that is rolled
back: they cost what the run's batches will cost (same plans, same full-page images). Their
sizes grow toward the run's target batch duration, so a straight line through (size, seconds)
separates a batch's fixed cost from its cost per unit; the run's adaptive batches are then
predicted at the size the sizer will settle on. Nothing is deleted; rows locked by the
application are skipped (a short lock_timeout drops a sample that meets one). A sample that runs
past its statement_timeout ends the sampling: the prediction comes from the samples before it,
or is unknown, with the reason, when there are none (a dry run never fails on it).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from psycopg import errors as pg_errors

from engine.db import Connection, one_row
from engine.planner import Plan
from engine.queries import SET_BATCH_SETTINGS, Statements
from engine.strategies import Strategy

SAMPLES = 4
GROWTH = 4.0
"""The most a sample may grow over the previous one, toward the target duration."""
SAMPLE_SETTINGS = {"lock_timeout": "20ms", "statement_timeout": "5s", "synchronous_commit": None}
UNITS = {"physical": "blocks", "key": "keys", "index": "garbage rows", "sweep": "keys"}
"""What a walk's batch size counts, as a sentence says it."""


@dataclass(frozen=True)
class Sample:
    units: int
    """Blocks or keys walked (physical, key), or garbage rows deleted (index)."""
    seconds: float
    wal_bytes: int


@dataclass(frozen=True)
class Estimate:
    samples: tuple[Sample, ...]
    total_units: int
    """Units of the whole walk, as the samples count them."""
    target_s: float | None
    """The adaptive batches' target duration; ``None`` when batches have a fixed size."""
    batch_units: int
    """The fixed batch size, or the largest one the adaptive sizer may reach."""
    unknown: str | None = None
    """Why nothing can be predicted: no sample batch finished (None when one did)."""

    @property
    def predicted_wal_bytes(self) -> int:
        units = sum(s.units for s in self.samples)
        return round(sum(s.wal_bytes for s in self.samples) * self.total_units / units) if units else 0

    @property
    def batch_size(self) -> float:
        """Units per batch: fixed, or where fixed cost + units x unit cost meets the target."""
        per_batch, per_unit = self.cost_model()
        if self.target_s is None or per_unit <= 0:
            return self.batch_units
        return min(self.batch_units, max(1.0, (self.target_s - per_batch) / per_unit))

    @property
    def batches(self) -> int:
        return math.ceil(self.total_units / self.batch_size)

    @property
    def predicted_seconds(self) -> float:
        per_batch, per_unit = self.cost_model()
        return self.total_units * per_unit + self.batches * per_batch

    def cost_model(self) -> tuple[float, float]:
        """(seconds per batch, seconds per unit): a least-squares line through the samples, or
        the plain average when their sizes do not differ enough to draw one."""
        usable = [s for s in self.samples if s.units > 0]
        if len({s.units for s in usable}) >= 2:
            fit = statistics.linear_regression([s.units for s in usable], [s.seconds for s in usable])
            if fit.slope > 0:
                return max(0.0, fit.intercept), fit.slope
        units = sum(s.units for s in usable)
        return 0.0, (sum(s.seconds for s in usable) / units if units else 0.0)


def _wal_insert_lsn(conn: Connection) -> int:
    return int(one_row(conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"))[0])


def estimate(conn: Connection, plan: Plan, strategy: Strategy, statements: Statements,
             params: dict[str, Any], size: int, target_s: float | None, to_file: bool = False) -> Estimate:
    """Sample ``SAMPLES`` batches, one at the start of each quarter of the walk, the first of
    ``size`` units and, when batches adapt (``target_s``), each next one grown toward the
    target; with ``--archive-to`` each sample streams its rows through COPY too (``to_file``: read
    and dropped, not compressed)."""
    fixed = size
    parts = strategy.slices(plan.facts, SAMPLES)
    samples: list[Sample] = []
    unknown: str | None = None
    with conn.transaction(force_rollback=True):
        conn.execute(SET_BATCH_SETTINGS, SAMPLE_SETTINGS)
        for part in parts:
            began, lsn = time.monotonic(), _wal_insert_lsn(conn)
            try:
                with conn.transaction(force_rollback=True):
                    outcome = strategy.run_batch(conn, statements, part, size, params, skip_locked=False)
            except pg_errors.LockNotAvailable:
                unknown = unknown or "every sample batch met a row locked by another transaction"
                continue
            except pg_errors.QueryCanceled:
                unknown = (f"a sample batch of {size:,} {UNITS.get(strategy.name, 'units')} ran past its"
                           f" statement_timeout ({SAMPLE_SETTINGS['statement_timeout']})")
                break
            seconds = time.monotonic() - began
            walked = outcome.deleted if strategy.units_are_rows else part.distance_to(outcome.position)
            samples.append(Sample(walked, seconds, _wal_insert_lsn(conn) - lsn))
            if target_s is not None:
                growth = min(GROWTH, target_s / seconds) if seconds > 0 else GROWTH
                size = max(size, min(strategy.max_units, round(size * growth)))
    return Estimate(tuple(samples), _total_units(plan, strategy, parts), target_s,
                    strategy.max_units if target_s is not None else fixed, None if samples else unknown)


def _total_units(plan: Plan, strategy: Strategy, parts: list[Any]) -> int:
    """The index walk advances by garbage rows; the others by blocks or keys of the table."""
    if strategy.units_are_rows:
        return plan.facts.garbage_rows_estimate
    return sum(part.distance_to(part.end) for part in parts)
