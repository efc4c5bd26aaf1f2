"""How big the next batch is, in the walk's units (heap blocks, keys or garbage rows)."""

from __future__ import annotations

import math

DEFAULT_BATCH_ROWS = 2000
MAX_STEP = 2.0
"""The most a batch grows (or 1/MAX_STEP it shrinks) toward a duration: one odd batch never swings it."""
ROWS_STEP = 4.0
"""Toward a row count the step may be larger: rows per unit change only with the table's density."""


class BatchSizer:
    """Steers the size toward a target: a batch duration, or with a fixed ``--batch-size`` that
    many rows. Rows, not units: a block or a key range holds as much garbage as the part of the
    table it covers, which the planner's table-wide sample does not know (a resumed walk's
    remaining part may be far denser than the table's average)."""

    def __init__(self, initial: int, maximum: int, target_s: float, target_rows: int | None,
                 units_are_rows: bool = False) -> None:
        if target_rows is not None and not units_are_rows:  # calibrate small rather than overshoot
            initial = round(initial / ROWS_STEP)
        self.size = max(1, min(initial, maximum))
        self.maximum = maximum
        self.target_s = target_s
        self.target_rows = target_rows

    def observe(self, seconds: float, rows: int, cost: int | None = None,
                cost_cap: int | None = None) -> None:
        """Step toward the target after a batch of ``rows`` that took ``seconds``; with a bound
        (the latency guard's), never past the size whose cost (its WAL, or its dirtied pages if
        more), at this batch's cost per unit, would exceed ``cost_cap``: one batch must not
        queue a burst of flushing."""
        walked = self.size
        self._toward_target(seconds, rows)
        if cost and cost_cap:
            self.size = max(1, min(self.size, math.floor(cost_cap * walked / cost)))

    def _toward_target(self, seconds: float, rows: int) -> None:
        if self.target_rows is not None:
            step = ROWS_STEP
            factor = self.target_rows / rows if rows else step
        elif seconds > 0:
            step = MAX_STEP
            factor = self.target_s / seconds
        else:
            return
        factor = min(step, max(1 / step, factor))
        self.size = max(1, min(self.maximum, round(self.size * factor)))

    def shrink(self) -> bool:
        """Halve after a statement timeout, and never grow past that again (the next batch of the
        old size would time out too); False when there is nothing left to halve."""
        if self.size == 1:
            return False
        self.size = self.maximum = max(1, self.size // 2)
        return True
