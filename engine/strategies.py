"""The three walks. Each turns a slice position and a batch size into one bounded DELETE.

A slice is a part of the table walked in one direction; ``position`` only moves forward and is
checkpointed with each batch, so a resumed run starts exactly after the last committed batch.
- physical: position = next heap block to visit, end = first block past the walk.
- index/key: position = last key visited (exclusive), end = last key of the walk (inclusive).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from psycopg import sql

from engine.config import StrategyName
from engine.db import Connection, one_row
from engine.planner import TableFacts
from engine.queries import Statements


@dataclass
class Slice:
    position: int
    end: int

    @property
    def done(self) -> bool:
        return self.position >= self.end

    def as_json(self) -> dict[str, int]:
        return {"position": self.position, "end": self.end}


@dataclass(frozen=True)
class BatchOutcome:
    deleted: int
    skipped_locked: int
    position: int


def split(start: int, end: int, parts: int) -> list[Slice]:
    """``parts`` disjoint slices covering (start, end] or [start, end), for parallel workers."""
    width = max(1, math.ceil((end - start) / parts))
    bounds = [*range(start, end, width), end]
    return [Slice(lo, hi) for lo, hi in itertools.pairwise(bounds)] or [Slice(start, end)]


class Strategy(Protocol):
    name: ClassVar[StrategyName]
    max_units: ClassVar[int]
    units_are_rows: ClassVar[bool]
    """A unit is one garbage row (the index walk), not a block or a key of the table."""

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]: ...

    def units_for_rows(self, rows: int, facts: TableFacts) -> int: ...

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome: ...


def _delete_range(conn: Connection, st: Statements, range_: sql.Composable, params: dict[str, Any],
                  skip_locked: bool, by_ctid: bool) -> tuple[int, int]:
    """Delete the garbage of a range; with skip_locked, leave the rows the app has locked."""
    if not skip_locked:
        return conn.execute(st.delete_range(range_), params).rowcount, 0
    deleted = conn.execute(st.delete_range_skip_locked(range_, by_ctid), params).rowcount
    skipped = int(one_row(conn.execute(st.count_garbage_in(range_), params))[0])
    return deleted, skipped


def _probed_range(conn: Connection, st: Statements, bound: sql.Composed, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
    """Delete the garbage up to the key ``size`` rows ahead, found by the index probe ``bound``."""
    probe = {**params, "lo": part.position, "end": part.end, "offset": size - 1}
    row = conn.execute(bound, probe).fetchone()
    hi = row[0] if row else part.end
    params = {**params, "lo": part.position, "hi": hi}
    deleted, skipped = _delete_range(conn, st, st.key_range, params, skip_locked, False)
    return BatchOutcome(deleted, skipped, hi)


class PhysicalStrategy:
    """Walk the heap in TID ranges: sequential I/O, no index lookups; best for dense garbage."""

    name: ClassVar[StrategyName] = "physical"
    units_are_rows: ClassVar[bool] = False
    max_units: ClassVar[int] = 4096
    """32 MB of heap: the sizer steers by the last batch, but a batch costs ~10x more once the
    walk leaves cached blocks for cold ones; the cap bounds that jump (dense batches stay under)."""

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]:
        return split(0, facts.blocks, workers)

    def units_for_rows(self, rows: int, facts: TableFacts) -> int:
        garbage_per_block = max(facts.rows_per_block * facts.garbage_fraction, 0.01)
        return max(1, min(self.max_units, round(rows / garbage_per_block)))

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        hi = min(part.position + size, part.end)
        params = {**params, "lo_tid": f"({part.position},0)", "hi_tid": f"({hi},0)"}
        deleted, skipped = _delete_range(conn, st, st.block_range, params, skip_locked, True)
        return BatchOutcome(deleted, skipped, hi)


class KeyStrategy:
    """Primary-key ranges whose upper bound an index-only probe finds (each_batch style)."""

    name: ClassVar[StrategyName] = "key"
    units_are_rows: ClassVar[bool] = False
    max_units: ClassVar[int] = 2_000_000

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]:
        return _key_slices(facts, workers)

    def units_for_rows(self, rows: int, facts: TableFacts) -> int:
        return max(1, min(self.max_units, round(rows / max(facts.garbage_fraction, 0.001))))

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        return _probed_range(conn, st, st.key_upper_bound, part, size, params, skip_locked)


class IndexStrategy:
    """Keyset walk over the partial garbage index: touches only garbage; best when it is sparse."""

    name: ClassVar[StrategyName] = "index"
    units_are_rows: ClassVar[bool] = True
    max_units: ClassVar[int] = 100_000

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]:
        return _key_slices(facts, workers)

    def units_for_rows(self, rows: int, facts: TableFacts) -> int:
        return max(1, min(self.max_units, rows))

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        if skip_locked:  # after a lock timeout: the same range, leaving the rows the app has locked
            return _probed_range(conn, st, st.garbage_upper_bound, part, size, params, True)
        probe = {**params, "lo": part.position, "end": part.end, "size": size}
        deleted, picked, last = one_row(conn.execute(st.delete_next_garbage, probe))
        return BatchOutcome(deleted, 0, last if picked == size else part.end)


def _key_slices(facts: TableFacts, workers: int) -> list[Slice]:
    if facts.key_min is None or facts.key_max is None:
        return [Slice(position=0, end=0)]
    return split(facts.key_min - 1, facts.key_max, workers)


def extended(slices: list[Slice], strategy: StrategyName, facts: TableFacts) -> list[Slice]:
    """A resumed walk also covers what the table gained past its recorded end: blocks appended
    to the heap, keys above the highest it planned for."""
    end = facts.blocks if strategy == "physical" else facts.key_max
    last = max((part.end for part in slices), default=0)
    if end is None or end <= last:
        return slices
    return [*slices, Slice(position=last, end=end)]


STRATEGIES: dict[StrategyName, Strategy] = {
    s.name: s for s in (PhysicalStrategy(), KeyStrategy(), IndexStrategy())
}
