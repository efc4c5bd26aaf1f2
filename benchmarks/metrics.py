"""Pure arithmetic on measurements: percentiles, throughput by tenths, timeline thinning.

Kept free of I/O so the children (contenders, load) and the parent (report) compute every
figure the same way.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Point = tuple[float, int]
"""(seconds since the contender started, rows deleted and committed so far)."""


def percentile(values: Sequence[float], q: int) -> float | None:
    """The q-th percentile, computed like ``engine.result`` (inclusive method) so figures match."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass(frozen=True)
class LatencySummary:
    """The latency figures every report row carries, in milliseconds."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> LatencySummary:
        ordered = sorted(values_ms)
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 50),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            max=ordered[-1] if ordered else None,
        )


def time_at(points: Sequence[Point], rows: float) -> float | None:
    """When the cumulative count reached ``rows``, interpolated linearly between two batches.

    Why interpolate: a batch commits many rows at once; without it a tenth boundary would snap
    to whole batches and the ratio would jitter with batch size instead of with speed.
    """
    counts = [count for _, count in points]
    index = bisect.bisect_left(counts, rows)
    if index >= len(points):
        return None
    t1, c1 = points[index]
    if index == 0 or c1 == rows:
        return t1
    t0, c0 = points[index - 1]
    return t0 + (t1 - t0) * (rows - c0) / (c1 - c0)


@dataclass(frozen=True)
class Tenths:
    """Throughput over the first and the last tenth of the rows deleted (rows/s)."""

    first_rows_s: float | None
    last_rows_s: float | None

    @property
    def ratio(self) -> float | None:
        if not self.first_rows_s or self.last_rows_s is None:
            return None
        return self.last_rows_s / self.first_rows_s


def tenths(points: Sequence[Point]) -> Tenths:
    """Rows/s while deleting the first 10% of the rows against the last 10%.

    Measured by rows, not by wall-clock tenths: a walk that ends on blocks without garbage
    (the aged shape) would otherwise look like a slowdown. ``points`` must start with the
    walk's start ``(t, 0)``; a contender with fewer than three points (one transaction)
    has no tenths.
    """
    if len(points) < 3 or points[-1][1] <= 0:
        return Tenths(None, None)
    total = points[-1][1]
    tenth = total / 10
    start = points[0][0]
    times = [time_at(points, tenth * k) for k in (1, 9, 10)]
    if any(t is None for t in times):
        return Tenths(None, None)
    t1, t9, t10 = (float(t) for t in times)  # type: ignore[arg-type]
    first = tenth / (t1 - start) if t1 > start else None
    last = tenth / (t10 - t9) if t10 > t9 else None
    return Tenths(first, last)


def thin(points: Sequence[Point], limit: int = 160) -> list[Point]:
    """At most ``limit`` points, first and last kept, times in ms: enough for a plot, small in git."""
    if len(points) > limit:
        step = (len(points) - 1) / (limit - 1)
        points = [points[round(i * step)] for i in range(limit)]
    return [(round(t, 3), count) for t, count in points]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """A ratio that is None rather than an exception when a side is missing or zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator
