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
hold back the retries of an earlier run's webhook). Their connections come from the budget of
the node's server (:mod:`engine.service.slots`): a node with a queued run waits in line for its
run's connections (the run stays ``queued`` meanwhile) and claims it only once it has them, so
a fan-out over the databases of one server never opens more than the server has room for.

A run whose database refuses or drops its connection (full, restarting) is tried again by its
own worker with backoff, from its checkpoint, not left ``running`` until ``stale_after_s``.

A run without a latency budget of its own gets the service's ``auto`` one, made of its server's
baseline (measured before the server's runs start, shared while they go:
:mod:`engine.service.baselines`) and recorded with it in ``gc_runs.options``.

Stopping the worker (SIGTERM, Ctrl-C) leaves a run in flight exactly as a crash would: its
batch in flight rolls back, and the next worker resumes it, so the client still gets one
completion webhook for the GC it asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from engine import baseline, runs
from engine.collector import collect
from engine.config import GcOptions
from engine.db import Connection, primary_message, user_fault
from engine.errors import DatabaseUnreachable, GcAlreadyRunning, MsggcError
from engine.finish import close
from engine.result import GcResult
from engine.service import outbox
from engine.service.baselines import Baselines
from engine.service.metrics import Metrics
from engine.service.nodes import Node
from engine.service.notice import NoticeFinisher
from engine.service.requests import AUTO_LATENCY_MARK, REQUESTED_MARK
from engine.service.schedule import Schedule
from engine.service.settings import ServiceSettings
from engine.service.slots import Granted, auto_workers, refused
from engine.status import RunStatus

log = logging.getLogger("msggc.worker")

BUSY_TABLE_RETRY_S = 5.0
"""How long a run waits when another GC holds its table: each attempt plans (samples) the table."""
Busy = Literal["busy"]
"""What :meth:`Worker._execute` says of a run whose table another GC holds."""
DELIVERY_FAULT_LOG_EVERY_S = 60.0
"""A lasting delivery fault is logged once a minute per distinct error, not at every poll."""
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 10.0
"""A run its database refused or dropped is tried again after 0.25 s, doubling up to this (and
to a third of ``stale_after_s``, so that its heartbeat, refreshed by each try, stays fresh)."""

NEXT_SQL = """
SELECT options, requested_at FROM gc_runs WHERE table_name = %(table)s AND node = %(node)s
  AND (status = 'queued' OR (status = 'running' AND (heartbeat_at IS NULL
       OR heartbeat_at < now() - make_interval(secs => %(stale)s))))
ORDER BY id LIMIT 1
"""
"""The run :func:`engine.runs.claim` would take next, without taking it: a node waits in line for
that run's connections before it claims it."""
STILL_OURS_SQL = """
UPDATE gc_runs SET heartbeat_at = now() WHERE id = %s AND status = 'running' RETURNING id
"""
"""Before a run is tried again: still running (nobody closed it meanwhile), its heartbeat fresh."""
RECORD_BUDGET_SQL = "UPDATE gc_runs SET options = options || %s WHERE id = %s"


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
        self._nodes_on_server = Counter(node.address for node in settings.nodes)
        self._place = {node.name: place for place, node in enumerate(settings.nodes)}
        self.baselines = Baselines()
        self.schedule = (Schedule(settings, settings.schedule, self.wake, self.metrics)
                         if settings.schedule else None)

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
        """A run was just queued: claim it now instead of at the next poll; a notice may have
        been queued with it (:mod:`engine.service.unstarted`): deliver it now too."""
        for event in (*self._wake.values(), *self._deliver_now.values()):
            event.set()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop claiming and delivering; a run in flight is left for the next worker (see above)."""
        self._closing.set()
        for event in (*self._wake.values(), *self._deliver_now.values()):
            event.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.settings.slots.close()

    def _pause(self, events: dict[str, threading.Event], node: Node) -> None:
        """Until woken, or the next poll: every ``poll_s`` while the server's pool has a connection
        for each of its nodes' pollers; else spread out, so that a hundred idle nodes do not open
        and close hundreds of connections a second (a PUT, a schedule, a run's end wake at once)."""
        pollers = 2 * self._nodes_on_server.get(node.address, 1)
        light = self.settings.slots_of(node).light
        events[node.name].wait(self.settings.poll_s * max(1.0, pollers / light))
        events[node.name].clear()

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
        """Look for a run to claim, wait in line for its connections, run it, repeat; between
        runs, wait for a wake-up (a PUT) or the next poll."""
        while not self._closing.is_set():
            try:
                table = self.settings.table_name(node)
                with self._connection(node) as conn:
                    row = conn.execute(NEXT_SQL, {"table": table, "node": node.name,
                                                  "stale": self.settings.stale_after_s}).fetchone()
                self._node_state(node, None)
            except (MsggcError, psycopg.Error) as exc:
                self._node_state(node, exc)
                row = None
            if row is not None and self._claim_and_run(node, table, row[0], self._order(node, *row)):
                continue
            self._pause(self._wake, node)

    def _order(self, node: Node, record: dict[str, Any], requested_at: datetime) -> tuple[float, int]:
        """A run's place in its server's line: when it was requested (by the request's clock,
        the same on every node), then its node's place in the configuration."""
        requested = record.get(REQUESTED_MARK)
        when = float(requested) if isinstance(requested, int | float) else requested_at.timestamp()
        return when, self._place[node.name]

    def _connection(self, node: Node) -> AbstractContextManager[Connection]:
        """A short-lived connection to the node from its server's pool."""
        return self.settings.slots_of(node).connection(node.dsn, self.settings.connect_timeout_s)

    def _claim_and_run(self, node: Node, table: str, record: dict[str, Any], order: Any) -> bool:
        """With the connections the next run needs (waiting in line for them, in the order the
        runs were requested, then of the nodes), claim and run it; False when it must wait (its
        table is busy, its node is down)."""
        slots = self.settings.slots_of(node)
        with slots.run(self._connections_for(node, record), self._closing, order) as granted:
            if granted is None:
                return False
            try:
                with self._connection(node) as conn:
                    claimed = runs.claim(conn, table, node.name, self.settings.stale_after_s)
            except (MsggcError, psycopg.Error) as exc:
                self._node_state(node, exc)
                return False
            if claimed is None:  # another worker took it meanwhile
                return True
            try:
                outcome = self._execute(node, granted, *claimed)
            finally:
                with contextlib.suppress(MsggcError, psycopg.Error):
                    slots.await_exits(node.dsn, self.settings.connect_timeout_s)
        if isinstance(outcome, str):  # its table is busy: waits with its connections given back
            self._closing.wait(BUSY_TABLE_RETRY_S)
            return False
        return outcome

    def _connections_for(self, node: Node, record: dict[str, Any]) -> int:
        """The connections a run may open: its workers and, with a latency budget, its probe."""
        try:
            options = self.settings.options_of_run(node, record)
        except MsggcError:
            return 1  # refused when run: it needs only the connection that records its failure
        return self._workers_bound(node, options) + (1 if self._guarded(options, record) else 0)

    def _workers_bound(self, node: Node, options: GcOptions) -> int:
        return options.workers or auto_workers(node)

    def _guarded(self, options: GcOptions, record: dict[str, Any]) -> bool:
        return options.max_app_latency_ms is not None or bool(record.get(AUTO_LATENCY_MARK))

    def _fitted(self, node: Node, options: GcOptions, record: dict[str, Any], granted: Granted) -> GcOptions:
        """Fewer workers when the run's connections do not fit the server's budget."""
        room = granted.connections - (1 if self._guarded(options, record) else 0)
        if self._workers_bound(node, options) <= room:
            return options
        log.info("node %s: run with %d worker(s), what the connection budget leaves",
                 node.label, max(1, room))
        return dataclasses.replace(options, workers=max(1, room))

    def _execute(self, node: Node, granted: Granted, run_id: int, record: dict[str, Any]) -> bool | Busy:
        """Run a claimed GC, again from its checkpoint with backoff while its database refuses
        or drops the connection; False when it must wait for its database, "busy" when another
        GC holds its table (it waits with its connections given back)."""
        log.info("node %s: run %s claimed", node.label, run_id)
        delay, gone_since = RETRY_FIRST_S, None
        while True:
            try:
                options = self._fitted(node, self.settings.options_of_run(node, record), record, granted)
                if record.get(AUTO_LATENCY_MARK):  # measured once, kept by the record for the retries
                    if options.max_app_latency_ms is None:
                        options = self._auto_budget(node, run_id, options)
                        record = {**record, "max_app_latency_ms": options.max_app_latency_ms}
                    options = dataclasses.replace(options, latency_budget_auto=True)
                with self.baselines.of(node.address).writing():
                    result = collect(node.dsn, options, self._finisher(), run_id=run_id,
                                     on_progress=self.metrics.batch_observer(node))
            except GcAlreadyRunning as exc:
                log.info("node %s: run %s waits: %s", node.label, run_id, exc)
                self._release(node, run_id)
                return "busy"
            except (DatabaseUnreachable, psycopg.OperationalError) as exc:
                gone_since = gone_since if gone_since is not None or refused(exc) else time.monotonic()
                if gone_since is not None and time.monotonic() - gone_since > self.settings.stale_after_s:
                    log.warning("node %s: run %s interrupted, resumed when the database is back: %s",
                                node.label, run_id, str(exc).strip())
                    return False  # its connections go to the other nodes meanwhile
                log.warning("node %s: run %s interrupted, tried again in %.2gs: %s",
                            node.label, run_id, delay, str(exc).strip())
                if self._closing.wait(delay):
                    return False
                delay = min(delay * 2, RETRY_MAX_S, self.settings.stale_after_s / 3)
                if not self._still_ours(node, run_id):
                    return True
                continue
            except MsggcError as exc:
                self._fail(node, run_id, str(exc))
            except Exception as exc:
                if (reason := user_fault(exc)) is None:
                    log.exception("node %s: run %s crashed", node.label, run_id)
                    reason = f"internal error: {type(exc).__name__}: {primary_message(exc)}"
                self._fail(node, run_id, reason)
            else:
                _log_result(node, result)
                self.metrics.observe_run(node, result)
            self._deliver_now[node.name].set()
            return True

    def _auto_budget(self, node: Node, run_id: int, options: GcOptions) -> GcOptions:
        """The ``auto`` latency budget: its server's baseline (:mod:`engine.service.baselines`),
        measured if need be on the connection the run's probe will use (counted in its
        reservation), times the factor; recorded with the run before it starts (a run resumed
        later keeps it)."""
        def measure() -> baseline.Baseline:
            return baseline.measure(node.dsn, options.table.qualified, node.name, self.settings.baseline_s)

        shared = self.baselines.of(node.address).baseline(node.name, run_id, measure)
        found = shared.found
        with self._connection(node) as conn:
            conn.execute(RECORD_BUDGET_SQL, (Jsonb({"max_app_latency_ms": found.budget_ms,
                                                    baseline.RECORD_KEY: shared.describe(node.name, run_id)}),
                                             run_id))
        log.info("node %s: run %s: latency budget auto = %g ms (%gx the probe's p99 of %.2f ms %s)",
                 node.label, run_id, found.budget_ms, baseline.AUTO_FACTOR, found.p99_ms,
                 shared.source(node.name, run_id))
        return dataclasses.replace(options, max_app_latency_ms=found.budget_ms)

    def _still_ours(self, node: Node, run_id: int) -> bool:
        """Whether the run is still running (nobody closed it meanwhile); refreshes its heartbeat.
        True while the database cannot tell: the next try finds out."""
        try:
            with self._connection(node) as conn:
                return conn.execute(STILL_OURS_SQL, (run_id,)).fetchone() is not None
        except (MsggcError, psycopg.Error):
            return True

    def _release(self, node: Node, run_id: int) -> None:
        try:
            with self._connection(node) as conn:
                runs.release(conn, run_id)
        except (MsggcError, psycopg.Error) as exc:
            log.warning("node %s: cannot hand back run %s: %s", node.label, run_id, exc)

    def _fail(self, node: Node, run_id: int, details: str) -> None:
        """A run that could not even start: closed the one way every run is closed."""
        log.error("node %s: run %s failed: %s", node.label, run_id, details)
        try:
            with self._connection(node) as conn:
                close(conn, run_id, node.name, lambda: (RunStatus.FAILED, details), self._finisher())
        except (MsggcError, psycopg.Error) as exc:
            log.warning("node %s: cannot record the failure of run %s: %s", node.label, run_id, exc)
        except Exception:  # a bug here must not end the node's loop: its next runs still come
            log.exception("node %s: cannot record the failure of run %s", node.label, run_id)

    def _finisher(self) -> NoticeFinisher:
        return NoticeFinisher(self.settings.notifier())

    # -- webhooks ------------------------------------------------------------------------

    def _delivery_loop(self, node: Node) -> None:
        """Every due notice of the node, each poll; the outbox reschedules failures with backoff."""
        while not self._closing.is_set():
            try:
                with self._connection(node) as conn:
                    delivered, pending = outbox.deliver_due(conn, self.settings.webhook)
            except DatabaseUnreachable:
                pass  # the node loop reports the node's state
            except (MsggcError, psycopg.Error) as exc:
                self._delivery_fault(node, exc)
            else:
                if delivered or pending:
                    log.info("node %s: %d webhook(s) delivered, %d to retry", node.label, delivered, pending)
            self._pause(self._deliver_now, node)

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


def _log_result(node: Node, result: GcResult) -> None:
    log.info("node %s: run %s %s: %d rows deleted in %.1fs%s", node.label, result.run_id, result.status,
             result.messages_deleted, result.elapsed_s,
             f" ({result.error or result.stop_reason})" if result.status is not RunStatus.COMPLETE else "")

