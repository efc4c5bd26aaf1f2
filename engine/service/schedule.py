"""Periodic GC without an external cron: one loop waits for its trigger (:mod:`engine.service.triggers`),
then requests a GC on every node as the API's PUT does (queue, or join a run in flight). The worker
executes each request with the configured budget; the next request continues where a stopped run
left off. A node where the request cannot start gets its failure webhook all the same
(:mod:`engine.service.unstarted`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from engine.service import unstarted
from engine.service.metrics import Metrics
from engine.service.requests import request_gc
from engine.service.settings import ServiceSettings
from engine.service.triggers import Trigger

log = logging.getLogger("msggc.schedule")


class Schedule:
    """Requests a GC on every node each time its trigger fires; run by the worker in its own thread."""

    def __init__(self, settings: ServiceSettings, trigger: Trigger, on_request: Callable[[], None],
                 metrics: Metrics) -> None:
        self.settings = settings
        self.trigger = trigger
        self.on_request = on_request
        self.metrics = metrics
        self.next_at: datetime | None = None
        metrics.watch_schedule(settings.nodes, lambda: self.next_at)

    def run(self, stop: threading.Event) -> None:
        log.info("scheduled GC %s", self.trigger.describe())
        due = self.trigger.first(datetime.now(UTC))
        while True:
            self.next_at = due
            if stop.wait(max(0.0, (due - datetime.now(UTC)).total_seconds())):
                return
            self._request()
            due = self.trigger.next_after(due)  # from the due time, not the clock: no drift
            if due < (now := datetime.now(UTC)):  # times missed while suspended are not caught up
                due = self.trigger.next_after(now)

    def _request(self) -> None:
        results = request_gc(self.settings, {})
        for result in results:
            if (started := result.value) is not None:
                log.info("scheduled GC on node %r: run %s", result.node.label, started.run_id)
                outcome = "joined" if started.joined else "queued"
            else:
                log.warning("scheduled GC on node %r not started: %s", result.node.label, result.error)
                outcome = "failed"
            self.metrics.scheduled.labels(result.node.label, outcome).inc()
        unstarted.notify(self.settings, results)  # no answer tells anyone: a webhook does
        self.on_request()
