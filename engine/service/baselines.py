"""One ``auto`` latency baseline per database server, shared by the runs of all its nodes.

Why: the nodes of a multiconnect service are often databases of one server, and their runs go at
once (up to ``max_concurrent_gcs``). A baseline measured before each run would time the probe
beside the other nodes' runs already writing there, take msggc's own load for the application's
and make each budget looser than the last. So per server (``host:port``) the probe is timed only
while none of this service's runs write there: a run about to start waits while its server's
baseline is measured (``baseline_s``), and a run that starts while others write, or soon after a
measurement (``REUSE_IDLE_S``), takes the server's latest instead of measuring again. Each run
records the baseline it went by, with where and when it was measured, in ``gc_runs.options``.

Only this service's runs are known here: another process's GC on the same server (``msggc gc``,
a second service) is still measured as the application's load.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.baseline import Baseline

REUSE_IDLE_S = 10.0
"""A baseline this fresh is taken as it is even when no run writes: the nodes of one request,
claimed a moment apart, share one measurement instead of each timing the next's first batches."""


@dataclass(frozen=True)
class Measured:
    """A server's baseline, and which run's start it was measured for."""

    found: Baseline
    server: str
    node: str
    run_id: int
    at: datetime
    beside_runs: int
    """The service's runs writing on the server meanwhile (0 unless no baseline existed yet
    while a run with a budget of its own went on)."""
    monotonic_at: float

    def shared(self, node: str, run_id: int) -> bool:
        """Whether it was measured for another run than this one."""
        return (node, run_id) != (self.node, self.run_id)

    def describe(self, node: str, run_id: int) -> dict[str, Any]:
        """Recorded with each run that goes by it (``gc_runs.options``)."""
        return {**self.found.describe(), "server": self.server, "measured_at": self.at.isoformat(),
                "measured_for": {"node": self.node, "run_id": self.run_id},
                "shared": self.shared(node, run_id), "beside_runs": self.beside_runs}

    def source(self, node: str, run_id: int) -> str:
        """Where it came from, for the log."""
        if not self.shared(node, run_id):
            return "before the run"
        return f"before the runs on {self.server} (measured for node {self.node!r}, run {self.run_id})"


class ServerBaseline:
    """One server's latest baseline, and the service's runs writing there."""

    def __init__(self, server: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self._clock = clock
        self._cond = threading.Condition()
        self._measuring = False
        self._writing = 0
        self.latest: Measured | None = None
        self.measurements = 0

    def baseline(self, node: str, run_id: int, measure: Callable[[], Baseline]) -> Measured:
        """The server's baseline for a run about to start: the latest while runs write there or
        when it is fresh, else measured now (the other runs of the server wait meanwhile)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._measuring)
            latest = self.latest
            if latest is not None and (self._writing or self._clock() - latest.monotonic_at < REUSE_IDLE_S):
                return latest
            self._measuring, beside = True, self._writing
        measured: Measured | None = None
        try:
            found = measure()
            measured = Measured(found, self.server, node, run_id, datetime.now(UTC), beside, self._clock())
        finally:
            with self._cond:  # latest set with the flag cleared: a run let through sees it
                self._measuring = False
                if measured is not None:
                    self.measurements += 1
                    self.latest = measured
                self._cond.notify_all()
        return measured

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around a run of the server: it starts once no measurement is going on, and none starts
        while it goes."""
        with self._cond:
            self._cond.wait_for(lambda: not self._measuring)
            self._writing += 1
        try:
            yield
        finally:
            with self._cond:
                self._writing -= 1
                self._cond.notify_all()


class Baselines:
    """Every server's, made when a run of it first needs one; one set per worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, ServerBaseline] = {}

    def of(self, server: str) -> ServerBaseline:
        with self._lock:
            return self._servers.setdefault(server, ServerBaseline(server))
