"""A run's progress as the status page draws it, kept in ``gc_runs.progress``.

The plan's garbage estimate and reason are recorded when the walk starts; then a sample of
(seconds since the start, rows deleted, the server's WAL position) rides on a batch's checkpoint
now and then, with the throttle's live figures. Why with the checkpoints: a sample costs no
connection and no round trip of its own, and it is true whoever runs the GC (the service's
worker, ``msggc worker``, the CLI). Why the server's WAL position: ``pg_current_wal_lsn()``
needs no privilege, and two samples give the rate the server wrote WAL at (the application's
included), the rate the latency guard watches.

The series stays short whatever the run's length: a sample at most every :func:`step_s`
seconds, a step that doubles as the run grows, and every other point dropped when the series
reaches ``MAX_POINTS``, recorded with the plan (rows and WAL are cumulative, so a rate over a wider
interval stays exact).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from engine.db import Connection

MAX_POINTS = 240
BASE_STEP_S = 1.0
RECENT_S = 30.0
"""The rate an ETA divides by: over the last samples spanning about this long."""


def step_s(elapsed_s: float) -> float:
    """The interval between samples: 1 s, doubled each time the run outgrows half the series."""
    step = BASE_STEP_S
    while elapsed_s / step > MAX_POINTS / 2:
        step *= 2
    return step


class Sampler:
    """Which checkpoint carries the next sample, decided for all the walk's workers at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = self._last = clock()
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = self._clock()
        with self._lock:
            if now - self._last < step_s(now - self._started):
                return False
            self._last = now
            return True


@dataclass(frozen=True)
class Live:
    """The throttle's figures so far, written with a sample (the run's final ones at its close)."""

    pauses: int
    paused_s: float
    held_back_s: float
    reasons: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {"pauses": self.pauses, "paused_s": round(self.paused_s, 2),
                "held_back_s": round(self.held_back_s, 2), "reasons": self.reasons}


def _point(deleted: str) -> str:
    """The SQL of ``progress`` with one sample appended (for a statement with parameters: ``%%``);
    ``deleted`` is the row count's expression (an UPDATE's column references read the old row)."""
    series = "progress -> 'series'"
    thinned = (f"(SELECT jsonb_agg(p ORDER BY n) FROM jsonb_array_elements({series})"
               " WITH ORDINALITY AS e(p, n) WHERE n %% 2 = 1)")
    return (f"jsonb_set(progress, '{{series}}', (CASE WHEN jsonb_array_length({series})"
            " >= (progress ->> 'max_points')::int"
            f" THEN {thinned} ELSE {series} END) || jsonb_build_array(jsonb_build_array("
            "round(extract(epoch FROM clock_timestamp() - started_at)::numeric, 2),"
            f" {deleted}, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'))))")


SAMPLED = (f"progress = CASE WHEN %(sample)s::jsonb IS NULL OR progress IS NULL THEN progress"
           f" ELSE {_point('messages_deleted + %(deleted)s')} || %(sample)s::jsonb END")
"""The checkpoint's assignment: a sample and the live figures when ``sample`` is not NULL."""

PLAN_SQL = """
UPDATE gc_runs SET progress = jsonb_set(coalesce(progress, '{}') || %(plan)s
    || jsonb_build_object('deleted_at_plan', messages_deleted),
  '{series}', coalesce(progress -> 'series', '[]'))
WHERE id = %(run)s
"""
POINT = _point("messages_deleted")
"""``progress`` with a sample of the row as it stands: the first one, and the last at the close."""


def sample_param(live: Live | None) -> Jsonb | None:
    """The checkpoint's ``sample`` parameter: the live figures to merge, or None for no sample."""
    return Jsonb({"throttle": live.as_json()}) if live is not None else None


def record_plan(conn: Connection, run_id: int, garbage_estimate: int, reason: str, workers: int,
                kept_by: Sequence[str]) -> None:
    """When the walk starts: what the planner expects and why, and the first sample. A run resumed
    in place keeps its series; ``deleted_at_plan`` says how much of its count came before this
    estimate. ``kept_by``: the foreign keys whose counts are rows kept (not child rows changed)."""
    plan = {"garbage_estimate": garbage_estimate, "reason": reason, "workers": workers,
            "kept_by": list(kept_by), "max_points": MAX_POINTS}
    conn.execute(PLAN_SQL, {"plan": Jsonb(plan), "run": run_id})
    conn.execute(f"UPDATE gc_runs SET progress = {POINT} WHERE id = %s", (run_id,))


def rates(series: Sequence[Sequence[float]]) -> list[dict[str, float]]:
    """Per interval between two samples: its end (seconds), rows/s and WAL bytes/s."""
    out = []
    for (t0, rows0, wal0), (t1, rows1, wal1) in itertools.pairwise(series):
        span = float(t1) - float(t0)
        if span > 0:
            out.append({"t_s": float(t1), "rows_per_s": round((float(rows1) - float(rows0)) / span, 1),
                        "wal_bytes_per_s": round((float(wal1) - float(wal0)) / span, 1)})
    return out


def recent_rate(series: Sequence[Sequence[float]]) -> float | None:
    """Rows/s over the last ``RECENT_S`` seconds of samples (all of them on a shorter run)."""
    if len(series) < 2:
        return None
    last_t, last_rows = float(series[-1][0]), float(series[-1][1])
    first = next((p for p in series if last_t - float(p[0]) <= RECENT_S), series[-2])
    if first is series[-1]:
        first = series[-2]
    span = last_t - float(first[0])
    return (last_rows - float(first[1])) / span if span > 0 else None
