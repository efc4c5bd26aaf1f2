"""``msggc worker --every 1h``: request a GC on every node periodically, so no external cron is
needed. Each request is the API's PUT (queue, or join a run in flight); the worker executes it
with the configured budget, and the next request continues where a stopped run left off.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from engine.service import request_gc
from engine.settings import ServiceSettings

log = logging.getLogger("msggc.schedule")


class Schedule:
    """Requests a GC now and then every ``every``, until closed."""

    def __init__(self, settings: ServiceSettings, every: timedelta) -> None:
        self.settings = settings
        self.every = every
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="msggc-schedule", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for result in request_gc(self.settings, {}):
                if result.ok:
                    log.info("scheduled GC on node %r: run %s", result.node.label, result.value.run_id)
                else:
                    log.warning("scheduled GC on node %r not started: %s", result.node.label, result.error)
            self.requests += 1
            self._stop.wait(self.every.total_seconds())
