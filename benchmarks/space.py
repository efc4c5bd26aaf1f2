"""Room on the server's disk before a run: at 100M rows a run that fills it fails an hour in.

Why an estimate from rows and not a measurement: the seed is what would fill the disk. Per row,
``benchmarks.dataset.Layout.bytes_per_row`` (measured); on top, twice ``max_wal_size`` (WAL is
recycled at checkpoints, but a checkpoint can lag behind a bulk load or a one-statement DELETE),
and the temporary files of the seed's index sorts (about the largest index, a tenth of the
database) or 1 GiB, whichever is more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GIB = 2**30
SORT_SHARE = 0.1
MIN_MARGIN = GIB


@dataclass(frozen=True)
class Need:
    """What a run needs on the server's disk at its peak, by part, in bytes."""

    databases: int
    wal: int
    margin: int
    held: str
    """Which databases exist at once, in words."""

    @property
    def total(self) -> int:
        return self.databases + self.wal + self.margin

    def describe(self) -> str:
        return (f"{gib(self.total)} (databases {gib(self.databases)}: {self.held};"
                f" WAL {gib(self.wal)}: 2 x max_wal_size; index sorts and margin {gib(self.margin)})")


def gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def need(datasets: Sequence[int], max_wal_bytes: int, *, seed_each: bool = False,
         kept: Sequence[int] | None = None) -> Need:
    """The peak of a run whose datasets take ``datasets`` bytes each, run one after another.

    Seeding each contender, one database exists at a time; else a template and its copy, or
    with templates kept, every template this run seeds (``kept``: their bytes; a reused one is
    on disk already) stays to the end beside the copy of the largest."""
    largest = max(datasets, default=0)
    margin = max(MIN_MARGIN, round(largest * SORT_SHARE))
    wal = 2 * max_wal_bytes
    if seed_each:
        return Need(largest, wal, margin, "one database at a time")
    if kept is not None:
        return Need(sum(kept) + largest, wal, margin, f"{len(kept)} new template(s) kept and a copy")
    return Need(2 * largest, wal, margin, "a template and its copy")


def shortfall(required: Need, free: int, where: str) -> str | None:
    """The refusal, saying what is needed and what is free; None when it fits."""
    if required.total <= free:
        return None
    return (f"not enough disk for this run, nothing seeded: it needs {required.describe()},"
            f" {gib(free)} free in {where}")
