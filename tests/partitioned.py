"""A table partitioned by day, the application that writes into it and the ledger of what it wrote,
what the catalog says of its leaves, what the archives hold, and a ``kill -9`` of ``msggc gc``
at a chosen point of a leaf's detach: shared by the partition recovery tests
(tests/test_partitions_recovery.py) and the partition promise (tests/test_promise_partitions.py).

The table: ``pm(id bigint, day date, processed_at timestamptz, payload text, PRIMARY KEY (id, day))
PARTITION BY RANGE (day)``, one leaf ``pm_d<n>`` per day ``n`` (``FOR VALUES FROM (day n) TO
(day n + 1)``), an optional ``pm_default``, an optional child table ``pm_reply`` whose foreign key
points at ``pm``. The application (:class:`Application`) assigns ids itself and records a row in
its ledger only once its INSERT committed: the ledger is the truth the tests hold msggc to.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests.polling import wait_until
from tests.support import spawn_cli

Conn = psycopg.Connection[Any]

PARENT = "pm"
LEAF_PATTERN = r"^pm_d[0-9]+$"
DEFAULT_LEAF = "pm_default"
CHILD = "pm_reply"
ARCHIVE_TABLE = "pm_archive"
FIRST_DAY = date(2026, 1, 1)
PROCESSED_BASE = datetime(2026, 2, 1, tzinfo=UTC)
TRICKY_PAYLOADS = ("NULL", "NA", "N/A", "nan", "NaN", "", " ", "a,b", 'say "hi"', "two\nlines", "\\N")
"""Text an archive must give back as it was (not NULL, not a float): every seventh row has one."""


def leaf_name(n: int) -> str:
    return f"pm_d{n}"


def day_of(n: int) -> date:
    return FIRST_DAY + timedelta(days=n)


def payload_of(row_id: int) -> str:
    return TRICKY_PAYLOADS[(row_id // 7) % len(TRICKY_PAYLOADS)] if row_id % 7 == 0 else f"m{row_id}"


def processed_at_of(row_id: int, version: int = 0) -> datetime:
    """A distinct, exact processed_at per row and change (archives are compared to the microsecond)."""
    return PROCESSED_BASE + timedelta(seconds=row_id, microseconds=version)


def create_table(conn: Conn, days: int, default: bool = False, fk: bool = False) -> None:
    """``pm`` with leaves for days 0..days-1 (and the default partition, the child table)."""
    conn.execute("CREATE TABLE pm (id bigint NOT NULL, day date NOT NULL, processed_at timestamptz,"
                 " payload text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    for n in range(days):
        add_leaf(conn, n)
    if default:
        conn.execute("CREATE TABLE pm_default PARTITION OF pm DEFAULT")
    if fk:
        add_child_table(conn)


def add_leaf(conn: Conn, n: int) -> None:
    conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF pm FOR VALUES FROM ({}) TO ({})").format(
        sql.Identifier(leaf_name(n)), sql.Literal(day_of(n)), sql.Literal(day_of(n + 1))))


def add_child_table(conn: Conn) -> None:
    conn.execute("CREATE TABLE pm_reply (id bigserial PRIMARY KEY, pm_id bigint NOT NULL,"
                 " pm_day date NOT NULL, FOREIGN KEY (pm_id, pm_day) REFERENCES pm (id, day))")


def drop_everything(conn: Conn) -> None:
    """Every table of the scenario, the leaves a run left detached included."""
    names = [row[0] for row in conn.execute(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')"
        " AND (relname ~ '^pm_' OR relname = 'pm')")]
    for name in names:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# --- the catalog ---------------------------------------------------------------------------------


def attached_leaves(conn: Conn) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'pm'::regclass AND NOT i.inhdetachpending ORDER BY 1")]


def pending_leaves(conn: Conn) -> list[str]:
    """Leaves whose ``DETACH ... CONCURRENTLY`` began and was not finalized."""
    return [row[0] for row in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'pm'::regclass AND i.inhdetachpending ORDER BY 1")]


def detached_leaves(conn: Conn) -> list[str]:
    """Tables named like a leaf (or the default partition) that are no partition of ``pm`` at all."""
    return [row[0] for row in conn.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"
        " AND (c.relname ~ %s OR c.relname = %s)"
        " AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid) ORDER BY 1",
        (LEAF_PATTERN, DEFAULT_LEAF))]


def not_attached(conn: Conn) -> list[str]:
    """Leaves the application cannot reach through ``pm``: detached or pending detach."""
    return sorted(detached_leaves(conn) + pending_leaves(conn))


@dataclass(frozen=True)
class Row:
    day: date
    processed_at: datetime | None
    payload: str | None


def rows_through_parent(conn: Conn) -> dict[int, Row]:
    """What the application sees: ``pm`` (a leaf pending detach is not seen by a new snapshot)."""
    rows = conn.execute("SELECT id, day, processed_at, payload FROM pm")
    return {r[0]: Row(r[1], r[2], r[3]) for r in rows}


def rows_in(conn: Conn, table: str) -> dict[int, Row]:
    query = sql.SQL("SELECT id, day, processed_at, payload FROM {}").format(sql.Identifier(table))
    return {r[0]: Row(r[1], r[2], r[3]) for r in conn.execute(query)}


def rows_anywhere(conn: Conn) -> dict[int, Row]:
    """Through ``pm``, and in the leaves it no longer reaches: the rows not deleted."""
    found = rows_through_parent(conn)
    for leaf in not_attached(conn):
        found.update(rows_in(conn, leaf))
    return found


def deleted_reported(conn: Conn) -> int:
    return conn.execute("SELECT coalesce(sum(messages_deleted), 0)::bigint FROM gc_runs").fetchone()[0]


# --- the application -----------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the application wrote and saw committed: id -> its row, and the step of its last change."""

    rows: dict[int, Row] = field(default_factory=dict)
    changed_at: dict[int, int] = field(default_factory=dict)
    referenced: set[int] = field(default_factory=set)
    """Rows a child row points at (the foreign key keeps them, garbage or not)."""
    failed_inserts: int = 0
    """Rows the application could not insert (their range had no partition): it knows, nothing lost."""
    next_id: int = 1

    def live(self) -> dict[int, Row]:
        return {i: r for i, r in self.rows.items() if r.processed_at is None}

    def garbage(self) -> set[int]:
        return {i for i, r in self.rows.items() if r.processed_at is not None}


class Application:
    """Writes through ``pm`` in its own transactions; the ledger holds only what committed."""

    def __init__(self, conn: Conn, ledger: Ledger) -> None:
        self.conn = conn
        self.ledger = ledger
        self.version = 0

    def insert(self, days: list[int], processed: list[bool], step: int = 0) -> list[int]:
        """One transaction of rows (day ``days[i]``, garbage when ``processed[i]``): all committed
        and recorded, or none (a range without a partition: the application is told)."""
        ids = list(range(self.ledger.next_id, self.ledger.next_id + len(days)))
        self.ledger.next_id += len(days)
        rows = {i: Row(day_of(d), processed_at_of(i) if p else None, payload_of(i))
                for i, d, p in zip(ids, days, processed, strict=True)}
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.executemany("INSERT INTO pm (id, day, processed_at, payload) VALUES (%s, %s, %s, %s)",
                                [(i, r.day, r.processed_at, r.payload) for i, r in rows.items()])
        except (psycopg.errors.CheckViolation, psycopg.errors.LockNotAvailable):
            self.ledger.failed_inserts += len(ids)
            return []
        self.ledger.rows.update(rows)
        self.ledger.changed_at.update(dict.fromkeys(ids, step))
        return ids

    def set_processed(self, ids: Iterable[int], processed: bool, step: int = 0) -> list[int]:
        """Process (garbage from now on) or un-process (live again) rows through ``pm``; only the
        rows the UPDATE found change in the ledger."""
        self.version += 1
        changed = {}
        with self.conn.transaction():
            for row_id in ids:
                value = processed_at_of(row_id, self.version) if processed else None
                found = self.conn.execute(
                    "UPDATE pm SET processed_at = %s WHERE id = %s RETURNING day", (value, row_id)).fetchone()
                if found is not None:
                    changed[row_id] = value
        for row_id, value in changed.items():  # committed: now the ledger
            old = self.ledger.rows[row_id]
            self.ledger.rows[row_id] = Row(old.day, value, old.payload)
            self.ledger.changed_at[row_id] = step
        return list(changed)

    def reply_to(self, ids: Iterable[int]) -> None:
        """Child rows pointing at these rows: the foreign key keeps them."""
        for row_id in ids:
            row = self.ledger.rows[row_id]
            if self.conn.execute("INSERT INTO pm_reply (pm_id, pm_day) SELECT id, day FROM pm"
                                 " WHERE id = %s AND day = %s RETURNING id", (row_id, row.day)).fetchone():
                self.ledger.referenced.add(row_id)


# --- the promise, checked on the database ----------------------------------------------------------


def missing_live_rows(conn: Conn, ledger: Ledger) -> dict[int, tuple[Row, Row | None]]:
    """Live rows of the ledger not visible through ``pm`` with their exact values."""
    seen = rows_through_parent(conn)
    return {i: (r, seen.get(i)) for i, r in ledger.live().items() if seen.get(i) != r}


def rows_gone(conn: Conn, ledger: Ledger) -> set[int]:
    """Ledger rows found neither through ``pm`` nor in a leaf it no longer reaches."""
    return set(ledger.rows) - set(rows_anywhere(conn))


# --- archives ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archived:
    id: int
    row: Row
    run_id: int


def archived_in_table(conn: Conn) -> list[Archived]:
    if conn.execute("SELECT to_regclass(%s)", (ARCHIVE_TABLE,)).fetchone()[0] is None:
        return []
    query = sql.SQL("SELECT id, day, processed_at, payload, run_id FROM {}").format(
        sql.Identifier(ARCHIVE_TABLE))
    return [Archived(r[0], Row(r[1], r[2], r[3]), r[4]) for r in conn.execute(query)]


def archive_files(conn: Conn) -> dict[str, tuple[int, int]]:
    """Each archive file (or parquet directory) a run recorded: path -> (its latest run, committed
    length: bytes, or parts for parquet)."""
    files: dict[str, tuple[int, int]] = {}
    for run_id, path, size in conn.execute(
            "SELECT id, archive_file, archive_bytes FROM gc_runs WHERE archive_file IS NOT NULL ORDER BY id"):
        files[path] = (run_id, size)
    return files


def archived_in_file(conn: Conn, path: Path, committed: int) -> list[Archived]:
    """The rows of the committed part of an archive file, read without msggc (gzip and zstd CSV
    parsed by PostgreSQL's own COPY, parquet by pyarrow), so a value changed on its way is seen."""
    if path.is_dir():
        import pyarrow.parquet as pq

        parts = sorted(p for p in path.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet")
        found = []
        for part in parts[:committed]:
            for r in pq.read_table(part).to_pylist():
                found.append(Archived(r["id"], Row(r["day"], r["processed_at"], r["payload"]), r["run_id"]))
        return found
    data = path.read_bytes()[:committed]
    if path.suffix in (".zst", ".zstd"):
        import zstandard

        text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    else:
        text = gzip.decompress(data)
    header = next(csv.reader(io.StringIO(text.split(b"\n", 1)[0].decode())))
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE archive_read (id bigint, day date, processed_at timestamptz,"
                     " payload text, archived_at timestamptz, run_id bigint) ON COMMIT DROP")
        copy_in = sql.SQL("COPY archive_read ({}) FROM STDIN (FORMAT csv, HEADER true)").format(
            sql.SQL(", ").join(map(sql.Identifier, header)))
        with conn.cursor().copy(copy_in) as copy:
            copy.write(text)
        rows = conn.execute("SELECT id, day, processed_at, payload, run_id FROM archive_read").fetchall()
    return [Archived(r[0], Row(r[1], r[2], r[3]), r[4]) for r in rows]


def everything_archived(conn: Conn) -> list[Archived]:
    found = archived_in_table(conn)
    for path, (_, committed) in archive_files(conn).items():
        found += archived_in_file(conn, Path(path), committed)
    return found


# --- msggc gc as a process, killed at a chosen point ------------------------------------------------


def msggc_backends(conn: Conn) -> list[int]:
    return [row[0] for row in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'msggc'"
        " AND pid <> pg_backend_pid()")]


def waits_for(conn: Conn, pid: int) -> bool:
    """A msggc session waits for a lock session ``pid`` holds (an application's open transaction
    on ``pm``): a detach or a drop waits for it (a concurrent detach, for its snapshot too, and
    its leaf is then pending detach)."""
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'msggc' AND %s = ANY (pg_blocking_pids(pid)))", (pid,)).fetchone()[0]


def leaf_held(conn: Conn) -> str | None:
    """The leaf of a day a msggc session holds in ACCESS EXCLUSIVE mode (taken to detach, check
    or drop it) while it waits for a lock, if any. Not the default partition: a detach locks it
    too (its constraint changes), and it is never dropped."""
    row = conn.execute(
        "SELECT c.relname FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
        " JOIN pg_class c ON c.oid = l.relation"
        " WHERE a.datname = current_database() AND a.application_name = 'msggc'"
        " AND a.wait_event_type = 'Lock'"
        " AND l.granted AND l.mode = 'AccessExclusiveLock' AND c.relname ~ %s"
        " LIMIT 1", (LEAF_PATTERN,)).fetchone()
    return row[0] if row else None


def is_detached(conn: Conn, leaf: str) -> bool:
    """The table exists and is no partition of ``pm`` (its detach committed)."""
    return leaf in detached_leaves(conn)


def end_backends(conn: Conn) -> None:
    """A killed client's sessions end (the server would notice the closed socket at its next read)."""
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                 " AND application_name = 'msggc' AND pid <> pg_backend_pid()")
    wait_until(lambda: not msggc_backends(conn), 20, "the killed collector's sessions to end")


def sigkill(proc: subprocess.Popen[str]) -> None:
    """``kill -9``, and the process reaped (its output left for the caller to read)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def spawn_gc(dsn: str, *flags: str) -> subprocess.Popen[str]:
    return spawn_cli("gc", "--dsn", dsn, "--table", "public.pm", "--json", *flags)


HOLD_WAIT_S = 5.0
"""How long msggc may wait for the runs (held by the test) without holding a leaf: then it waits
there for something else than a drop (a recovery, a walk's checkpoint), and is killed there."""
KillPoint = str
"""Where :func:`kill_between_detach_and_drop` killed the run: ``between`` (the detach committed,
the drop did not), ``inside`` (within the transaction that detaches: an engine that detaches and
drops in one transaction has no ``between``), or ``ended`` (the run ended before any detach)."""


def kill_between_detach_and_drop(conn: Conn, dsn: str, reader: Conn, proc: subprocess.Popen[str],
                                 timeout_s: float = 30) -> KillPoint:
    """``kill -9`` of ``proc`` after a leaf's detach committed and before its drop did.

    ``reader`` holds an open transaction that has read ``pm``, so the detach waits for it. Then
    the test holds every write to ``gc_runs`` (a row lock on the running run) and ends the
    reader: msggc takes the leaf and, holding it, waits to record what it does. If its detach
    has committed already (an engine that detaches, then drops and records in a second
    transaction), it is killed there. Else (the detach and its record in one transaction) a
    session of the test queues for the leaf behind msggc and the runs are released: the detach
    commits, the test's session gets the leaf before msggc's drop can, and msggc, the leaf
    detached, waits to drop it; it is killed there."""
    reader_pid = reader.info.backend_pid
    try:
        wait_until(lambda: waits_for(conn, reader_pid) or proc.poll() is not None, timeout_s,
                   "a detach to wait for the open transaction")
    except AssertionError:
        reader.rollback()
        raise
    if proc.poll() is not None:
        reader.rollback()
        return "ended"
    holder = psycopg.connect(dsn)
    queued = psycopg.connect(dsn)
    queuing: threading.Thread | None = None
    try:
        holder.execute("SELECT 1 FROM gc_runs WHERE status = 'running' FOR UPDATE")
        reader.rollback()
        deadline = time.monotonic() + HOLD_WAIT_S
        while (leaf := leaf_held(conn)) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if leaf is None:  # it waits for the runs elsewhere (a recovery, a checkpoint): killed there
            return _killed(conn, proc, "inside") if proc.poll() is None else "ended"
        if is_detached(conn, leaf):
            return _killed(conn, proc, "between")
        queued_pid = queued.info.backend_pid

        def queue_for_the_leaf() -> None:
            with contextlib.suppress(psycopg.Error):  # the leaf may be dropped meanwhile
                queued.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(sql.Identifier(leaf)))

        queuing = threading.Thread(target=queue_for_the_leaf)
        queuing.start()
        wait_until(lambda: conn.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0",
                                        (queued_pid,)).fetchone()[0] or not queuing.is_alive(),
                   timeout_s, "the test's session to queue for the leaf")
        holder.rollback()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if waits_for(conn, queued_pid) and is_detached(conn, leaf):
                return _killed(conn, proc, "between")
            if conn.execute("SELECT to_regclass(%s) IS NULL", (leaf,)).fetchone()[0]:
                break  # dropped in the detach's own transaction: there is no between
            time.sleep(0.01)
        return _killed(conn, proc, "inside") if proc.poll() is None else "ended"
    finally:
        sigkill(proc)
        holder.rollback()
        holder.close()
        if queuing is not None:
            queuing.join(timeout_s)
        queued.rollback()
        queued.close()


def _killed(conn: Conn, proc: subprocess.Popen[str], point: KillPoint) -> KillPoint:
    sigkill(proc)
    end_backends(conn)
    return point


def open_snapshot(dsn: str) -> Conn:
    """An application's long read: ``REPEATABLE READ``, a snapshot on ``pm`` held until rollback."""
    reader = psycopg.connect(dsn)
    reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    reader.execute("SELECT count(*) FROM pm")
    return reader
