"""``--archive-to FILE``: deleted rows streamed with COPY into a gzip-compressed CSV file.

Each batch's DELETE moves its rows into a session temp table (no WAL), ``COPY ... TO STDOUT``
drains it, and the rows are appended to the file as one gzip member, fsynced before the batch
commits. The run's row in ``gc_runs`` records the file's length with each checkpoint, so a
crash between the fsync and the commit leaves a tail that the next run cuts off: the file
holds every committed batch's rows exactly once. ``msggc restore --file`` reads it back.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from psycopg import errors as pg_errors
from psycopg import sql

from engine import runs
from engine.archive import BOOKKEEPING_COLUMNS, table_columns
from engine.config import TableSpec
from engine.db import Connection, table_ident
from engine.errors import MsggcError, TargetTableError, UsageError
from engine.queries import Archive

OUTGOING = TableSpec(name="msggc_outgoing", schema="pg_temp")
"""Where a batch's rows wait for COPY; emptied by every commit (ON COMMIT DELETE ROWS)."""
COMPRESS_LEVEL = 1
"""zlib's fastest level: the file is written inside the batch, so speed matters more than size."""
CSV_OPTIONS = sql.SQL("(FORMAT csv)")
READ_CHUNK = 1 << 20


def outgoing_archive(columns: tuple[str, ...]) -> Archive:
    """The batch statements' archive target when rows go to a file."""
    return Archive(table=OUTGOING, columns=columns)


def prepare(conn: Connection, table: TableSpec) -> None:
    """Create this session's outgoing temp table (each worker connection has its own)."""
    conn.execute(sql.SQL(
        "CREATE TEMP TABLE IF NOT EXISTS {outgoing} (LIKE {table},"
        " archived_at timestamptz NOT NULL, run_id bigint) ON COMMIT DELETE ROWS"
    ).format(outgoing=sql.Identifier(OUTGOING.name), table=table_ident(table)))


def drain(conn: Connection) -> bytes:
    """The batch's rows as one gzip member of CSV lines (empty when the batch moved none)."""
    data = bytearray()
    statement = sql.SQL("COPY {outgoing} TO STDOUT {options}").format(
        outgoing=table_ident(OUTGOING), options=CSV_OPTIONS)
    with conn.cursor().copy(statement) as copy:
        for chunk in copy:
            data += chunk
    return gzip.compress(bytes(data), COMPRESS_LEVEL, mtime=0) if data else b""


def _header(columns: tuple[str, ...]) -> bytes:
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow([*columns, *BOOKKEEPING_COLUMNS])
    return gzip.compress(line.getvalue().encode(), COMPRESS_LEVEL, mtime=0)


class ArchiveFile:
    """The run's file, shared by its workers; appends are serialised up to their commit."""

    def __init__(self, path: Path, run_id: int, size: int) -> None:
        self.path = path
        self.run_id = run_id
        self.size = size
        self.stale = False
        """Set when a batch failed after appending: its commit may or may not have happened,
        so the next append first trims the file to the length the database recorded."""
        self._lock = threading.Lock()

    @classmethod
    def open(cls, conn: Connection, target: Path | str, table: TableSpec, columns: tuple[str, ...],
             run: runs.Run) -> ArchiveFile:
        """Continue the file of the run this one resumes (cut to its recorded length), or start a
        new file with a CSV header; an existing file that is not the run's own is never touched.
        ``target`` is the file, or a directory for one ``<table>-run<id>.csv.gz`` per run."""
        previous = runs.archive_state(conn, run.id) or (
            runs.archive_state(conn, run.resumed_from) if run.resumed_from else None)
        check_target(target, Path(previous[0]) if previous else None)
        target = Path(target)
        path = target / f"{table.qualified}-run{run.id}.csv.gz" if target.is_dir() else target
        size = 0
        if previous is not None:
            earlier, recorded = Path(previous[0]), previous[1]
            same = earlier.resolve() == path.resolve()
            if same or earlier.exists():
                _trim(earlier, recorded)
            size = recorded if same else 0
        if size == 0:
            size = _create(path, _header(columns))
        runs.record_archive(conn, run.id, str(path.resolve()), size)
        return cls(path, run.id, size)

    @contextmanager
    def turn(self) -> Iterator[ArchiveTurn]:
        """Enclose a batch transaction: the file stays locked from the append to the commit, so
        appends land in commit order and each checkpoint records the file's length."""
        turn = ArchiveTurn(self, self._lock)
        try:
            yield turn
        except BaseException:
            self.stale = self.stale or turn.appended
            raise
        finally:
            if turn.appended:
                self._lock.release()

    def append_locked(self, conn: Connection, member: bytes) -> int:
        """Append and fsync one batch's member; the caller holds the lock (see :meth:`turn`)."""
        if self.stale:
            recorded = runs.archive_state(conn, self.run_id)
            self.size = recorded[1] if recorded else self.size
            _trim(self.path, self.size)
            self.stale = False
        if member:
            try:
                with self.path.open("r+b") as handle:
                    handle.seek(self.size)
                    handle.write(member)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise MsggcError(f"cannot write archive file {self.path}: {exc.strerror}") from None
            self.size += len(member)
        return self.size


class ArchiveTurn:
    """One batch's use of the file."""

    def __init__(self, file: ArchiveFile, lock: threading.Lock) -> None:
        self.file = file
        self.lock = lock
        self.appended = False

    def append(self, conn: Connection) -> int:
        """Drain the batch's rows into the file and fsync; returns the length to checkpoint."""
        member = drain(conn)
        self.lock.acquire()
        self.appended = True
        return self.file.append_locked(conn, member)


def check_target(target: Path | str, resuming: Path | None = None) -> None:
    """Refuse an ``--archive-to`` target the run could not write, before the run starts; the file
    of the run being resumed (``resuming``) is the one existing file that may be continued."""
    path = Path(target)
    if str(target).endswith(("/", os.sep)) and not path.is_dir():
        raise UsageError(f"archive directory {target} does not exist: create it first"
                         " (a target ending in / names a directory)")
    if path.is_dir():
        _require_writable(path)
        return
    if resuming is not None and path.resolve() == resuming.resolve():
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
    directory = os.open(path.parent.resolve(), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return len(header)


def _trim(path: Path, size: int) -> None:
    """Cut the rows of batches that never committed off the file's end."""
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
    """The file's gzip members, decompressed one at a time: the header, then one per batch.
    Raises OSError or zlib.error for a member that cannot be read, EOFError for one cut short."""
    with path.open("rb") as handle:
        data = handle.read(READ_CHUNK)
        while data:
            decompressor = zlib.decompressobj(wbits=31)
            rows = bytearray()
            while True:
                rows += decompressor.decompress(data)
                if decompressor.eof:
                    data = decompressor.unused_data or handle.read(READ_CHUNK)
                    break
                data = handle.read(READ_CHUNK)
                if not data:
                    raise EOFError("it is cut short (the file ends inside it)")
            yield bytes(rows)


def restore(conn: Connection, table: TableSpec, target_oid: int, path: Path) -> int:
    """Insert the file's rows back, one transaction per batch; rows already present are kept,
    so running it again (after an interruption, or on a good copy of a damaged file) restores
    the rest and duplicates nothing. A batch that cannot be read or loaded stops the restore,
    the batches before it restored."""
    parts = members(path)
    try:
        header = _read_header(next(parts, b""))
    except (OSError, EOFError, zlib.error, csv.Error, ValueError) as exc:
        raise UsageError(f"{path} is not an msggc archive file: {exc}") from None
    columns = [c for c in header if c not in BOOKKEEPING_COLUMNS]
    missing = set(columns) - set(table_columns(conn, target_oid))
    if missing:
        raise TargetTableError(f"{table.qualified} lacks the archived columns {sorted(missing)}")
    prepare(conn, table)
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
    except (OSError, EOFError, zlib.error) as exc:
        raise _stopped(path, f"cannot read batch {loaded + 1}: {exc}", restored) from None
    except (pg_errors.DataError, pg_errors.IntegrityError) as exc:
        raise _stopped(path, f"batch {loaded + 1} does not load: {exc.diag.message_primary}",
                       restored) from None
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
