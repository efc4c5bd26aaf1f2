"""The database server under test: databases, checkpoints, WAL counters, wait-event sampling.

Everything here runs in the parent process on the server's maintenance database. The server is
the embedded one unless ``--dsn`` names another, which must be on this machine: benchmarks send
no traffic beyond loopback.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

SETTINGS = (
    "shared_buffers", "max_wal_size", "checkpoint_timeout", "wal_compression", "synchronous_commit",
    "full_page_writes", "wal_level", "work_mem", "maintenance_work_mem", "io_method",
    "effective_io_concurrency", "autovacuum",
)
FILE_COPY_VERSION = 150000
STAT_IO_VERSION = 160000
CHECKPOINTER_VIEW_VERSION = 170000
SAMPLE_INTERVAL_S = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RUNNER_APPLICATION_NAME = "bench-runner"
"""The runner's own connections: not profiled (idle while a contender runs)."""


class BenchmarkError(RuntimeError):
    """A result that must not be published: a wrong count, a failed contender."""


class HarnessError(BenchmarkError):
    """The measuring machinery failed (the load process), not the contender: worth one retry."""


def require_loopback(dsn: str) -> None:
    """Refuse a DSN whose host is not a unix socket or a loopback address."""
    params = conninfo_to_dict(dsn)
    for host in str(params.get("host") or "").split(","):
        if not host or host.startswith("/") or host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass
        raise BenchmarkError(f"refusing host {host!r}: benchmarks run on loopback or a unix socket only")


def dsn_for_database(dsn: str, dbname: str) -> str:
    """The server's DSN naming another database (the embedded module's helper, key=value aware)."""
    from engine.tools.embedded import dsn_for_database as switch

    return switch(dsn, dbname)


@dataclass(frozen=True)
class WalSnapshot:
    """Counters read before and after a contender; differences are what it wrote."""

    lsn: str
    records: int
    fpi: int
    checkpoints: int
    backend_writes: int | None
    """Relation blocks written by client backends themselves (evicting dirty buffers),
    from pg_stat_io (PostgreSQL 16+): shows when a walk outgrows shared_buffers."""
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Server:
    """A handle on the server: its maintenance DSN and version."""

    dsn: str
    version: int

    @classmethod
    def open(cls, dsn: str | None) -> Server:
        """The given DSN (checked to be local), or the embedded server started on demand."""
        if dsn is None:
            from engine.tools import embedded

            dsn = embedded.ensure_running()
        require_loopback(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            return cls(dsn=dsn, version=conn.info.server_version)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, application_name=RUNNER_APPLICATION_NAME)

    def database(self, name: str) -> str:
        return dsn_for_database(self.dsn, name)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def create_database(self, name: str, template: str | None = None) -> float:
        """Create (or copy) a database; seconds taken.

        A copy uses FILE_COPY where it exists (PostgreSQL 15+): the default WAL_LOG strategy
        would write the whole dataset to WAL and through shared buffers before every contender.
        FILE_COPY keeps the pages byte for byte: hint bits, visibility map, pg_statistic.
        """
        began = time.monotonic()
        self.drop_database(name)
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
            if self.version >= FILE_COPY_VERSION:
                stmt = sql.SQL("{} STRATEGY = FILE_COPY").format(stmt)
        with self.connect() as conn:
            conn.execute(stmt)
        return time.monotonic() - began

    def database_exists(self, name: str) -> bool:
        with self.connect() as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None

    def comment(self, name: str) -> str | None:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                (name,),
            ).fetchone()
        return row[0] if row else None

    def set_comment(self, name: str, text: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(name), sql.Literal(text)))

    def checkpoint(self) -> float:
        """CHECKPOINT (superuser or pg_checkpoint): every contender then starts with the same
        full-page-image debt, so their WAL figures compare."""
        began = time.monotonic()
        with self.connect() as conn:
            conn.execute("CHECKPOINT")
        return time.monotonic() - began

    def wal_snapshot(self) -> WalSnapshot:
        with self.connect() as conn:
            lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
            records, fpi = conn.execute("SELECT wal_records, wal_fpi FROM pg_stat_wal").fetchone()
            if self.version >= CHECKPOINTER_VIEW_VERSION:
                query = "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
            else:
                query = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
            checkpoints = conn.execute(query).fetchone()[0]
            writes = None
            if self.version >= STAT_IO_VERSION:
                writes = conn.execute(
                    "SELECT coalesce(sum(writes), 0)::bigint FROM pg_stat_io"
                    " WHERE backend_type = 'client backend' AND object = 'relation'"
                ).fetchone()[0]
        return WalSnapshot(lsn=lsn, records=records, fpi=fpi, checkpoints=checkpoints,
                           backend_writes=writes)

    def wal_bytes(self, before: WalSnapshot, after: WalSnapshot) -> int:
        with self.connect() as conn:
            row = conn.execute("SELECT %s::pg_lsn - %s::pg_lsn", (after.lsn, before.lsn)).fetchone()
        return int(row[0])

    def settings(self) -> dict[str, str]:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
                (list(SETTINGS),),
            ).fetchall()
            version = conn.execute("SELECT version()").fetchone()[0]
        return {"version": version, **dict(rows)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on: they only compare within one machine and run."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None off Linux."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Share of all CPUs busy between two readings: the contender, its load, and whoever else
    shares the machine. A run that saw the host at 100% was fighting other work for the CPU."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _backend_cpu_s(pid: int) -> float | None:
    """utime + stime of a backend from /proc (works when the server runs on this machine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _wait_label(state: str | None, wait_type: str | None, wait_event: str | None) -> str:
    """One label per sample: what the backend was doing, 'CPU' when active without a wait."""
    if state == "active":
        return f"{wait_type}:{wait_event}" if wait_event else "CPU"
    if state and state.startswith("idle in transaction"):
        return "client (in transaction)"
    return "client (idle)"


class WaitSampler(threading.Thread):
    """Samples pg_stat_activity of one database every 100 ms: a poor man's profile.

    Splits the backends in ``load`` (the application) and ``gc`` (everything else in the
    database), so a slow contender shows whether it waited on I/O, on WAL, on locks, on the
    client, or burned CPU. Also keeps each backend's last CPU time read from /proc.
    """

    def __init__(self, server: Server, database: str) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.database = database
        self.halt = threading.Event()
        self.waits: dict[str, Counter[str]] = {"gc": Counter(), "load": Counter()}
        self.cpu: dict[int, tuple[str, float, float]] = {}
        """Per backend: its role, and its CPU seconds at the first and the latest sample."""
        self.error: str | None = None

    def run(self) -> None:
        try:
            with self.server.connect() as conn:
                while not self.halt.wait(SAMPLE_INTERVAL_S):
                    self._sample(conn)
        except psycopg.Error as exc:
            self.error = str(exc).strip()

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(
            "SELECT pid, application_name, state, wait_event_type, wait_event FROM pg_stat_activity"
            " WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            (self.database,),
        ).fetchall()
        for pid, app, state, wait_type, wait_event in rows:
            if app == RUNNER_APPLICATION_NAME:
                continue  # the runner's own connection, idle while the contender runs
            role = "load" if app == "bench-load" else "gc"
            self.waits[role][_wait_label(state, wait_type, wait_event)] += 1
            cpu = _backend_cpu_s(pid)
            if cpu is not None:
                first = self.cpu[pid][1] if pid in self.cpu else cpu
                self.cpu[pid] = (role, first, cpu)

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the profile as shares of samples, and backend CPU seconds per role."""
        self.halt.set()
        self.join(timeout=5)
        profile: dict[str, Any] = {}
        for role, counts in self.waits.items():
            total = sum(counts.values())
            profile[role] = {
                "samples": total,
                "top": [(label, round(n / total, 3)) for label, n in counts.most_common(6)] if total else [],
            }
            cpu = [latest - first for r, first, latest in self.cpu.values() if r == role]
            profile[role]["backend_cpu_s"] = round(sum(cpu), 2) if cpu else None
        if self.error:
            profile["error"] = self.error
        return profile
