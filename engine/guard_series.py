"""The guard's time series: one point per control step (rate granted, probe p99, WAL rate,
checkpoints, backend writes), bounded however long the run, for ``--json``, status, the API."""

from __future__ import annotations

from dataclasses import dataclass, field

SERIES_POINTS = 240
"""A run's time series keeps at most this many points: a long run's steps are merged in pairs."""


Point = dict[str, float | int | None]


def _merge(points: list[Point]) -> Point:
    """Points of consecutive steps as one: rates averaged, p99 the worst, counters the last."""
    def mean(key: str) -> float | None:
        values = [float(v) for p in points if (v := p.get(key)) is not None]
        return round(sum(values) / len(values), 1) if values else None

    p99s = [float(v) for p in points if (v := p.get("p99_ms")) is not None]
    last = points[-1]
    return {"t_s": last["t_s"], "rate_bytes_per_s": mean("rate_bytes_per_s"),
            "p99_ms": max(p99s) if p99s else None, "wal_bytes_per_s": mean("wal_bytes_per_s"),
            "checkpoints_requested": last.get("checkpoints_requested"),
            "backend_writes": last.get("backend_writes")}


@dataclass
class Series:
    """The guard's time series: one point per control step, pairs merged once it is full, so a
    run of days keeps ``SERIES_POINTS`` points spread over all of it."""

    limit: int = SERIES_POINTS
    points: list[Point] = field(default_factory=list)
    stride: int = 1
    """Steps per point."""
    _open: list[Point] = field(default_factory=list)

    def add(self, point: Point) -> None:
        self._open.append(point)
        if len(self._open) >= self.stride:
            self.points.append(_merge(self._open))
            self._open = []
        if len(self.points) >= self.limit:
            self.points = [_merge(self.points[i:i + 2]) for i in range(0, len(self.points), 2)]
            self.stride *= 2

    def all(self) -> list[Point]:
        return self.points + ([_merge(self._open)] if self._open else [])
