"""Parquet: a directory of parts, ``part-000000.parquet`` (no rows: the schema) and one part per
batch (one row group), each durable under its final name before its batch commits.

Numbers, booleans, dates and timestamps are typed; every other column holds PostgreSQL's text
form of the value. PostgreSQL's CSV writes NULL as an empty unquoted field and the empty string
quoted, so only that unquoted empty field is NULL here: the text ``NULL``, ``NA`` or ``NaN`` and
the float NaN stay values (Arrow's default list of null spellings turned them into NULL).

Each part records in its metadata (``msggc.sha256``) the SHA-256 of its values as Arrow reads
them back (:func:`digest`). The reader recomputes it before a row of the part is handed on: a
flipped bit in a page, or in the footer that says how to read the pages, is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.archive_formats.base import Damaged, fsync_directory, missing_package
from engine.errors import MsggcError, UsageError

PART = "part-{:06d}.parquet"
DIGEST_KEY = b"msggc.sha256"
ARROW_TYPES = {"smallint": "int16", "integer": "int32", "bigint": "int64", "real": "float32",
               "double precision": "float64", "boolean": "bool_", "date": "date32"}


def arrow() -> Any:
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.csv  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError:
        raise missing_package("pyarrow") from None
    return pyarrow


def arrow_schema(types: dict[str, str]) -> Any:
    """The parquet columns of the table's (``format_type`` names), then the bookkeeping."""
    pa = arrow()
    fields = []
    for name, type_ in {**types, "archived_at": "timestamp with time zone", "run_id": "bigint"}.items():
        if type_.startswith("timestamp"):
            typed = pa.timestamp("us", tz="UTC" if "with time zone" in type_ else None)
        else:
            typed = getattr(pa, ARROW_TYPES.get(type_, "string"))()
        fields.append(pa.field(name, typed))
    return pa.schema(fields)


def rows_csv(table: Any) -> bytes:
    """A part's rows as restore loads them: CSV, strings quoted, NULL an empty unquoted field."""
    pa = arrow()
    out = io.BytesIO()
    pa.csv.write_csv(table, out, pa.csv.WriteOptions(include_header=False))
    return out.getvalue()


def digest(table: Any) -> bytes:
    """The SHA-256 of a part's values: its column names and types (a timestamp's unit among
    them), then its CSV with every float, timestamp and date as the bits Arrow holds. Only
    integers, booleans and strings are formatted, so neither a change in how a pyarrow version
    writes a float nor the cost of formatting timestamps (seven times the part's own encoding)
    touches it."""
    pa = arrow()
    plain = pa.table([_as_bits(column) for column in table.columns], names=table.schema.names)
    types = "\n".join(f"{field.name}: {field.type}" for field in table.schema).encode()
    return hashlib.sha256(types + b"\n\n" + rows_csv(plain)).hexdigest().encode()


def _as_bits(column: Any) -> Any:
    pa = arrow()
    kind = column.type
    if not (pa.types.is_floating(kind) or pa.types.is_timestamp(kind) or pa.types.is_date(kind)):
        return column
    bits = pa.int64() if kind.bit_width == 64 else pa.int32()
    return pa.chunked_array([chunk.view(bits) for chunk in column.chunks], bits)


def part_bytes(table: Any) -> bytes:
    """One part holding ``table`` in one row group, with the digest of its values."""
    pa = arrow()
    digest_ = digest(table)
    table = table.replace_schema_metadata({DIGEST_KEY: digest_})
    out = pa.BufferOutputStream()
    # no dictionary pages: 40% less time and smaller parts on message rows (statistics kept,
    # for readers' predicate pushdown)
    pa.parquet.write_table(table, out, row_group_size=max(1, table.num_rows), compression="zstd",
                           use_dictionary=False)
    return bytes(out.getvalue().to_pybytes())


class ParquetBatch:
    """A batch's CSV rows, parsed by Arrow into the archive's schema: one parquet part."""

    def __init__(self, schema: Any) -> None:
        self._schema = schema
        self._rows = bytearray()

    def write(self, block: bytes | bytearray | memoryview) -> None:
        self._rows += block

    def finish(self) -> bytes:
        if not self._rows:
            return b""
        pa = arrow()
        convert = pa.csv.ConvertOptions(
            column_types=self._schema, null_values=[""], strings_can_be_null=True,
            quoted_strings_can_be_null=False, true_values=["t"], false_values=["f"])
        try:
            table = pa.csv.read_csv(pa.py_buffer(bytes(self._rows)),
                                    read_options=pa.csv.ReadOptions(column_names=self._schema.names,
                                                                    use_threads=False),
                                    # a quoted value may hold a newline: without this, a batch
                                    # over one read block (1 MiB) fails to parse
                                    parse_options=pa.csv.ParseOptions(newlines_in_values=True),
                                    convert_options=convert)
        except pa.ArrowException as exc:
            raise MsggcError(f"cannot write a row to parquet: {exc}") from None
        return part_bytes(table)

    def abort(self) -> None:
        self._rows = bytearray()


def create_directory(path: Path, schema: Any) -> int:
    """A new directory (owner only) holding the schema part; one part recorded."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
    except FileExistsError:
        raise UsageError(f"archive file {path} already exists: choose a new path") from None
    except OSError as exc:
        raise UsageError(f"cannot create archive directory {path}: {exc.strerror}") from None
    write_part(path, 0, part_bytes(schema.empty_table()))
    fsync_directory(path.parent)
    return 1


def write_part(directory: Path, number: int, data: bytes) -> None:
    """One part, durable under its final name before the batch commits."""
    final = directory / PART.format(number)
    temporary = final.with_suffix(".tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    fsync_directory(directory)


def parts(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in directory.iterdir():
        stem = entry.name.removeprefix("part-").removesuffix(".parquet")
        if entry.name.startswith("part-") and entry.name.endswith(".parquet") and stem.isdigit():
            found.append((int(stem), entry))
    return sorted(found)


def trim_parts(path: Path, size: int) -> None:
    """Remove the parts of batches that never committed (past the ``size`` recorded)."""
    if not path.is_dir():
        raise MsggcError(f"archive directory {path} of an unfinished run is missing")
    for leftover in path.glob("*.tmp"):
        leftover.unlink()
    found = parts(path)
    if len(found) < size or [n for n, _ in found[:size]] != list(range(size)):
        raise MsggcError(f"archive directory {path} lacks parts its run recorded ({size:,}):"
                         " it was changed outside msggc")
    for _, extra in found[size:]:
        extra.unlink()
    fsync_directory(path)


def parquet_batches(path: Path) -> Iterator[tuple[list[str], bytes, bytes]]:
    """Each part's column names, rows (CSV) and identity (its digest), once its digest is checked.
    A part without a digest is read as it is only when the first part has none either (written
    before digests); its identity is then the SHA-256 of its CSV."""
    pa = arrow()
    files = [part for _, part in parts(path)] if path.is_dir() else [path]
    digested: bool | None = None
    for part in files:
        table = pa.parquet.read_table(part)
        recorded = (table.schema.metadata or {}).get(DIGEST_KEY)
        digested = recorded is not None if digested is None else digested
        rows = rows_csv(table)
        if recorded is None and digested:
            raise Damaged(f"{part.name} carries no checksum, unlike the first part: the file is damaged")
        if recorded is not None and digest(table) != recorded:
            raise Damaged(f"{part.name} does not match its checksum: the file is damaged")
        identity = bytes.fromhex(recorded.decode()) if recorded else hashlib.sha256(rows).digest()
        yield table.schema.names, rows, identity
