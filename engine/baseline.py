"""The application's commit latency before a run: what an ``auto`` latency budget is made of.

The latency guard (:mod:`engine.guard`) times a one-row update of msggc's ``gc_probe`` row,
committed with ``synchronous_commit = on``, while a run goes on. An ``auto`` budget needs the
same figure without the run: this module times the same write for a few seconds before the run
starts, and the budget is ``AUTO_FACTOR`` times its p99 (never under ``AUTO_FLOOR_MS``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from engine.db import Connection, connect
from engine.probe_record import PROBE_APPLICATION_NAME, require_probe_table
from engine.rate_control import PROBE_INTERVAL_S, percentile

BASELINE_S = 2.0
"""How long the probe is timed before a run (about 20 samples at the guard's interval)."""
AUTO_FACTOR = 3.0
AUTO_FLOOR_MS = 5.0
"""An ``auto`` budget is never tighter than this: on an idle local server a tiny commit takes well
under a millisecond, and a budget of 1 ms would hold a run back for scheduler noise."""

AUTO_MARK = "app_latency_auto"
"""Set in ``gc_runs.options`` of a run whose latency budget is ``auto`` (measured before it runs)."""
RECORD_KEY = "app_latency_baseline"
"""Where ``gc_runs.options`` keeps the measurement an ``auto`` budget came from
(:meth:`Baseline.describe`)."""

CLAIM_SQL = """
INSERT INTO gc_probe (table_name, node, beats, beat_at) VALUES (%(table)s, %(node)s, 0, now())
ON CONFLICT (table_name, node) DO UPDATE SET beat_at = now()
"""
BEAT_SQL = "UPDATE gc_probe SET beat_at = now() WHERE table_name = %(table)s AND node = %(node)s"
"""The guard's write: one row of ``gc_probe``, updated and committed alone with a WAL flush."""


def auto_budget_ms(p99_ms: float) -> float:
    """The ``auto`` budget made of the probe's p99 alone."""
    return round(max(AUTO_FLOOR_MS, AUTO_FACTOR * p99_ms), 3)


@dataclass(frozen=True)
class Baseline:
    """The probe's commit latency before a run, and the ``auto`` budget made of it."""

    p99_ms: float
    p50_ms: float
    samples: int
    seconds: float

    @property
    def budget_ms(self) -> float:
        return auto_budget_ms(self.p99_ms)

    def describe(self) -> dict[str, Any]:
        """Recorded with the run: how its budget was chosen."""
        return {"p99_ms": round(self.p99_ms, 3), "p50_ms": round(self.p50_ms, 3), "samples": self.samples,
                "seconds": round(self.seconds, 2), "factor": AUTO_FACTOR, "floor_ms": AUTO_FLOOR_MS,
                "budget_ms": self.budget_ms}


def measure(dsn: str, table: str, node: str, seconds: float = BASELINE_S,
            interval_s: float = PROBE_INTERVAL_S) -> Baseline:
    """Time the guard's probe write every ``interval_s`` for ``seconds`` on a connection of its
    own; the first write (a new session's catalog lookups) is not counted."""
    with connect(dsn) as conn:
        return measure_on(conn, table, node, seconds, interval_s)


def measure_on(conn: Connection, table: str, node: str, seconds: float = BASELINE_S,
               interval_s: float = PROBE_INTERVAL_S) -> Baseline:
    require_probe_table(conn)
    conn.execute("SELECT set_config('application_name', %s, false)", (PROBE_APPLICATION_NAME,))
    conn.execute("SET synchronous_commit = on")
    params = {"table": table, "node": node}
    conn.execute(CLAIM_SQL, params)
    samples: list[float] = []
    began = due = time.monotonic()
    while True:
        due += interval_s
        start = time.monotonic()
        conn.execute(BEAT_SQL, params)
        samples.append((time.monotonic() - start) * 1000)
        if due - began >= seconds:
            break
        time.sleep(max(0.0, due - time.monotonic()))
    return Baseline(p99_ms=percentile(samples, 99) or 0.0, p50_ms=percentile(samples, 50) or 0.0,
                    samples=len(samples), seconds=time.monotonic() - began)
