"""The connections and GCs the service holds on each database server, bounded and queued.

Why: nodes are often databases of one server, and a fan-out that opens a connection per node per
thread (a poller, a webhook deliverer, the PUT's enqueuer) plus each run's workers and probe
exhausts its ``max_connections``; the application then gets ``FATAL: sorry, too many clients
already`` and so does msggc. Per server (``host:port``) the service keeps:

- ``connections`` in all, by default half of the room the server has left when first asked
  (``max_connections`` minus the superuser and reserved slots minus the client backends that are
  not msggc's), never fewer than ``MIN_CONNECTIONS``;
- of those, a few for short work (``light``): a node's poll, its webhook delivery, the API's
  enqueue and status. They stay open while idle and are closed, oldest first, when another
  node needs one; the rest are for runs;
- at most ``gcs`` runs at once, each holding as many connections as it may open (its workers
  and, with a latency budget, its probe). A run waits for them in arrival order, queued in
  ``gc_runs`` meanwhile.

A connection the server refuses because it is full (SQLSTATE 53300) is retried with backoff
at once: the application, not msggc, may hold the slots for a moment.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from engine.db import APPLICATION_NAME, Connection, connect, one_row
from engine.errors import DatabaseUnreachable, MsggcError
from engine.planner import MAX_AUTO_WORKERS
from engine.service.nodes import Node

MIN_CONNECTIONS = 3
"""One for the service's polls, two for a run and its latency probe."""
MAX_LIGHT = 8
DEFAULT_GCS = 4
"""Runs at once on one server by default: more share the same cores and disk, and each run's
latency budget is measured against the others."""
FALLBACK_CONNECTIONS = 10
"""While the server cannot be asked (down at start), the service holds no more than this."""
REMEASURE_S = 30.0
LIGHT_WAIT_S = 30.0
"""Short work waits this long at most for a connection of the pool (deliveries to a slow
callback server may hold them all): then its node answers 1014, and a poll tries again."""
REFUSED_WINDOW_S = 10.0
"""A refused connection is retried this long (doubling waits from 50 ms up to 1 s)."""

ROOM_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true)::int, 0),
       (SELECT count(*) FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND coalesce(application_name, '') NOT LIKE %s)::int
"""
"""The server's slots, those kept for superusers (and, from PostgreSQL 16, for
``pg_use_reserved_connections``), and the client backends in use that are not msggc's."""

OURS_LEFT_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE %s AND pid <> ALL(%s)
"""

REFUSED_TEXTS = ("too many clients", "too many connections", "connection slots are reserved")
log = logging.getLogger("msggc.slots")


def refused(exc: BaseException) -> bool:
    """The server was full (SQLSTATE 53300): worth retrying at once, unlike a server that is down.
    psycopg gives no SQLSTATE for a failed connection, so the server's words tell it."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "sqlstate", None) == "53300":
            return True
        if any(text in str(seen).lower() for text in REFUSED_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def connect_patiently(dsn: str, timeout_s: float, window_s: float = REFUSED_WINDOW_S) -> Connection:
    """:func:`engine.db.connect`, retried with backoff while the server refuses for being full."""
    deadline, delay = time.monotonic() + window_s, 0.05
    while True:
        try:
            return connect(dsn, timeout_s=timeout_s)
        except DatabaseUnreachable as exc:
            if not refused(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _dropped(conn: Connection) -> bool:
    """An idle connection the server has closed (stopped, restarted, backend terminated): its
    socket is readable although nothing was asked. Lent again, it would fail its first query
    with "terminating connection" instead of the node's "Connection refused"."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def close_and_wait(conn: Connection, timeout_s: float = 1.0) -> None:
    """Close and wait (briefly) until the server's backend has exited: a closed connection holds
    its slot of ``max_connections`` until then, and the pool may open the next one at once. The
    backend closes its socket after it gave its slot back, so the end of the socket tells."""
    try:
        watched = os.dup(conn.fileno())
    except (OSError, psycopg.Error):
        conn.close()
        return
    try:
        conn.close()
        select.select([watched], [], [], timeout_s)
    finally:
        os.close(watched)


def server_room(conn: Connection) -> int:
    """Connections a service may hold on this server: half the room left, at least the minimum."""
    total, superuser, reserved, others = one_row(conn.execute(ROOM_SQL, (f"{APPLICATION_NAME}%",)))
    return max(MIN_CONNECTIONS, (int(total) - int(superuser) - int(reserved) - int(others)) // 2)


def auto_workers(node: Node) -> int:
    """The most workers ``--workers auto`` may pick on this node's server (the planner's rule)."""
    host = node.address.rsplit(":", 1)[0]
    local = host.startswith("/") or host in ("localhost", "127.0.0.1", "::1", "[::1]")
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 1) if local else 2))


def light_share(connections: int) -> int:
    """Connections kept for polls, deliveries and the API out of ``connections``."""
    return max(1, min(MAX_LIGHT, connections // 4))


@dataclass(frozen=True)
class Granted:
    """A run's reservation: the connections it may open."""

    connections: int


class ServerSlots:
    """One server's budget: a pool of short-lived connections and a queue of runs."""

    def __init__(self, address: str, connections: int, gcs: int, measured: bool) -> None:
        self.address = address
        self.measured = measured
        self.measured_at = time.monotonic()
        self._cond = threading.Condition()
        self._idle: OrderedDict[int, tuple[str, Connection]] = OrderedDict()
        self._lent: dict[int, tuple[str, Connection]] = {}
        self._light_open = 0
        self._gc_used = 0
        self._gcs_running = 0
        self._waiting: deque[object] = deque()
        self._gc_waiting: list[tuple[Any, object]] = []
        self.peak_gcs = 0
        self.started_order: list[Any] = []
        """The ``order`` of each run given its connections, in turn (what the tests check)."""
        self._arrivals = itertools.count()
        self._set(connections, gcs)

    def _set(self, connections: int, gcs: int) -> None:
        self.connections = connections
        self.light = light_share(connections)
        self.gc_connections = connections - self.light
        self.gcs = gcs

    def resize(self, connections: int, gcs: int) -> None:
        with self._cond:
            self._set(connections, gcs)
            self.measured, self.measured_at = True, time.monotonic()
            self._cond.notify_all()

    @property
    def gcs_running(self) -> int:
        return self._gcs_running

    # -- short work ----------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self, dsn: str, timeout_s: float) -> Iterator[Connection]:
        """A connection to ``dsn`` for short work: an idle one of the pool, a new one while the
        pool has room, else in turn (the oldest idle connection of another database closed)."""
        conn = self._take(dsn, timeout_s)
        with self._cond:
            self._lent[id(conn)] = (dsn, conn)
        broken = True
        try:
            yield conn
            broken = conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        finally:
            self._give_back(dsn, conn, broken)

    def _take(self, dsn: str, timeout_s: float) -> Connection:
        turn = object()
        evicted: Connection | None = None
        with self._cond:
            self._waiting.append(turn)
            try:
                free = self._cond.wait_for(lambda: self._waiting[0] is turn and (
                    self._light_open < self.light or bool(self._idle)), LIGHT_WAIT_S)
            finally:
                self._waiting.remove(turn)
                self._cond.notify_all()
            if not free:
                raise DatabaseUnreachable(f"no connection to {self.address} free in msggc's pool after"
                                          f" {LIGHT_WAIT_S:g}s ({self.light} for polls, deliveries,"
                                          " requests)")
            for key, (idle_dsn, idle) in self._idle.items():
                if idle_dsn == dsn:
                    del self._idle[key]
                    if not idle.closed and not _dropped(idle):
                        return idle
                    idle.close()
                    self._light_open -= 1
                    break
            if self._light_open >= self.light:
                _key, (_dsn, evicted) = self._idle.popitem(last=False)
            else:
                self._light_open += 1
        if evicted is not None:
            close_and_wait(evicted)
        try:
            return connect_patiently(dsn, timeout_s)
        except BaseException:
            with self._cond:
                self._light_open -= 1
                self._cond.notify_all()
            raise

    def _give_back(self, dsn: str, conn: Connection, broken: bool) -> None:
        with self._cond:
            self._lent.pop(id(conn), None)
            kept = not (broken or conn.closed or self._light_open > self.light)
            if kept:
                self._idle[id(conn)] = (dsn, conn)
            else:
                self._light_open -= 1
            self._cond.notify_all()
        if not kept:
            close_and_wait(conn)

    def pool_pids(self, dsn: str) -> list[int]:
        """The backends of the pool's connections to ``dsn`` (idle or lent)."""
        with self._cond:
            held = [conn for key_dsn, conn in (*self._idle.values(), *self._lent.values()) if key_dsn == dsn]
        return [conn.info.backend_pid for conn in held if not conn.closed]

    def await_exits(self, dsn: str, timeout_s: float) -> None:
        """Wait (briefly) until no backend of msggc's is left on ``dsn`` but the pool's: a run's
        connections, closed by the engine, hold their slots until their backends exited, and the
        next run would otherwise open its own meanwhile."""
        deadline = time.monotonic() + 1.0
        with self.connection(dsn, timeout_s) as conn:
            while time.monotonic() < deadline:
                left = one_row(conn.execute(OURS_LEFT_SQL, (f"{APPLICATION_NAME}%", self.pool_pids(dsn))))[0]
                if not left:
                    return
                time.sleep(0.005)

    def close_idle(self) -> None:
        with self._cond:
            idle = list(self._idle.values())
            self._idle.clear()
            self._light_open -= len(idle)
            self._cond.notify_all()
        for _dsn, conn in idle:
            close_and_wait(conn)

    # -- runs ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, wanted: int, closing: threading.Event, order: Any = 0) -> Iterator[Granted | None]:
        """Wait in line for a run's connections (at most the runs' share); None when closing.
        The line is ordered by ``order`` (when the run was requested, then the node's place in
        the configuration), then by arrival."""
        turn = object()
        place = (order, next(self._arrivals))
        with self._cond:
            self._gc_waiting.append((place, turn))
            try:
                while not (closing.is_set() or (
                        min(self._gc_waiting, key=lambda waiting: waiting[0])[1] is turn
                        and self._gcs_running < self.gcs
                        and self._gc_used + min(wanted, self.gc_connections) <= self.gc_connections)):
                    self._cond.wait(0.5)
            finally:
                self._gc_waiting.remove((place, turn))
                self._cond.notify_all()
            if closing.is_set():
                granted = None
            else:
                wanted = min(wanted, self.gc_connections)
                self._gc_used += wanted
                self._gcs_running += 1
                self.peak_gcs = max(self.peak_gcs, self._gcs_running)
                self.started_order.append(order)
                granted = Granted(wanted)
        try:
            yield granted
        finally:
            if granted is not None:
                with self._cond:
                    self._gc_used -= granted.connections
                    self._gcs_running -= 1
                    self._cond.notify_all()


class Slots:
    """Every server's budget, made when a node of it is first used; shared by the API and the
    worker of one service."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, ServerSlots] = {}

    def of(self, node: Node, connections: int | None, gcs: int | None, timeout_s: float) -> ServerSlots:
        """The budget of ``node``'s server: configured, else measured (asked again later while
        the server could not be asked)."""
        with self._lock:
            slots = self._servers.get(node.address)
            if slots is None:
                slots = self._servers[node.address] = ServerSlots(
                    node.address, connections or FALLBACK_CONNECTIONS, gcs or DEFAULT_GCS,
                    measured=connections is not None)
                stale = connections is None
            else:
                stale = not slots.measured and time.monotonic() - slots.measured_at > REMEASURE_S
                if stale:
                    slots.measured_at = time.monotonic()
        if stale:
            self._measure(slots, node, gcs, timeout_s)
        return slots

    def _measure(self, slots: ServerSlots, node: Node, gcs: int | None, timeout_s: float) -> None:
        try:
            with connect_patiently(node.dsn, timeout_s, window_s=timeout_s) as conn:
                room = server_room(conn)
        except (MsggcError, psycopg.Error) as exc:
            log.warning("server %s: cannot read max_connections (%s); holding at most %d connections"
                        " until it can", node.address, str(exc).strip(), slots.connections)
            return
        slots.resize(room, gcs or DEFAULT_GCS)
        log.info("server %s: msggc holds at most %d connections there, %d run(s) at once",
                 node.address, slots.connections, slots.gcs)

    def close(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
        for slots in servers:
            slots.close_idle()
