"""The formats of an ``--archive-to`` file: gzip or zstd CSV (:mod:`.compressed`), or a
directory of parquet parts (:mod:`.parquet`). Each batch is checksummed by its format, and read
back only once its checksum holds (:class:`~engine.archive_formats.base.Damaged` otherwise).
"""

from __future__ import annotations

import csv
import hashlib
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from engine.archive_formats.base import Damaged, Encoder
from engine.archive_formats.compressed import Compressing, gzip_members, zstd_frames
from engine.archive_formats.parquet import PART, ParquetBatch, parquet_batches

SUFFIXES = {"gzip": ".csv.gz", "zstd": ".csv.zst", "parquet": ".parquet"}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"

__all__ = ["SUFFIXES", "Batch", "Damaged", "Encoder", "batches", "detected", "encoder", "members",
           "read_errors"]


class Batch(NamedTuple):
    rows: bytes
    """CSV: the header line for the first batch, else the batch's rows."""
    identity: bytes
    """What restore records the batch by: the SHA-256 of its rows as archived (gzip, zstd: the
    CSV itself; parquet: the digest its part carries), the same whatever reads it."""


def detected(path: Path) -> str | None:
    """The format of an existing archive: by its first bytes, or a directory of parquet parts."""
    if path.is_dir():
        return "parquet" if (path / PART.format(0)).exists() else None
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
    except OSError:
        return None
    return ("gzip" if start.startswith(GZIP_MAGIC) else "zstd" if start == ZSTD_MAGIC
            else "parquet" if start == PARQUET_MAGIC else None)


def encoder(fmt: str, schema: Any = None) -> Encoder:
    """How one batch's rows become what it appends (``schema``: parquet's)."""
    return ParquetBatch(schema) if fmt == "parquet" else Compressing(fmt)


def batches(path: Path) -> Iterator[Batch]:
    """The archive's batches one at a time: the header line, then one per batch (gzip members,
    zstd frames, or parquet parts), each only once its checksum is verified. Raises one of
    :func:`read_errors` for a batch that cannot be read, EOFError for one cut short,
    :class:`Damaged` for one whose checksum does not match."""
    fmt = detected(path)
    if fmt == "parquet":
        return _parquet_members(path)
    frames = zstd_frames(path) if fmt == "zstd" else gzip_members(path)
    return (Batch(rows, hashlib.sha256(rows).digest()) for rows in frames)


def members(path: Path) -> Iterator[bytes]:
    """The archive's batches as CSV bytes (see :func:`batches`)."""
    return (batch.rows for batch in batches(path))


def _parquet_members(path: Path) -> Iterator[Batch]:
    header = False
    for names, rows, identity in parquet_batches(path):
        if not header:
            line = io.StringIO()
            csv.writer(line, lineterminator="\n").writerow(names)
            yield Batch(line.getvalue().encode(), b"")
            header = True
        if rows:
            yield Batch(rows, identity)


def read_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged archive raises, for each format whose package is installed."""
    errors: list[type[Exception]] = [OSError, EOFError, zlib.error, ValueError, csv.Error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    try:
        import pyarrow  # type: ignore[import-untyped]
        errors.append(pyarrow.ArrowException)
    except ImportError:
        pass
    return tuple(errors)
