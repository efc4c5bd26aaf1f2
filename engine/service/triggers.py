"""When a scheduled GC is due: ``--every 1h`` or ``--cron "0 3 * * *"`` (UTC).

Kept apart from the loop that acts on them, so settings can hold a trigger and check it at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError

from engine.errors import UsageError

MIN_INTERVAL = timedelta(seconds=1)


@dataclass(frozen=True)
class Every:
    """A GC at start, then one ``interval`` after each."""

    interval: timedelta

    def __post_init__(self) -> None:
        if self.interval < MIN_INTERVAL:
            raise UsageError(f"every (--every) must be at least 1s, not {self.interval}")

    def first(self, now: datetime) -> datetime:
        return now

    def next_after(self, fired: datetime) -> datetime:
        return fired + self.interval

    def describe(self) -> str:
        return f"every {self.interval}"


@dataclass(frozen=True)
class Cron:
    """A GC at each time a cron expression matches, in UTC: 5 fields, or 6 with seconds first."""

    expression: str

    def __post_init__(self) -> None:
        try:
            CronSim(self.expression, datetime.now(UTC))
        except CronSimError as exc:
            raise UsageError(f"invalid cron expression {self.expression!r}: {exc}") from None

    def first(self, now: datetime) -> datetime:
        return self.next_after(now)

    def next_after(self, fired: datetime) -> datetime:
        return next(CronSim(self.expression, fired))

    def describe(self) -> str:
        return f"cron {self.expression!r} (UTC)"


Trigger = Every | Cron


def trigger_of(every: timedelta | None, cron: str | None) -> Trigger | None:
    """The one trigger configured, if any; both at once is a user mistake."""
    if every is not None and cron is not None:
        raise UsageError("every (--every) and cron (--cron) exclude each other: keep one")
    if every is not None:
        return Every(every)
    return Cron(cron) if cron is not None else None
