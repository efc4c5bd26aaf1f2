"""``--archive-to FILE``: deleted rows streamed with ``COPY (DELETE ... RETURNING ...) TO STDOUT``
into a compressed CSV file (gzip or zstd) or a directory of parquet parts.

Each batch's DELETE runs inside COPY (no temp table): its rows, with ``archived_at`` and
``run_id``, stream to the client as CSV in the batch's transaction and are compressed on another
thread while they arrive (:class:`_Compressing`) into one gzip member or one zstd frame (libzstd
compresses with its own threads). Before the batch commits, the member is appended to the file
and fsynced, under a lock held up to the commit so that appends land in commit order; the run's
row in ``gc_runs`` records the file's length with each checkpoint, in the same transaction as
the delete. A crash between the fsync and the commit leaves a tail that the next run cuts off
(``truncate`` to the recorded length): the file holds every committed batch's rows exactly once.
Members and frames are self-delimiting, so a file cut at a batch boundary is a valid file.

Parquet (``--archive-format parquet``, or a target named ``*.parquet``): a parquet file's footer
is written when it closes, so one growing file cannot be cut back to a batch boundary. The target
is a directory instead, holding ``part-000000.parquet`` (no rows: the schema) and one part per
batch (one row group), each written to a temporary name, fsynced and renamed (with its directory
fsynced) before the batch commits. The checkpoint records the number of parts (in
``gc_runs.archive_bytes``); a resumed run removes the parts past it. DuckDB reads it as
``read_parquet('DIR/*.parquet')``, pandas as ``pd.read_parquet('DIR')``. Column types come from
the table's (integers, floats, booleans, timestamps, dates; text for every other type, in
PostgreSQL's text form, which restore reads back as such).

``msggc restore --file`` reads the three (the format is told by the file's first bytes, or a
directory of parts) and inserts the rows back.
"""

from __future__ import annotations

import csv
import io
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from psycopg import errors as pg_errors
from psycopg import sql

from engine import archive_sink, runs
from engine.archive import BOOKKEEPING_COLUMNS, column_types, table_columns
from engine.config import TableSpec, archive_format_for
from engine.db import Connection, regclass_of, table_ident
from engine.errors import MsggcError, TargetTableError, UsageError
from engine.queries import Archive

OUTGOING = TableSpec(name="msggc_outgoing", schema="pg_temp")
"""Where ``restore`` loads a batch's rows before inserting them (ON COMMIT DELETE ROWS)."""
COMPRESS_LEVEL = 1
"""zlib's fastest level: the file is written inside the batch, so speed matters more than size."""
ZSTD_LEVEL = 1
ZSTD_THREADS = -1
"""libzstd's own worker threads, as many as the machine has cores."""
CSV_OPTIONS = sql.SQL("(FORMAT csv)")
READ_CHUNK = 1 << 20
HAND_OVER = 1 << 20
"""The COPY stream arrives a row at a time; the compressor takes it a MiB at a time."""
SUFFIXES = {"gzip": ".csv.gz", "zstd": ".csv.zst", "parquet": ".parquet"}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
PART = "part-{:06d}.parquet"


def outgoing_archive(columns: tuple[str, ...]) -> Archive:
    """The batch statements' archive target when rows go to a file: streamed through COPY."""
    return Archive(table=OUTGOING, columns=columns, stream=True)


def prepare(conn: Connection, table: TableSpec) -> None:
    """Nothing to prepare per session any more: a batch's rows stream out of its DELETE."""


def _prepare_loading(conn: Connection, table: TableSpec) -> None:
    """This session's temp table that ``restore`` loads each batch into."""
    conn.execute(sql.SQL(
        "CREATE TEMP TABLE IF NOT EXISTS {outgoing} (LIKE {table},"
        " archived_at timestamptz NOT NULL, run_id bigint) ON COMMIT DELETE ROWS"
    ).format(outgoing=sql.Identifier(OUTGOING.name), table=table_ident(table)))


def _missing(package: str) -> MsggcError:
    return UsageError(f"this archive format needs the {package} package: pip install 'msggc[archive]'")


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise _missing("zstandard") from None
    return zstandard


def _arrow() -> Any:
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.csv  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError:
        raise _missing("pyarrow") from None
    return pyarrow


# -- one batch's rows ---------------------------------------------------------------------------

class Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class Encoder(Protocol):
    def write(self, block: bytes | bytearray | memoryview) -> None: ...

    def finish(self) -> bytes:
        """What the batch appends: b"" when it moved no row."""
        ...

    def abort(self) -> None: ...


def _compressor(fmt: str) -> Compressor:
    if fmt == "zstd":
        return _zstd().ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS).compressobj()  # type: ignore[no-any-return]
    return zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)  # 31: a gzip member, mtime 0


class _Compressing:
    """A batch's CSV rows compressed into one gzip member or zstd frame on a thread of its own,
    while the COPY stream is still arriving (zlib and libzstd release the GIL)."""

    def __init__(self, fmt: str) -> None:
        self._compressor = _compressor(fmt)
        self._pending = bytearray()
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._out = bytearray()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._any = False

    def write(self, block: bytes | bytearray | memoryview) -> None:
        self._pending += block
        if len(self._pending) >= HAND_OVER:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="msggc-archive-compress", daemon=True)
            self._thread.start()
        self._any = True
        self._chunks.put(bytes(self._pending))
        self._pending.clear()

    def _run(self) -> None:
        try:
            while (chunk := self._chunks.get()) is not None:
                self._out += self._compressor.compress(chunk)
        except BaseException as exc:  # handed to finish(), in the batch's thread
            self._error = exc

    def finish(self) -> bytes:
        if self._thread is None:  # a small batch: compressed here
            if not self._pending:
                return b""
            return self._compressor.compress(bytes(self._pending)) + self._compressor.flush()
        if self._pending:
            self._hand_over()
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            raise MsggcError(f"cannot compress the archive: {self._error}")
        return bytes(self._out + self._compressor.flush())

    def abort(self) -> None:
        if self._thread is not None:
            self._chunks.put(None)


def _compressed(fmt: str, data: bytes) -> bytes:
    compressor = _compressor(fmt)
    return compressor.compress(data) + compressor.flush()


ARROW_TYPES = {"smallint": "int16", "integer": "int32", "bigint": "int64", "real": "float32",
               "double precision": "float64", "boolean": "bool_", "date": "date32"}


def _arrow_schema(types: dict[str, str]) -> Any:
    """The parquet columns of the table's: numbers, booleans, dates and timestamps typed,
    everything else as PostgreSQL's text form of the value."""
    pa = _arrow()
    fields = []
    for name, type_ in {**types, "archived_at": "timestamp with time zone", "run_id": "bigint"}.items():
        if type_.startswith("timestamp"):
            arrow = pa.timestamp("us", tz="UTC" if "with time zone" in type_ else None)
        else:
            arrow = getattr(pa, ARROW_TYPES.get(type_, "string"))()
        fields.append(pa.field(name, arrow))
    return pa.schema(fields)


def _parquet_bytes(table: Any) -> bytes:
    pa = _arrow()
    out = pa.BufferOutputStream()
    # no dictionary pages: 40% less time and smaller parts on message rows (statistics kept,
    # for readers' predicate pushdown)
    pa.parquet.write_table(table, out, row_group_size=max(1, table.num_rows), compression="zstd",
                           use_dictionary=False)
    return bytes(out.getvalue().to_pybytes())


class _ParquetBatch:
    """A batch's CSV rows, parsed by Arrow into the archive's schema: one parquet part."""

    def __init__(self, schema: Any) -> None:
        self._schema = schema
        self._rows = bytearray()

    def write(self, block: bytes | bytearray | memoryview) -> None:
        self._rows += block

    def finish(self) -> bytes:
        if not self._rows:
            return b""
        pa = _arrow()
        convert = pa.csv.ConvertOptions(
            column_types=self._schema, strings_can_be_null=True, quoted_strings_can_be_null=False,
            true_values=["t"], false_values=["f"])
        try:
            table = pa.csv.read_csv(pa.py_buffer(bytes(self._rows)),
                                    read_options=pa.csv.ReadOptions(column_names=self._schema.names,
                                                                    use_threads=False),
                                    convert_options=convert)
        except pa.ArrowException as exc:
            raise MsggcError(f"cannot write a row to parquet: {exc}") from None
        return _parquet_bytes(table)

    def abort(self) -> None:
        self._rows = bytearray()


# -- the run's file -------------------------------------------------------------------------

def _detected(path: Path) -> str | None:
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


def _requested_format(conn: Connection, run_id: int) -> str | None:
    """``--archive-format`` as the run recorded it with its options (None: from the name)."""
    row = conn.execute("SELECT options->>'archive_format' FROM gc_runs WHERE id = %s", (run_id,)).fetchone()
    return str(row[0]) if row and row[0] else None


class ArchiveFile:
    """The run's file, shared by its workers; appends are serialised up to their commit."""

    def __init__(self, path: Path, run_id: int, size: int, fmt: str = "gzip",
                 schema: Any = None) -> None:
        self.path = path
        self.run_id = run_id
        self.size = size
        """Bytes of the file; for parquet, parts in the directory (the schema part included)."""
        self.format = fmt
        self.schema = schema
        self.stale = False
        """Set when a batch failed after appending: its commit may or may not have happened,
        so the next append first trims the file to the length the database recorded."""
        self._lock = threading.Lock()

    @classmethod
    def open(cls, conn: Connection, target: Path | str, table: TableSpec, columns: tuple[str, ...],
             run: runs.Run) -> ArchiveFile:
        """Continue the file of the run this one resumes (cut to its recorded length), or start a
        new file with a CSV header (parquet: a directory with the schema part); an existing file
        that is not the run's own is never touched. ``target`` is the file, or a directory for one
        ``<table>-run<id>.csv.gz`` (``.csv.zst``, ``.parquet``) per run."""
        previous = runs.archive_state(conn, run.id) or (
            runs.archive_state(conn, run.resumed_from) if run.resumed_from else None)
        earlier = Path(previous[0]) if previous else None
        check_target(target, earlier)
        target = Path(target)
        container = target.is_dir() and not (earlier is not None and target.resolve() == earlier.resolve())
        requested = _requested_format(conn, run.id)
        fmt = archive_format_for(None if container else str(target), requested)
        path = target / f"{table.qualified}-run{run.id}{SUFFIXES[fmt]}" if container else target
        size = 0
        if previous is not None and earlier is not None:
            recorded = previous[1]
            same = earlier.resolve() == path.resolve()
            found = _detected(earlier)
            if same and found is not None and found != fmt:
                if requested is not None:
                    raise UsageError(f"archive file {path} of the run being resumed is {found}, not"
                                     f" {requested}: resume it with --archive-format {found}")
                fmt = found
            if same or earlier.exists():
                _trim(earlier, recorded, found or fmt)
            size = recorded if same else 0
        schema = None
        if fmt == "parquet":
            oid = regclass_of(conn, table)
            types = column_types(conn, oid) if oid is not None else {}
            schema = _arrow_schema({c: types.get(c, "text") for c in columns})
        if size == 0:
            size = _create_parquet(path, schema) if fmt == "parquet" else _create(
                path, _compressed(fmt, _header(columns)))
        runs.record_archive(conn, run.id, str(path.resolve()), size)
        return cls(path, run.id, size, fmt, schema)

    def encoder(self) -> Encoder:
        return _ParquetBatch(self.schema) if self.format == "parquet" else _Compressing(self.format)

    @contextmanager
    def turn(self) -> Iterator[ArchiveTurn]:
        """Enclose a batch transaction: the batch's streamed rows are encoded while they arrive,
        and the file stays locked from the append to the commit, so appends land in commit order
        and each checkpoint records the file's length."""
        turn = ArchiveTurn(self, self._lock, self.encoder())
        try:
            with archive_sink.receiving(turn.encoder):
                yield turn
        except BaseException:
            turn.encoder.abort()
            self.stale = self.stale or turn.appended
            raise
        finally:
            if turn.appended:
                self._lock.release()

    def append_locked(self, conn: Connection, member: bytes) -> int:
        """Append and fsync one batch's member (parquet: its part); the caller holds the lock."""
        if self.stale:
            recorded = runs.archive_state(conn, self.run_id)
            self.size = recorded[1] if recorded else self.size
            _trim(self.path, self.size, self.format)
            self.stale = False
        if member:
            try:
                if self.format == "parquet":
                    _write_part(self.path, self.size, member)
                    self.size += 1
                else:
                    with self.path.open("r+b") as handle:
                        handle.seek(self.size)
                        handle.write(member)
                        handle.flush()
                        os.fsync(handle.fileno())
                    self.size += len(member)
            except OSError as exc:
                raise MsggcError(f"cannot write archive file {self.path}: {exc.strerror}") from None
        return self.size


class ArchiveTurn:
    """One batch's use of the file."""

    def __init__(self, file: ArchiveFile, lock: threading.Lock, encoder: Encoder) -> None:
        self.file = file
        self.lock = lock
        self.encoder = encoder
        self.appended = False

    def append(self, conn: Connection) -> int:
        """Append the batch's streamed rows to the file and fsync; the length to checkpoint."""
        member = self.encoder.finish()
        self.lock.acquire()
        self.appended = True
        return self.file.append_locked(conn, member)


def _header(columns: tuple[str, ...]) -> bytes:
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow([*columns, *BOOKKEEPING_COLUMNS])
    return line.getvalue().encode()


def check_target(target: Path | str, resuming: Path | None = None) -> None:
    """Refuse an ``--archive-to`` target the run could not write, before the run starts; the file
    of the run being resumed (``resuming``) is the one existing file that may be continued."""
    path = Path(target)
    if resuming is not None and path.resolve() == resuming.resolve():
        return
    if str(target).endswith(("/", os.sep)) and not path.is_dir():
        raise UsageError(f"archive directory {target} does not exist: create it first"
                         " (a target ending in / names a directory)")
    if path.is_dir() and _detected(path) is None:
        _require_writable(path)
        return
    if os.path.lexists(path):
        raise _exists(path)
    if not path.parent.is_dir():
        raise UsageError(f"cannot create archive file {path}: directory {path.parent} does not exist")
    _require_writable(path.parent)


def _require_writable(directory: Path) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"archive directory {directory} is not writable")


def _exists(path: Path) -> UsageError:
    return UsageError(f"archive file {path} already exists: choose a new path")


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory.resolve(), os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _create(path: Path, header: bytes) -> int:
    """A new file holding the header, durable with its directory entry; only its owner may read
    it (it holds message payloads), whatever the umask."""
    try:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(header)
            handle.flush()
            os.fsync(handle.fileno())
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise UsageError(f"cannot create archive file {path}: {exc.strerror}") from None
    _fsync_directory(path.parent)
    return len(header)


def _create_parquet(path: Path, schema: Any) -> int:
    """A new directory (owner only) holding the schema part; one part recorded."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise UsageError(f"cannot create archive directory {path}: {exc.strerror}") from None
    _write_part(path, 0, _parquet_bytes(schema.empty_table()))
    _fsync_directory(path.parent)
    return 1


def _write_part(directory: Path, number: int, data: bytes) -> None:
    """One part, durable under its final name before the batch commits."""
    final = directory / PART.format(number)
    temporary = final.with_suffix(".tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_directory(directory)


def _parts(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in directory.iterdir():
        stem = entry.name.removeprefix("part-").removesuffix(".parquet")
        if entry.name.startswith("part-") and entry.name.endswith(".parquet") and stem.isdigit():
            found.append((int(stem), entry))
    return sorted(found)


def _trim(path: Path, size: int, fmt: str = "gzip") -> None:
    """Cut the rows of batches that never committed off the file's end (parquet: their parts)."""
    if fmt == "parquet":
        if not path.is_dir():
            raise MsggcError(f"archive directory {path} of an unfinished run is missing")
        for leftover in path.glob("*.tmp"):
            leftover.unlink()
        parts = _parts(path)
        if len(parts) < size or [n for n, _ in parts[:size]] != list(range(size)):
            raise MsggcError(f"archive directory {path} lacks parts its run recorded ({size:,}):"
                             " it was changed outside msggc")
        for _, extra in parts[size:]:
            extra.unlink()
        _fsync_directory(path)
        return
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise MsggcError(f"archive file {path} of an unfinished run is missing") from None
    if actual < size:
        raise MsggcError(f"archive file {path} is shorter ({actual:,} bytes) than its run recorded"
                         f" ({size:,} bytes): it was changed outside msggc")
    if actual > size:
        os.truncate(path, size)


# -- restore ----------------------------------------------------------------------------------

def members(path: Path) -> Iterator[bytes]:
    """The archive's batches as CSV bytes, one at a time: the header line, then one per batch
    (gzip members, zstd frames, or parquet parts). Raises OSError, zlib.error or another
    :func:`_read_errors` exception for a batch that cannot be read, EOFError for one cut short."""
    fmt = _detected(path)
    if fmt == "parquet":
        return _parquet_batches(path)
    if fmt == "zstd":
        return _frames(path, lambda: _zstd().ZstdDecompressor().decompressobj())
    return _frames(path, lambda: zlib.decompressobj(wbits=31))


def _frames(path: Path, decompressor: Callable[[], Any]) -> Iterator[bytes]:
    with path.open("rb") as handle:
        data = handle.read(READ_CHUNK)
        while data:
            reader = decompressor()
            rows = bytearray()
            while True:
                rows += reader.decompress(data)
                if reader.eof:
                    data = reader.unused_data or handle.read(READ_CHUNK)
                    break
                data = handle.read(READ_CHUNK)
                if not data:
                    raise EOFError("it is cut short (the file ends inside it)")
            yield bytes(rows)


def _parquet_batches(path: Path) -> Iterator[bytes]:
    pa = _arrow()
    files = [part for _, part in _parts(path)] if path.is_dir() else [path]
    header = False
    for part in files:
        table = pa.parquet.read_table(part)
        if not header:
            yield _names_line(table.schema.names)
            header = True
        if table.num_rows:
            out = io.BytesIO()
            pa.csv.write_csv(table, out, pa.csv.WriteOptions(include_header=False))
            yield out.getvalue()


def _names_line(names: list[str]) -> bytes:
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow(names)
    return line.getvalue().encode()


def _read_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged archive raises, for each format whose package is installed."""
    errors: list[type[Exception]] = [OSError, EOFError, zlib.error, ValueError, csv.Error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def restore(conn: Connection, table: TableSpec, target_oid: int, path: Path) -> int:
    """Insert the file's rows back, one transaction per batch; rows already present are kept,
    so running it again (after an interruption, or on a good copy of a damaged file) restores
    the rest and duplicates nothing. A batch that cannot be read or loaded stops the restore,
    the batches before it restored."""
    unreadable = _read_errors()
    try:
        parts = members(path)
        header = _read_header(next(parts, b""))
    except unreadable as exc:
        raise UsageError(f"{path} is not an msggc archive file: {exc}") from None
    columns = [c for c in header if c not in BOOKKEEPING_COLUMNS]
    missing = set(columns) - set(table_columns(conn, target_oid))
    if missing:
        raise TargetTableError(f"{table.qualified} lacks the archived columns {sorted(missing)}")
    _prepare_loading(conn, table)
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    load = sql.SQL("COPY {outgoing} ({all}) FROM STDIN {options}").format(
        outgoing=table_ident(OUTGOING), all=sql.SQL(", ").join(map(sql.Identifier, header)),
        options=CSV_OPTIONS)
    insert = sql.SQL(
        "INSERT INTO {table} ({names}) OVERRIDING SYSTEM VALUE SELECT {names} FROM {outgoing}"
        " ON CONFLICT DO NOTHING"
    ).format(table=table_ident(table), names=names, outgoing=table_ident(OUTGOING))
    restored = loaded = 0
    try:
        for rows in parts:
            with conn.transaction():
                with conn.cursor().copy(load) as copy:
                    copy.write(rows)
                restored += conn.execute(insert).rowcount
            loaded += 1
    except (pg_errors.DataError, pg_errors.IntegrityError) as exc:
        raise _stopped(path, f"batch {loaded + 1} does not load: {exc.diag.message_primary}",
                       restored) from None
    except unreadable as exc:
        raise _stopped(path, f"cannot read batch {loaded + 1}: {exc}", restored) from None
    return restored


def _read_header(member: bytes) -> list[str]:
    """The archived column names: the first member is one CSV line ending in the bookkeeping."""
    lines = list(csv.reader(io.StringIO(member.decode())))
    header = lines[0] if len(lines) == 1 else []
    columns = header[:-len(BOOKKEEPING_COLUMNS)]
    distinct = len(set(header) - {""}) == len(header)
    if not columns or not distinct or tuple(header[len(columns):]) != BOOKKEEPING_COLUMNS:
        raise ValueError("it does not start with a header line of column names ending in"
                         f" {', '.join(BOOKKEEPING_COLUMNS)}")
    return header


def _stopped(path: Path, reason: str, restored: int) -> MsggcError:
    return MsggcError(f"{path}: {reason}; the batches before it are restored ({restored:,} rows),"
                      " a rerun on a good file restores the rest")
