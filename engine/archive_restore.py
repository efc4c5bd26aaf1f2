"""``msggc restore --file``: an ``--archive-to`` file's rows back into their table, one transaction
per archived batch, each batch exactly once.

A batch is read whole and its checksum verified before any of its rows is loaded
(:mod:`engine.archive_formats`); a damaged one stops the restore with one line naming it. Every
batch put back is recorded in ``gc_restored`` by the SHA-256 of its rows, in the transaction that
inserts them: a rerun, after a crash or on another copy of the file, skips what went back
already, so a table without a key never takes a row twice. Generated columns are left to the
table to compute; identity columns take their archived value (``OVERRIDING SYSTEM VALUE``).
"""

from __future__ import annotations

import csv
import io
import zlib
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import psycopg
from psycopg import sql

from engine.archive import BOOKKEEPING_COLUMNS, table_columns
from engine.archive_formats import Damaged, batches, read_errors
from engine.config import TableSpec
from engine.db import Connection, one_row, table_ident
from engine.errors import MsggcError, SchemaMissing, TargetTableError, UsageError

LOADING = "msggc_loading"
"""This session's temp table that each batch is copied into before its insert."""
CSV_OPTIONS = sql.SQL("(FORMAT csv)")
TEXT_FORMS = ("SELECT set_config('DateStyle', 'ISO', true),"
              " set_config('IntervalStyle', 'postgres', true)")
"""The forms the archive was written in (see :mod:`engine.archive_sink`), for this batch only."""
LOAD_ERRORS = (psycopg.errors.DataError, psycopg.errors.IntegrityError, psycopg.errors.ProgrammingError,
               psycopg.errors.NotSupportedError, psycopg.errors.InternalError)
"""What a batch the table cannot take raises: a one-line refusal, the batches before it kept."""


class FileRestored(NamedTuple):
    restored: int
    """Rows inserted by this restore."""
    batches: int
    """Batches put back by this restore."""
    skipped: int
    """Batches an earlier restore into the same table put back: not restored again."""
    present: int = 0
    """Rows of the batches restored now that the table kept out: it holds their key already."""


def restore(conn: Connection, table: TableSpec, target_oid: int, path: Path) -> FileRestored:
    """Insert the file's rows back, one transaction per batch, each batch once (see the module).
    A keyed table also keeps any row whose key it holds already (``ON CONFLICT DO NOTHING``)."""
    if not one_row(conn.execute("SELECT to_regclass('gc_restored') IS NOT NULL"))[0]:
        raise SchemaMissing("msggc tables are out of date in this database: run `msggc migrate` first")
    unreadable = read_errors()
    try:
        read = batches(path)
        header = _read_header(first.rows if (first := next(read, None)) else b"")
    except unreadable as exc:
        if _damaged(exc):
            raise MsggcError(f"{path}: its first batch (the column names) is damaged ({_said(exc)}):"
                             " nothing restored") from None
        raise UsageError(f"{path} is not an msggc archive file: {_said(exc)}") from None
    columns = [c for c in header if c not in BOOKKEEPING_COLUMNS]
    missing = set(columns) - set(table_columns(conn, target_oid))
    if missing:
        raise TargetTableError(f"{table.qualified} lacks the archived columns {sorted(missing)}")
    generated = {name for (name,) in conn.execute(  # the table computes them again
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attgenerated <> ''", (target_oid,))}
    name = one_row(conn.execute("SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
                                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s",
                                (target_oid,)))[0]
    _prepare_loading(conn, table)
    inserted = sql.SQL(", ").join(sql.Identifier(c) for c in columns if c not in generated)
    load = sql.SQL("COPY {loading} ({all}) FROM STDIN {options}").format(
        loading=sql.Identifier(LOADING), all=sql.SQL(", ").join(map(sql.Identifier, header)),
        options=CSV_OPTIONS)
    insert = sql.SQL(
        "INSERT INTO {table} ({names}) OVERRIDING SYSTEM VALUE SELECT {names} FROM pg_temp.{loading}"
        " ON CONFLICT DO NOTHING"
    ).format(table=table_ident(table), names=inserted, loading=sql.Identifier(LOADING))
    done = FileRestored(0, 0, 0)
    number = 0
    try:
        for number, batch in enumerate(read, start=1):
            done = _restore_batch(conn, done, load, insert, batch.rows,
                                  {"table": name, "digest": batch.identity,
                                   "file": str(path.resolve()), "batch": number})
    except LOAD_ERRORS as exc:
        raise _stopped(path, f"batch {number} does not load: {exc.diag.message_primary}", done) from None
    except unreadable as exc:
        number += 1  # the batch being read
        reason = (f"batch {number} is damaged ({_said(exc)}): none of its rows is restored" if _damaged(exc)
                  else f"cannot read batch {number}: {_said(exc)}")
        raise _stopped(path, reason, done) from None
    finally:
        with suppress(psycopg.Error):  # the session's temp table would hold the table's types
            conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(LOADING)))
    return done


def _restore_batch(conn: Connection, done: FileRestored, load: sql.Composed, insert: sql.Composed,
                   rows: bytes, batch: dict[str, object]) -> FileRestored:
    """One batch in one transaction: claimed in ``gc_restored`` first (a concurrent restore of the
    same batch waits there, then skips it), then loaded and inserted."""
    with conn.transaction():
        claimed = conn.execute(
            "INSERT INTO gc_restored (table_name, batch_sha256, file, batch)"
            " VALUES (%(table)s, %(digest)s, %(file)s, %(batch)s) ON CONFLICT DO NOTHING", batch).rowcount
        if not claimed:
            return done._replace(skipped=done.skipped + 1)
        conn.execute(TEXT_FORMS)
        with conn.cursor() as cursor:
            with cursor.copy(load) as copy:
                copy.write(rows)
            loaded = cursor.rowcount
        count = conn.execute(insert).rowcount
        conn.execute("UPDATE gc_restored SET rows = %(rows)s WHERE table_name = %(table)s"
                     " AND batch_sha256 = %(digest)s", {**batch, "rows": count})
    return done._replace(restored=done.restored + count, batches=done.batches + 1,
                         present=done.present + max(0, loaded - count))


def _prepare_loading(conn: Connection, table: TableSpec) -> None:
    """This session's temp table of the target's columns (without their defaults, identity or
    generation: it takes the archived values as they are)."""
    loading = sql.Identifier(LOADING)
    with conn.transaction():
        conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{loading}").format(loading=loading))
        conn.execute(sql.SQL(
            "CREATE TEMP TABLE {loading} (LIKE {table}, archived_at timestamptz NOT NULL, run_id bigint)"
            " ON COMMIT DELETE ROWS"
        ).format(loading=loading, table=table_ident(table)))


CHECKSUM_WORDS = ("incorrect data check", "incorrect length check", "doesn't match checksum")
"""zlib's words for a gzip member whose CRC32 or length does not match, and libzstd's for a frame."""


def _damaged(exc: Exception) -> bool:
    """A checksum that does not match, in whichever format's words."""
    told = isinstance(exc, zlib.error) or "zstd" in str(exc)
    return isinstance(exc, Damaged) or (told and any(words in str(exc) for words in CHECKSUM_WORDS))


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


def _said(exc: Exception) -> str:
    """A reader's message on one line: pyarrow's span several (``... at type: \\nDeserializing ...``)."""
    return " ".join(str(exc).split())


def _stopped(path: Path, reason: str, done: FileRestored) -> MsggcError:
    earlier = f" ({done.skipped:,} batches restored by an earlier run were skipped)" if done.skipped else ""
    return MsggcError(f"{path}: {reason}; restored {done.restored:,} rows from {done.batches:,} batches"
                      f" before it{earlier}: a rerun on a good copy of the file restores the rest, once")
