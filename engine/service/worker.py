"""The worker: claims queued GC runs and runs whose worker died, executes them, delivers webhooks.

Why the queue lives in the database: the API only writes a queued ``gc_runs`` row, so the work
survives any process, and any number of ``msggc serve``/``msggc worker`` processes can share
it. A run is claimed with ``FOR UPDATE SKIP LOCKED`` (two workers never take the same row); a
``running`` row whose heartbeat (written by every batch checkpoint) is older than
``stale_after_s`` has lost its worker and is claimed again, and the collector resumes it in
place from its checkpoint. The table's advisory lock, held by the collector for the whole run,
is the last guard: a run claimed while its first worker still lives cannot take the lock and is
left to that worker.

Each node has its own threads, so a slow or unreachable node never delays the others: one claims
and runs its GCs, one delivers its due ``gc_outbox`` notices with exponential backoff until the
callback server takes them (a callback server that is down loses nothing; a long run does not
hold back the retries of an earlier run's webhook).

Stopping the worker (SIGTERM, Ctrl-C) leaves a run in flight exactly as a crash would: its
batch in flight rolls back, and the next worker resumes it, so the client still gets one
completion webhook for the GC it asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from engine import runs
from engine.collector import collect
from engine.db import Connection, connect, primary_message, user_fault
from engine.errors import DatabaseUnreachable, GcAlreadyRunning, MsggcError
from engine.finish import close
from engine.result import GcResult
from engine.service import outbox
from engine.service.metrics import Metrics
from engine.service.nodes import Node
from engine.service.notice import NoticeFinisher
from engine.service.schedule import Schedule
from engine.service.settings import ServiceSettings
from engine.status import RunStatus

log = logging.getLogger("msggc.worker")

BUSY_TABLE_RETRY_S = 5.0
"""How long a run waits when another GC holds its table: each attempt plans (samples) the table."""
DELIVERY_FAULT_LOG_EVERY_S = 60.0
"""A lasting delivery fault is logged once a minute per distinct error, not at every poll."""


class Worker:
    """Per node: one thread claiming and running GCs, one delivering its webhooks."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings)
        self._closing = threading.Event()
        self._wake = {node.name: threading.Event() for node in settings.nodes}
        self._deliver_now = {node.name: threading.Event() for node in settings.nodes}
        self._down: dict[str, str] = {}
        self._delivery_faults: dict[str, dict[str, float]] = {node.name: {} for node in settings.nodes}
        self._threads: list[threading.Thread] = []
        self.schedule = Schedule(settings, settings.schedule, self.wake) if settings.schedule else None

    def start(self) -> None:
        for node in self.settings.nodes:
            for target, role in ((self._node_loop, "gc"), (self._delivery_loop, "outbox")):
                self._start_thread(f"msggc-{role}-{node.label}", target, node)
        if self.schedule is not None:
            self._start_thread("msggc-schedule", self.schedule.run, self._closing)

    def _start_thread(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def wake(self) -> None:
        """A run was just queued: claim it now instead of at the next poll."""
        for event in self._wake.values():
            event.set()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop claiming and delivering; a run in flight is left for the next worker (see above)."""
        self._closing.set()
        for event in (*self._wake.values(), *self._deliver_now.values()):
            event.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _pause(self, events: dict[str, threading.Event], node: Node) -> None:
        events[node.name].wait(self.settings.poll_s)
        events[node.name].clear()

    def _connected(self, node: Node, conn: Connection | None) -> Connection:
        if conn is not None and not conn.closed:
            return conn
        return connect(node.dsn, timeout_s=self.settings.connect_timeout_s)

    def _node_state(self, node: Node, problem: Exception | None) -> None:
        """Log a node going down or coming back once, not at every poll."""
        if problem is not None and node.name not in self._down:
            log.warning("node %s: unavailable, retrying every %gs: %s",
                        node.label, self.settings.poll_s, problem)
            self._down[node.name] = str(problem)
        elif problem is None and self._down.pop(node.name, None) is not None:
            log.info("node %s: available again", node.label)

    # -- runs ----------------------------------------------------------------------------

    def _node_loop(self, node: Node) -> None:
        """Claim, run, repeat; between runs, wait for a wake-up (a PUT) or the next poll."""
        conn: Connection | None = None
        while not self._closing.is_set():
            claimed = None
            try:
                conn = self._connected(node, conn)
                table = self.settings.table_name(node)
                claimed = runs.claim(conn, table, node.name, self.settings.stale_after_s)
                self._node_state(node, None)
            except (MsggcError, psycopg.Error) as exc:
                self._node_state(node, exc)
                _closed(conn)
                conn = None
            if claimed is not None and self._execute(node, *claimed):
                continue
            self._pause(self._wake, node)
        _closed(conn)

    def _execute(self, node: Node, run_id: int, record: dict[str, Any]) -> bool:
        """Run a claimed GC; False when it must wait (its table is busy, its node is down)."""
        log.info("node %s: run %s claimed", node.label, run_id)
        try:
            options = self.settings.options_of_run(node, record)
            result = collect(node.dsn, options, self._finisher(), run_id=run_id,
                             on_progress=self.metrics.batch_observer(node))
        except GcAlreadyRunning as exc:
            log.info("node %s: run %s waits: %s", node.label, run_id, exc)
            self._release(node, run_id)
            self._closing.wait(BUSY_TABLE_RETRY_S)
            return False
        except (DatabaseUnreachable, psycopg.OperationalError) as exc:
            log.warning("node %s: run %s interrupted, resumed when the database is back: %s",
                        node.label, run_id, exc)
            return False
        except MsggcError as exc:
            self._fail(node, run_id, str(exc))
        except Exception as exc:
            if (reason := user_fault(exc)) is None:
                log.exception("node %s: run %s crashed", node.label, run_id)
                reason = f"internal error: {type(exc).__name__}: {primary_message(exc)}"
            self._fail(node, run_id, reason)
        else:
            _log_result(node, result)
        self._deliver_now[node.name].set()
        return True

    def _release(self, node: Node, run_id: int) -> None:
        try:
            with self._connected(node, None) as conn:
                runs.release(conn, run_id)
        except (MsggcError, psycopg.Error) as exc:
            log.warning("node %s: cannot hand back run %s: %s", node.label, run_id, exc)

    def _fail(self, node: Node, run_id: int, details: str) -> None:
        """A run that could not even start: closed the one way every run is closed."""
        log.error("node %s: run %s failed: %s", node.label, run_id, details)
        try:
            with self._connected(node, None) as conn:
                close(conn, run_id, node.name, lambda: (RunStatus.FAILED, details), self._finisher())
        except (MsggcError, psycopg.Error) as exc:
            log.warning("node %s: cannot record the failure of run %s: %s", node.label, run_id, exc)

    def _finisher(self) -> NoticeFinisher:
        return NoticeFinisher(self.settings.notifier())

    # -- webhooks ------------------------------------------------------------------------

    def _delivery_loop(self, node: Node) -> None:
        """Every due notice of the node, each poll; the outbox reschedules failures with backoff."""
        conn: Connection | None = None
        while not self._closing.is_set():
            try:
                conn = self._connected(node, conn)
                delivered, pending = outbox.deliver_due(conn, self.settings.webhook)
            except DatabaseUnreachable:
                _closed(conn)  # the node loop reports the node's state
                conn = None
            except (MsggcError, psycopg.Error) as exc:
                _closed(conn)
                conn = None
                self._delivery_fault(node, exc)
            else:
                if delivered or pending:
                    log.info("node %s: %d webhook(s) delivered, %d to retry", node.label, delivered, pending)
            self._pause(self._deliver_now, node)
        _closed(conn)

    def _delivery_fault(self, node: Node, problem: Exception) -> None:
        """Log a delivery error once a minute per distinct message: a lasting fault (a missing
        privilege, a broken outbox) must show, but not as a line at every poll."""
        now, message = time.monotonic(), str(problem)
        logged = {seen: at for seen, at in self._delivery_faults[node.name].items()
                  if now - at < DELIVERY_FAULT_LOG_EVERY_S}
        if message not in logged:
            logged[message] = now
            log.warning("node %s: webhook delivery failed, retrying every %gs: %s",
                        node.label, self.settings.poll_s, message)
        self._delivery_faults[node.name] = logged


def _closed(conn: Connection | None) -> None:
    if conn is not None:
        conn.close()


def _log_result(node: Node, result: GcResult) -> None:
    log.info("node %s: run %s %s: %d rows deleted in %.1fs%s", node.label, result.run_id, result.status,
             result.messages_deleted, result.elapsed_s,
             f" ({result.error or result.stop_reason})" if result.status is not RunStatus.COMPLETE else "")

