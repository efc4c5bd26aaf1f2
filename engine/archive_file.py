"""``--archive-to FILE``: deleted rows streamed with ``COPY (DELETE ... RETURNING ...) TO STDOUT``
into a compressed CSV file (gzip or zstd) or a directory of parquet parts.

Each batch's DELETE runs inside COPY (no temp table): its rows, with ``archived_at`` and
``run_id``, stream to the client as CSV in the batch's transaction and are compressed on another
thread while they arrive (:class:`engine.archive_formats.compressed.Compressing`) into one gzip
member or one zstd frame (libzstd compresses with its own threads), each with its checksum.
Before the batch commits, the member is appended to the file and fsynced, under a lock held up
to the commit so that appends land in commit order; the run's
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
the table's (see :mod:`engine.archive_formats.parquet`).

This module is the file's life (create, append in commit order, cut back on resume); the
formats are :mod:`engine.archive_formats`, and ``msggc restore --file`` is :mod:`engine.archive_restore`.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine import archive_sink, runs
from engine.archive import BOOKKEEPING_COLUMNS, column_types
from engine.archive_formats import SUFFIXES, Encoder, detected, encoder
from engine.archive_formats.base import fsync_directory
from engine.archive_formats.compressed import compressed
from engine.archive_formats.parquet import arrow_schema, create_directory, trim_parts, write_part
from engine.config import TableSpec, archive_format_for
from engine.db import Connection, regclass_of
from engine.errors import MsggcError, UsageError
from engine.queries import Archive

OUTGOING = TableSpec(name="msggc_outgoing", schema="pg_temp")
"""The name the streamed batch statements are composed with (nothing is written there)."""


def outgoing_archive(columns: tuple[str, ...]) -> Archive:
    """The batch statements' archive target when rows go to a file: streamed through COPY."""
    return Archive(table=OUTGOING, columns=columns, stream=True)


def prepare(conn: Connection, table: TableSpec) -> None:
    """Nothing to prepare per session any more: a batch's rows stream out of its DELETE."""


# -- the run's file -------------------------------------------------------------------------

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
        previous = runs.archive_state_to_continue(conn, run.id)
        earlier = Path(previous[0]) if previous else None
        check_target(target, earlier)
        target = Path(target)
        container = target.is_dir() and not (earlier is not None and target.resolve() == earlier.resolve())
        requested = _requested_format(conn, run.id)
        fmt = archive_format_for(None if container else str(target), requested)
        path = target / f"{table.qualified}-run{run.id}{SUFFIXES[fmt]}" if container else target
        size = 0
        if previous is not None and earlier is not None and previous[1] == 0:
            _discard(earlier)  # claimed, never committed to: a run killed around its creation
        elif previous is not None and earlier is not None:
            recorded = previous[1]
            same = earlier.resolve() == path.resolve()
            found = detected(earlier)
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
            schema = arrow_schema({c: types.get(c, "text") for c in columns})
        if size == 0:
            size = _claim_and_create(conn, run.id, path, fmt, schema, columns)
        runs.record_archive(conn, run.id, str(path.resolve()), size)
        return cls(path, run.id, size, fmt, schema)

    def encoder(self) -> Encoder:
        return encoder(self.format, self.schema)

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
                    write_part(self.path, self.size, member)
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
    if path.is_dir() and detected(path) is None:
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


def _claim_and_create(conn: Connection, run_id: int, path: Path, fmt: str, schema: Any,
                      columns: tuple[str, ...]) -> int:
    """Record the path with 0 bytes (committed: autocommit) before creating the file, so a run
    killed between the two leaves a path its resumption knows as its own (and discards, nothing
    having been committed to it), not a file no run knows and every later run refuses. A file
    found there already is not the run's: the claim is withdrawn and the run refused."""
    runs.record_archive(conn, run_id, str(path.resolve()), 0)
    try:
        return create_directory(path, schema) if fmt == "parquet" else _create(
            path, compressed(fmt, _header(columns)))
    except UsageError:
        runs.record_archive(conn, run_id, None, None)
        raise


def _discard(path: Path) -> None:
    """The file (parquet: directory) of a claim no batch committed to, if it was created."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
    fsync_directory(path.parent)
    return len(header)


def _trim(path: Path, size: int, fmt: str = "gzip") -> None:
    """Cut the rows of batches that never committed off the file's end (parquet: their parts)."""
    if fmt == "parquet":
        trim_parts(path, size)
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
