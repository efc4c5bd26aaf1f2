"""The formats of an ``--archive-to`` file: gzip or zstd CSV (:mod:`.compressed`), or a
directory of parquet parts (:mod:`.parquet`). Each batch is checksummed by its format, and read
back only once its checksum holds (:class:`~engine.archive_formats.base.Damaged` otherwise).
"""

from __future__ import annotations

import csv
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.archive_formats.base import Damaged, Encoder
from engine.archive_formats.compressed import Compressing, gzip_members, zstd_frames
from engine.archive_formats.parquet import PART, ParquetBatch, parquet_batches

SUFFIXES = {"gzip": ".csv.gz", "zstd": ".csv.zst", "parquet": ".parquet"}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"

__all__ = ["SUFFIXES", "Damaged", "Encoder", "detected", "encoder", "members", "read_errors"]


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


def members(path: Path) -> Iterator[bytes]:
    """The archive's batches as CSV bytes, one at a time: the header line, then one per batch
    (gzip members, zstd frames, or parquet parts), each only once its checksum is verified.
    Raises one of :func:`read_errors` for a batch that cannot be read, EOFError for one cut short,
    :class:`Damaged` for one whose checksum does not match."""
    fmt = detected(path)
    if fmt == "parquet":
        return _parquet_members(path)
    if fmt == "zstd":
        return zstd_frames(path)
    return gzip_members(path)


def _parquet_members(path: Path) -> Iterator[bytes]:
    header = False
    for names, rows in parquet_batches(path):
        if not header:
            line = io.StringIO()
            csv.writer(line, lineterminator="\n").writerow(names)
            yield line.getvalue().encode()
            header = True
        if rows:
            yield rows


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
