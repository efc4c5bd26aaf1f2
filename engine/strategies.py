"""The walks. Each turns a slice position and a batch size into one bounded DELETE.

A slice is a part of the table walked in one direction; ``position`` only moves forward and is
checkpointed with each batch, so a resumed run starts exactly after the last committed batch.
- physical: position = next heap block to visit, end = first block past the walk; needs no key.
- index/key on one integer key: position = last key visited (exclusive), end = last key of the
  walk (inclusive); the key walk does arithmetic on it, so it needs one.
- index on any other btree key (uuid, text, timestamp, composite): position = the last key
  visited as text values (None before the first), one slice walked to the key's end.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from psycopg import sql

from engine import archive_sink
from engine.config import StrategyName
from engine.db import Connection, one_row
from engine.planner import TableFacts
from engine.queries import Statements

Position = int | list[str] | None
"""A block number or an integer key; or an ordered key's values as text (None: before the first)."""

SWEEP: Literal["sweep"] = "sweep"
WalkName = StrategyName | Literal["sweep"]
"""How a slice is walked: one of the planned walks, or the sweep that follows them."""


@dataclass
class Slice:
    position: Position
    end: int | None
    """None: an ordered-key walk, which goes on to the key's end."""
    finished: bool = False
    leaf: str | None = None
    """The leaf partition it walks (qualified), for a partitioned table; None: the table itself."""
    strategy: WalkName | None = None
    """The leaf's walk (a partitioned table walks each leaf the way that fits it), or the sweep."""

    @property
    def done(self) -> bool:
        if self.finished:
            return True
        return isinstance(self.position, int) and self.end is not None and self.position >= self.end

    @property
    def number(self) -> int:
        """The position of a block or integer-key walk."""
        if not isinstance(self.position, int):
            raise TypeError(f"slice position {self.position!r} is not a block or an integer key")
        return self.position

    @property
    def bound(self) -> int:
        if self.end is None:
            raise TypeError("an ordered-key slice has no numeric end")
        return self.end

    def distance_to(self, position: Position) -> int:
        """Blocks or integer keys from here to ``position`` (the estimate's unit count)."""
        return position - self.number if isinstance(position, int) else 0

    def as_json(self) -> dict[str, Any]:
        record = {"position": self.position, "end": self.end, "finished": self.finished}
        return record if self.leaf is None else {**record, "leaf": self.leaf, "strategy": self.strategy}

    @classmethod
    def of_json(cls, data: dict[str, Any]) -> Slice:
        return cls(data["position"], data["end"], bool(data.get("finished", False)), data.get("leaf"),
                   data.get("strategy"))


@dataclass(frozen=True)
class BatchOutcome:
    deleted: int
    skipped_locked: int
    position: Position
    finished: bool = False
    references: dict[str, int] = field(default_factory=dict)
    """Per foreign key onto the table: garbage rows kept, or child rows deleted or changed."""


def split(start: int, end: int, parts: int) -> list[Slice]:
    """``parts`` disjoint slices covering (start, end] or [start, end), for parallel workers."""
    width = max(1, math.ceil((end - start) / parts))
    bounds = [*range(start, end, width), end]
    return [Slice(lo, hi) for lo, hi in itertools.pairwise(bounds)] or [Slice(start, end)]


class Strategy(Protocol):
    name: ClassVar[WalkName]
    max_units: ClassVar[int]
    units_are_rows: ClassVar[bool]
    """A unit is one garbage row (the index walk), not a block or a key of the table."""

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]: ...

    def units_for_rows(self, rows: int, facts: TableFacts) -> int: ...

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome: ...


@dataclass(frozen=True)
class RangeOutcome:
    deleted: int
    skipped: int
    references: dict[str, int]


def _delete_range(conn: Connection, st: Statements, range_: sql.Composable, params: dict[str, Any],
                  skip_locked: bool, by_ctid: bool) -> RangeOutcome:
    """Delete the garbage of a range; with skip_locked, leave the rows the app has locked (the
    free ones are locked first, and the rest of the batch works on exactly those). The child
    rows that go or change with it are counted first (and archived, or deleted first with
    ``--delete-dependents``); the garbage rows a foreign key holds are counted after."""
    rows, exact = range_, skip_locked
    if skip_locked:
        locked = [value for (value,) in conn.execute(st.lock_free_garbage(range_, by_ctid), params)]
        rows, params = st.locked(by_ctid), {**params, "msggc_locked": [str(v) for v in locked] if by_ctid
                                            else locked}
    references = _before_delete(conn, st, rows, params, exact)
    watched = st.changes_seen_in_statistics
    before = one_row(conn.execute(st.child_changes)) if watched else ()
    delete = st.delete_locked(by_ctid) if skip_locked else st.delete_range(range_)
    deleted = _streamed(conn, delete, params) if st.archive and st.archive.stream else \
        conn.execute(delete, params).rowcount
    skipped = int(one_row(conn.execute(st.count_garbage_in(range_), params))[0]) if skip_locked else 0
    if watched:
        after = one_row(conn.execute(st.child_changes))
        references.update((ref.name, int(a - b)) for ref, b, a in zip(watched, before, after, strict=True))
    if st.kept_by:
        kept = one_row(conn.execute(st.count_kept(range_), params))
        references.update((ref.name, int(n)) for ref, n in zip(st.kept_by, kept, strict=True))
    return RangeOutcome(deleted, skipped, references)


def _streamed(conn: Connection, statement: sql.Composed, params: dict[str, Any]) -> int:
    """Run ``COPY (DELETE ... RETURNING ...) TO STDOUT``, its rows handed block by block to the
    batch's archive file (:mod:`engine.archive_sink`); the count of rows deleted."""
    return archive_sink.copy_out(conn, statement, params, archive_sink.current())


def _before_delete(conn: Connection, st: Statements, range_: sql.Composable,
                   params: dict[str, Any], exact: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ref in st.changes_children:
        if ref in st.changes_seen_in_statistics:
            continue
        archived = None
        if (archive := st.child_archives.get(ref.name)) is not None:
            archived = conn.execute(st.archive_children(ref, range_, archive, exact), params).rowcount
        if ref.blocks:  # --delete-dependents: the children that hold the rows go first
            counts[ref.name] = conn.execute(st.delete_children(ref, range_, exact), params).rowcount
        elif archived is not None:  # the copy read exactly the rows the cascade will delete
            counts[ref.name] = archived
        else:
            counts[ref.name] = int(one_row(conn.execute(st.count_children(ref, range_, exact), params))[0])
    return counts


def _probed_range(conn: Connection, st: Statements, bound: sql.Composed, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
    """Delete the garbage up to the key ``size`` rows ahead, found by the index probe ``bound``."""
    probe = {**params, "lo": part.number, "end": part.bound, "offset": size - 1}
    row = conn.execute(bound, probe).fetchone()
    return _key_range_batch(conn, st, part, row[0] if row else part.bound, params, skip_locked)


def _key_range_batch(conn: Connection, st: Statements, part: Slice, hi: int, params: dict[str, Any],
                     skip_locked: bool) -> BatchOutcome:
    """Delete the garbage of the keys (position, hi]."""
    done = _delete_range(conn, st, st.key_range, {**params, "lo": part.number, "hi": hi}, skip_locked, False)
    return BatchOutcome(done.deleted, done.skipped, hi, references=done.references)


class PhysicalStrategy:
    """Walk the heap in TID ranges: sequential I/O, no index lookups; best for dense garbage."""

    name: ClassVar[WalkName] = "physical"
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
        hi = min(part.number + size, part.bound)
        params = {**params, "lo_tid": f"({part.number},0)", "hi_tid": f"({hi},0)"}
        done = _delete_range(conn, st, st.block_range, params, skip_locked, True)
        return BatchOutcome(done.deleted, done.skipped, hi, references=done.references)


class KeyStrategy:
    """Primary-key ranges whose upper bound an index-only probe finds (each_batch style)."""

    name: ClassVar[WalkName] = "key"
    units_are_rows: ClassVar[bool] = False
    max_units: ClassVar[int] = 2_000_000

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]:
        return _key_slices(facts, workers)

    def units_for_rows(self, rows: int, facts: TableFacts) -> int:
        return max(1, min(self.max_units, round(rows / max(facts.garbage_fraction, 0.001))))

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        return _probed_range(conn, st, st.key_upper_bound, part, size, params, skip_locked)


class DenseKeyStrategy(KeyStrategy):
    """Key ranges of ``size`` key values, cut by arithmetic: on a dense key (see
    :data:`engine.planner.DENSE_KEY_SPAN`) they hold about as many rows, and never more."""

    max_units: ClassVar[int] = 200_000
    """A range with no rows costs nothing, so the sizer grows across a gap in the keys (a probe
    would have skipped it): the cap bounds the batch that follows the gap. A stale row estimate
    that calls a gappy key dense costs batches of fewer rows, never larger ones."""

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        return _key_range_batch(conn, st, part, min(part.number + size, part.bound), params, skip_locked)


class IndexStrategy:
    """Keyset walk over the partial garbage index: touches only garbage; best when it is sparse."""

    name: ClassVar[WalkName] = "index"
    units_are_rows: ClassVar[bool] = True
    max_units: ClassVar[int] = 100_000

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]:
        return _key_slices(facts, workers)

    def units_for_rows(self, rows: int, facts: TableFacts) -> int:
        return max(1, min(self.max_units, rows))

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        if skip_locked or st.ranges_only:  # a range known before the delete: see _delete_range
            return _probed_range(conn, st, st.garbage_upper_bound, part, size, params, skip_locked)
        probe = {**params, "lo": part.number, "end": part.bound, "size": size}
        deleted, picked, last = one_row(conn.execute(st.delete_next_garbage, probe))
        return BatchOutcome(deleted, 0, last if picked == size else part.bound)


class OrderedKeyStrategy:
    """The index walk over any btree-ordered key: keyset pagination in key order, rows deleted by
    their ctid (a row that moved since it was picked is re-checked and left for the next run)."""

    name: ClassVar[WalkName] = "index"
    units_are_rows: ClassVar[bool] = True
    max_units: ClassVar[int] = 100_000

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]:
        return [Slice(position=None, end=None)]

    def units_for_rows(self, rows: int, facts: TableFacts) -> int:
        return max(1, min(self.max_units, rows))

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        after = part.position if isinstance(part.position, list) else None
        params = {**params, **st.key_values("after", after)}
        if not (skip_locked or st.ranges_only):
            deleted, picked, last = one_row(conn.execute(st.delete_next_by_key(after is not None),
                                                         {**params, "size": size}))
            return BatchOutcome(deleted, 0, last if picked else after, finished=picked < size)
        # a range known before the delete (see _delete_range): up to the garbage key ``size`` ahead
        probe = {**params, "offset": size - 1}
        row = conn.execute(st.ordered_garbage_bound(after is not None), probe).fetchone()
        hi = row[0] if row else None
        range_ = st.ordered_range(after is not None, hi is not None)
        done = _delete_range(conn, st, range_, {**params, **st.key_values("hi", hi)}, skip_locked, True)
        return BatchOutcome(done.deleted, done.skipped, hi if hi is not None else after, finished=hi is None,
                            references=done.references)


class SweepStrategy:
    """After the walk: the garbage keys read in one statement (``gc_sweep``), deleted by key in
    ranges of their numbers. A key does not move, so a row the application updates is found
    wherever its new version went; see :mod:`engine.walk` for when a run sweeps."""

    name: ClassVar[WalkName] = SWEEP
    units_are_rows: ClassVar[bool] = True
    max_units: ClassVar[int] = 100_000

    def slices(self, facts: TableFacts, workers: int) -> list[Slice]:
        raise TypeError("a sweep's slice is made after the walk, from the keys it read")

    def units_for_rows(self, rows: int, facts: TableFacts) -> int:
        return max(1, min(self.max_units, rows))

    def run_batch(self, conn: Connection, st: Statements, part: Slice, size: int,
                  params: dict[str, Any], skip_locked: bool) -> BatchOutcome:
        hi = min(part.number + size, part.bound)
        params = {**params, "lo": part.number, "hi": hi, "leaf": part.leaf or ""}
        done = _delete_range(conn, st, st.sweep_range, params, skip_locked, True)
        return BatchOutcome(done.deleted, done.skipped, hi, references=done.references)


def strategy_for(name: StrategyName, facts: TableFacts) -> Strategy:
    """The walk of that name for this table: the index walk of a table whose key is not one
    integer orders by the key's values instead of cutting integer ranges; the key walk of a
    dense key cuts its ranges without a probe."""
    if name == "index" and not facts.integer_key:
        return OrderedKeyStrategy()
    if name == "key" and facts.dense_key:
        return DenseKeyStrategy()
    return STRATEGIES[name]


def _key_slices(facts: TableFacts, workers: int) -> list[Slice]:
    if facts.key_min is None or facts.key_max is None:
        return [Slice(position=0, end=0)]
    return split(facts.key_min - 1, facts.key_max, workers)


def extended(slices: list[Slice], strategy: StrategyName, facts: TableFacts) -> list[Slice]:
    """A resumed walk also covers what the table gained past its recorded end: blocks appended
    to the heap, keys above the highest it planned for."""
    end = facts.blocks if strategy == "physical" else facts.key_max
    ends = [part.end for part in slices]
    if end is None or None in ends:  # an ordered-key walk already goes to the key's end
        return slices
    last = max((e for e in ends if e is not None), default=0)
    if end <= last:
        return slices
    return [*slices, Slice(position=last, end=end)]


STRATEGIES: dict[StrategyName, Strategy] = {
    "physical": PhysicalStrategy(), "key": KeyStrategy(), "index": IndexStrategy()
}
