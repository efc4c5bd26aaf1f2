"""The latency guard's controller: the write rate a run may go at, from the probe's p99.

Pure logic, no database and no clock of its own (tests feed it): the probe (:mod:`engine.guard`)
gives it commit latencies and, once per control step, what the server says; it answers with a
rate in bytes per second (WAL, or pages dirtied if more: see :mod:`engine.throttle`). Slow start
from ``INITIAL_RATE``, doubled each calm step until the first step over the budget; then halved
on every step whose p99 passes the budget, grown by a share while it stays under ``ROOM`` of it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

PROBE_INTERVAL_S = 0.1
STEP_SAMPLES = 5
"""Probe samples per control step: the controller judges each ~0.5 s of fresh samples once,
so one slow commit halves the rate once, not once per step it stays in a sliding window."""
MiB = 2**20
INITIAL_RATE = 1.0 * MiB
"""WAL bytes per second a guarded run starts at: gentle (about 3,000 dense rows a second),
doubled each calm step, so a short run does not spend the budget in its first seconds."""
MIN_RATE = 16.0 * 1024
"""The floor (about 45 dense rows a second): an impossible budget still lets a run finish."""
MAX_RATE = 4096.0 * MiB
DECREASE = 0.5
SLOW_START_GROWTH = 2.0
INCREASE_SHARE = 0.125
"""Past slow start, a calm step adds this share of the rate (at least of the rate at the last
decrease): a share of the last decrease's rate alone took 240 s to climb back from 20 kB/s to
2 MiB/s after a burst of another load's spikes had halved it seven times (3M dense, busy host)."""
USED_HEADROOM = 2.0
"""The rate grows to at most this many times the WAL rate the server really wrote in the step:
a grant far above what the run can use would take many halvings to bite when the p99 rises."""
ROOM = 0.8
"""The rate goes up only while the step's p99 is under this share of the budget."""
FUTILE_STEPS = 3
FUTILE_GAIN = 0.9
"""Halvings whose steps' median p99 stays at 90% or more of the first step's did not help."""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: with few samples the p99 is the worst one, as it should be."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class RateControl:
    """The WAL rate (bytes per second) a run may write: slow start, then additive increase and
    multiplicative decrease on the probe's p99 against the budget.

    Pure logic, fed the probe's samples and, once per step, what the server says (tests give
    their own): :meth:`observe` says when a step is due, :meth:`step` takes it.
    """

    budget_ms: float
    rate: float = INITIAL_RATE
    threshold: float | None = None
    """The rate at the last decrease; None while the run is still in slow start."""
    pending: list[float] = field(default_factory=list)
    """Samples since the last step."""
    last_step_at: float | None = None
    decreases: int = 0
    increases: int = 0
    futile: int = 0
    """Steps over the budget that did not decrease, halving having not helped (see :meth:`step`)."""
    lowest: float = INITIAL_RATE
    _streak: list[float] = field(default_factory=list)
    """The p99 of each step over the budget since the last step well under it."""

    def observe(self, latency_ms: float) -> bool:
        """One probe sample; True once ``STEP_SAMPLES`` of them are due for a step."""
        self.pending.append(latency_ms)
        return len(self.pending) >= STEP_SAMPLES

    def step(self, now: float, used: float | None = None, checkpoint_requested: bool = False,
             evicting: float | None = None) -> float:
        """Judge the step's samples; ``used`` is the WAL rate the server wrote over the step. A
        requested checkpoint holds the rate where it is (not a decrease: a CREATE DATABASE
        requests a checkpoint too, and the probe's p99 says whether the application felt it);
        ``evicting`` (buffers a second client backends wrote themselves beyond their rate alone,
        see :class:`~engine.guard.Probe`) holds it too, however calm the probe: the application's
        reads and writes feel the run's dirty pages evicted in their way where the probe's
        one-row commit does not (10M dense beside pgbench, budget 14.5 ms, before the cleaning
        pace bounded the run's dirtying: the probe's p99 under 6 ms most steps, backends writing
        15,000 buffers a second, pgbench's p99 94.6 ms). Holds, not halves, since the run's
        dirtied pages go at the server's cleaning pace (:mod:`engine.cleaning`): halving on
        evictions as well kept pgbench at 0.20 of a 2x budget but the run at 1.37x the time that
        pace predicts (PostgreSQL 15, 10M dense). Returns the step's p99.

        Halving that does not help stops: once ``FUTILE_STEPS`` halvings since the p99 first
        passed the budget have left the median of the last steps' p99 as high as it was then
        (the rate 8x lower, the application as slow), the latency is not the run's doing
        (another load, a lock, a busy CPU), and going slower would only keep the run from
        completing; the rate holds until a step comes well under the budget (``futile`` counts
        the steps held). The median, and the first step for reference, because one step's p99
        is the worst of five commits: noise on a busy host must not read as progress."""
        p99 = percentile(self.pending, 99) or 0.0
        if p99 > self.budget_ms:
            self._judged(p99, now, used)
        elif p99 <= self.budget_ms * ROOM and not checkpoint_requested and evicting is None:
            self._streak.clear()
            self._increase(now, used)
        else:
            self._stepped(now)
        return p99

    def _judged(self, p99: float, now: float, used: float | None) -> None:
        """Halve, unless ``FUTILE_STEPS`` halvings have left the p99 as high as it was when the
        streak began: then hold (see :meth:`step`)."""
        self._streak.append(p99)
        recent = self._streak[-FUTILE_STEPS:]
        if len(self._streak) > FUTILE_STEPS and statistics.median(recent) >= self._streak[0] * FUTILE_GAIN:
            self.futile += 1
            self._stepped(now)
        else:
            self._decrease(now, used)

    def stalled(self, waiting_ms: float, now: float) -> None:
        """A probe write still in flight after more than the budget is a sample over it already:
        the controller must not wait for it to finish (a lock may hold it for seconds)."""
        step_s = STEP_SAMPLES * PROBE_INTERVAL_S
        if waiting_ms > self.budget_ms and (self.last_step_at is None or now - self.last_step_at >= step_s):
            self._decrease(now, None)

    def _decrease(self, now: float, used: float | None) -> None:
        base = min(self.rate, used) if used else self.rate  # halving an unused grant would not bite
        self.rate = max(MIN_RATE, base * DECREASE)
        self.threshold = self.rate
        self.decreases += 1
        self.lowest = min(self.lowest, self.rate)
        self._stepped(now)

    def _increase(self, now: float, used: float | None) -> None:
        grown = (self.rate * SLOW_START_GROWTH if self.threshold is None
                 else self.rate + max(self.rate, self.threshold) * INCREASE_SHARE)
        cap = max(self.rate, used * USED_HEADROOM) if used else MAX_RATE
        new = min(MAX_RATE, grown, cap)
        if new > self.rate:
            self.increases += 1
        self.rate = new
        self._stepped(now)

    def _stepped(self, now: float) -> None:
        self.pending.clear()
        self.last_step_at = now
