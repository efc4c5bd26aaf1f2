"""The latency guard: a run gives way to the application by measurement, not by guess.

A probe on its own connection and thread commits a one-row update of msggc's ``gc_probe`` row
every ``PROBE_INTERVAL_S`` with ``synchronous_commit = on``: the round trip of a tiny write
that waits for its WAL flush is what an application's commit feels beside the GC. After each
write it samples ``pg_stat_activity`` for other backends (not msggc's) waiting on a WAL flush
or a lock, reported beside the latencies as evidence of what the latencies come from.

What the application feels is the rate at which the run writes WAL and dirties pages, not the
share of time it spends in batches (issue 22: a run held to 10-30 MB/s of WAL kept pgbench's p99
at 9-19 ms where one working 12% of its time made it 238 ms). So the controller's output is a
rate of bytes per second, which the throttle's token bucket holds every worker to, each batch
charged its WAL or the pages it dirtied (8 kB each), whichever is more: it
starts gentle and doubles each calm control step (slow start) until the first step over the
budget, then halves on every step whose p99 passes the budget and grows additively while it
stays under ``ROOM`` of it. Before the workers start, the probe measures ``BEFORE_SAMPLES``
commits alone: the application's p99 without the run, reported beside the p99 during it.

Beside the probe, once per step the probe reads the server's requested checkpoints and the
buffers written by backends themselves (dirty pages evicted by a client, not the background
writer or the checkpointer: the application's own commits and reads doing the run's writing).
A requested checkpoint holds the rate's growth; so do backends writing well beyond their rate
before the run (over a window of ``EVICTING_WINDOW_S``), however calm the probe: its one-row
commit does not feel an eviction that a transaction reading and dirtying pages does (issue 22:
pgbench's p99 6.5x the budget while the probe's stayed under it most steps and backends wrote
15,000 buffers a second, before the run's dirtying was held to the server's cleaning pace).
Each step is a point of the run's time series (rate granted, probe p99, WAL rate, checkpoints,
backend writes).

A run whose application is over the budget before it starts (``REFUSE_PERCENTILE`` of the
commits alone) is refused before it deletes anything (:class:`~engine.errors.BudgetCannotHold`),
but for a budget measured before the run (``auto``): that one is measured again from the commits
just timed (the application slower than when it was measured), as ``rebudget`` makes it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import psycopg

from engine.db import APPLICATION_NAME, Connection, connect
from engine.errors import BudgetCannotHold, MsggcError
from engine.guard_series import Series
from engine.probe_record import (
    BEAT_SQL,
    CLAIM_SQL,
    PROBE_APPLICATION_NAME,
    ProbeSite,
    record_final,
    write_series,
)
from engine.rate_control import PROBE_INTERVAL_S, STEP_SAMPLES, RateControl, percentile
from engine.server_counters import ServerCounters, read_counters

BEFORE_SAMPLES = 20
"""Commits the probe times before the workers start (~2 s): the application's p99 alone."""
BEFORE_MAX_SAMPLES = 100
"""While the last ``BEFORE_SAMPLES`` commits are over the budget (``REFUSE_PERCENTILE``), the
workers wait for a calmer window, up to this many commits (~10 s), then the run is refused."""
BEFORE_WAIT_S = 12.0
"""The longest the workers wait for those (a probe that cannot connect does not hold the run)."""
REFUSE_PERCENTILE = 90
"""The application is over the budget alone when this percentile of its commits is: more than
a tenth of them are, so the p99 over the run cannot keep the budget whatever msggc does, while
one slow commit among twenty (the p99 of so few) does not refuse a run that could keep it."""
EVICTING_FLOOR = 64.0
"""Buffers a second (512 kB/s) that client backends may write themselves beyond their rate
before the run, before the guard reads it as the run's dirty pages evicted by the application."""
EVICTING_WINDOW_S = 1.5
"""The window backends' writes are judged over (longer than the server's ~1 s publishing)."""
EVICTING_GROWTH = 2.0
"""...or this many times that rate before the run, whichever is more."""
LIVE_WINDOW = 600
"""Samples behind the live p50/p99 written to ``gc_probe`` with every beat (about a minute)."""
LIVE_SERIES_STEPS = 4
"""The series is written to ``gc_runs`` every this many of its points (~2 s of control steps at
first) while the run goes, so ``msggc status``, the API and ``/metrics`` show it live; the whole
run's again at its end. Per points, not steps: once a long run's steps merge in pairs, the writes
space out with them (at most ``LIVE_SERIES_MAX_STEPS`` apart): a write of 240 points is ~10 kB of
WAL (measured, PostgreSQL 15), 5 kB/s every 2 s, beside a floor of 16 kB/s granted to the run."""
LIVE_SERIES_MAX_STEPS = 60
"""~30 s: the longest a live view lags behind the run."""
RECONNECT_S = 1.0

WAITS_SQL = """
SELECT wait_event_type || ':' || wait_event, count(*)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active'
  AND application_name NOT LIKE %(ours)s
  AND ((wait_event_type = 'IO' AND wait_event = 'WalSync')
       OR (wait_event_type = 'LWLock' AND wait_event = 'WALWrite')
       OR wait_event_type = 'Lock')
GROUP BY 1
"""
"""Other backends waiting on a WAL flush, the WAL write lock, or a heavyweight lock, right now."""

log = logging.getLogger("msggc.guard")


class Probe:
    """The probe thread and the controller it feeds; shared by a run's workers."""

    def __init__(self, budget_ms: float, site: ProbeSite,
                 rebudget: Callable[[float], float] | None = None) -> None:
        self.site = site
        self.control = RateControl(budget_ms)
        self.rebudget = rebudget
        """An ``auto`` budget's rule (the application's p99 alone -> the budget): a window alone
        over the budget makes it again instead of refusing the run."""
        self.measured_again_from: float | None = None
        """The budget before it was measured again (``rebudget``), if it was."""
        self.lock = threading.Lock()
        self.before: list[float] = []
        """Samples taken before the workers started: the application alone."""
        self.ready = threading.Event()
        """Set once the samples alone are taken (or the probe cannot take them)."""
        self.alone_over: float | None = None
        """The ``REFUSE_PERCENTILE`` of the last window alone, when it is over the budget."""
        self.samples: list[float] = []
        self.recent: deque[float] = deque(maxlen=LIVE_WINDOW)
        self.waits: Counter[str] = Counter()
        self.series = Series()
        self.errors = 0
        self.held_back_s = 0.0
        """Kept up to date by the throttle; written with every beat and at the end."""
        self.full_rate: float | None = None
        """The WAL rate the run's batches write while they work (the throttle measures it):
        the granted rate's share of it is how much the guard slows the run."""
        self.min_share = 1.0
        self.wal_rate: float | None = None
        self.charged = 0
        """Bytes the run's batches were charged (their WAL, or the pages they dirtied if more):
        the rate the run really used, beside the server's WAL, caps the grant's growth."""
        self.alone_writes_per_s: float | None = None
        """Buffers a second client backends wrote themselves while the probe timed the
        application alone: what they write beyond it (see ``EVICTING_*``) is the run's doing."""
        self._alone_from: ServerCounters | None = None
        self._charged_at_step = 0
        self._recent: deque[ServerCounters] = deque()
        """Counters of the last steps, back to ``EVICTING_WINDOW_S`` ago: the last is the latest."""
        self._first: ServerCounters | None = None
        self._steps = 0
        self._started_at = time.monotonic()
        self._stop = threading.Event()
        self._stopping = False
        self._inflight_since: float | None = None
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name=f"msggc-probe-{site.run_id}", daemon=True)

    @property
    def budget_ms(self) -> float:
        return self.control.budget_ms

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._thread.start()

    def wait_ready(self, timeout_s: float = BEFORE_WAIT_S) -> None:
        """Block until the application's latency alone is measured (the workers start after);
        refuse the run if the application is over the budget already."""
        self.ready.wait(timeout_s)
        with self.lock:
            self.ready.set()
            over, count = self.alone_over, len(self.before)
        if over is not None:
            raise BudgetCannotHold(
                f"the latency budget cannot hold: before msggc wrote anything, the application's"
                f" commits were over the budget of {self.budget_ms:g} ms at the {REFUSE_PERCENTILE}th"
                f" percentile in every window of {BEFORE_SAMPLES} of the {count} timed"
                f" ({over:.1f} ms in the last); nothing was deleted: raise the budget (at least twice"
                f" the application's p99 alone) or run when the server is quieter")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def rate(self, now: float | None = None) -> float:
        """The WAL rate the workers may write now (a stuck probe write counts as slow)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if self._inflight_since is not None:
                self.control.stalled((now - self._inflight_since) * 1000, now)
            return self.control.rate

    @property
    def decreases(self) -> int:
        return self.control.decreases

    def share(self) -> float:
        """The granted rate as a share of the run's full speed (1: not slowed)."""
        full = self.full_rate
        return 1.0 if not full else min(1.0, self.control.rate / full)

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the probe: a write in flight (held by a lock, say) is cancelled; the thread
        records the run's figures and closes its connection before this returns."""
        with self.lock:
            self._stopping = True
            busy = self._inflight_since is not None
            conn = self._conn
        self._stop.set()
        self.ready.set()
        if busy and conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    @property
    def _last(self) -> ServerCounters | None:
        return self._recent[-1] if self._recent else None

    def _checkpoints(self) -> int:
        if self._first is None or self._last is None:
            return 0
        return self._last.checkpoints_requested - self._first.checkpoints_requested

    def report(self) -> dict[str, Any]:
        """The run's figures, for its result."""
        with self.lock:
            first, last = self._first, self._last
            writes = (None if first is None or last is None or first.backend_writes is None
                      or last.backend_writes is None else last.backend_writes - first.backend_writes)
            return {"app_latency_budget_ms": self.control.budget_ms,
                    "app_latency_budget_measured_again_from_ms": self.measured_again_from,
                    "app_latency_p50_ms": percentile(self.samples, 50),
                    "app_latency_p99_ms": percentile(self.samples, 99),
                    "app_latency_before_p99_ms": percentile(self.before[-BEFORE_SAMPLES:], 99),
                    "app_probes": len(self.samples),
                    "app_waits": dict(self.waits),
                    "held_back_s": self.held_back_s,
                    "rate_share_min": self.min_share,
                    "rate_decreases": self.control.decreases,
                    "guard_futile_steps": self.control.futile,
                    "guard_rate_min_bytes_per_s": round(self.control.lowest),
                    "checkpoints_requested": self._checkpoints(),
                    "backend_writes": writes,
                    "guard_series": self.series.all()}

    # -- the probe thread ---------------------------------------------------------------------

    def _run(self) -> None:
        """Beat until stopped; a lost connection is made again (its outage counts as a stall)."""
        while not self._stop.is_set():
            try:
                self._session()
            except (psycopg.Error, MsggcError) as exc:
                if self._stop.is_set():
                    break
                self.errors += 1
                self.ready.set()  # the workers do not wait for a probe that cannot measure
                log.warning("run %s: latency probe: %s", self.site.run_id, str(exc).strip())
                self._stop.wait(RECONNECT_S)
        self._finish()

    def _session(self) -> None:
        conn = connect(self.site.dsn)
        with self.lock:
            self._conn = conn
        try:
            conn.execute("SELECT set_config('application_name', %s, false)", (PROBE_APPLICATION_NAME,))
            conn.execute("SET synchronous_commit = on")
            conn.execute("SET statement_timeout = 0")
            self._timed(conn, CLAIM_SQL, self.site.params)
            if self._alone_from is None:
                self._alone_from = read_counters(conn)
            due = time.monotonic()
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                due += PROBE_INTERVAL_S
                if not self._timed(conn, BEAT_SQL, self._beat_params()):
                    return
                self._sample_waits(conn)
                if self.ready.is_set() and self._first is None:
                    self._workers_start(read_counters(conn))
                elif self.ready.is_set() and len(self.control.pending) >= STEP_SAMPLES:
                    self._step(conn)
        finally:
            conn.close()

    def _timed(self, conn: Connection, query: str, params: dict[str, Any]) -> bool:
        """One probe write, timed from send to commit; False once the probe is stopping."""
        with self.lock:
            if self._stopping:
                return False
            began = self._inflight_since = time.monotonic()
        try:
            conn.execute(query, params)
        finally:  # a write cancelled at the end still counts: the application felt it that long
            ended = time.monotonic()
            latency_ms = (ended - began) * 1000
            with self.lock:
                self._inflight_since = None
                if not self.ready.is_set():
                    self.before.append(latency_ms)
                    if self._alone_judged():
                        self.ready.set()
                else:
                    self.samples.append(latency_ms)
                    self.recent.append(latency_ms)
                    self.control.observe(latency_ms)
                    self.min_share = min(self.min_share, self.share())
        return True

    def _alone_judged(self) -> bool:
        """Whether the workers may be told: a window of commits alone under the budget, or
        ``BEFORE_MAX_SAMPLES`` of them without one (``alone_over`` says so). Under the lock."""
        window = self.before[-BEFORE_SAMPLES:]
        if len(window) < BEFORE_SAMPLES:
            return False
        alone = percentile(window, REFUSE_PERCENTILE) or 0.0
        if alone > self.budget_ms and self.rebudget is not None:
            self.measured_again_from = self.budget_ms
            self.control.budget_ms = self.rebudget(percentile(window, 99) or alone)
            log.info("run %s: the application alone was over its auto latency budget of %g ms (p%d %.1f ms):"
                     " the budget is measured again from it, %g ms", self.site.run_id,
                     self.measured_again_from, REFUSE_PERCENTILE, alone, self.budget_ms)
        self.alone_over = alone if alone > self.budget_ms else None
        return self.alone_over is None or len(self.before) >= BEFORE_MAX_SAMPLES

    def charge(self, cost: int) -> None:
        """A batch's cost (see :meth:`engine.throttle.Throttle.batch_cost`)."""
        with self.lock:
            self.charged += cost

    def _workers_start(self, now: ServerCounters) -> None:
        """The counters as the workers start: the first step counts from here, and the backend
        writes since the probe's first commit are the application's own rate alone."""
        alone = self._alone_from
        with self.lock:
            self._first = now
            self._recent.append(now)
            self._charged_at_step = self.charged
            if (alone is not None and alone.backend_writes is not None and now.backend_writes is not None
                    and now.at > alone.at):
                self.alone_writes_per_s = (now.backend_writes - alone.backend_writes) / (now.at - alone.at)

    def _evicting(self, now: ServerCounters) -> float | None:
        """Buffers a second client backends wrote themselves over the last ``EVICTING_WINDOW_S``,
        when well beyond their rate alone (else None). Over a window, not a step: the server
        publishes backends' counts about once a second, so step by step they read 0, then 2x.
        ``now`` is the latest of ``_recent``."""
        while len(self._recent) > 2 and now.at - self._recent[1].at >= EVICTING_WINDOW_S:
            self._recent.popleft()
        then = self._recent[0]
        if now.backend_writes is None or then.backend_writes is None or now.at - then.at < EVICTING_WINDOW_S:
            return None
        rate = (now.backend_writes - then.backend_writes) / (now.at - then.at)
        alone = self.alone_writes_per_s or 0.0
        return rate if rate > max(EVICTING_FLOOR, EVICTING_GROWTH * alone) else None

    def _step(self, conn: Connection) -> None:
        """A control step: the server's counters since the last one, then the controller's
        judgement, then a point of the series."""
        now = read_counters(conn)
        with self.lock:
            last, first = self._last, self._first
            assert last is not None and first is not None  # set as the workers start
            self._recent.append(now)
            wal = used = None
            if now.at > last.at:  # the server's WAL, or the run's charge if more (dirtied pages)
                wal = max(0, now.lsn - last.lsn) / (now.at - last.at)
                used = max(wal, (self.charged - self._charged_at_step) / (now.at - last.at))
            self._charged_at_step = self.charged
            checkpoint = now.checkpoints_requested > last.checkpoints_requested
            self.wal_rate = wal
            p99 = self.control.step(now.at, used, checkpoint, self._evicting(now))
            self.min_share = min(self.min_share, self.share())
            self.series.add({
                "t_s": round(now.at - self._started_at, 2), "rate_bytes_per_s": round(self.control.rate),
                "p99_ms": round(p99, 2), "wal_bytes_per_s": None if wal is None else round(wal),
                "checkpoints_requested": now.checkpoints_requested - first.checkpoints_requested,
                "backend_writes": (None if now.backend_writes is None or first.backend_writes is None
                                   else now.backend_writes - first.backend_writes)})
            self._steps += 1
            live = self._steps % min(LIVE_SERIES_STEPS * self.series.stride, LIVE_SERIES_MAX_STEPS) == 0
            points = self.series.all() if live else None
        if points is not None:
            write_series(conn, self.site.run_id, points)

    def _sample_waits(self, conn: Connection) -> None:
        for event, count in conn.execute(WAITS_SQL, {"ours": f"{APPLICATION_NAME}%"}):
            with self.lock:
                self.waits[event] += count

    def _beat_params(self) -> dict[str, Any]:
        with self.lock:
            recent = list(self.recent)
            return {**self.site.params, "p50": percentile(recent, 50), "p99": percentile(recent, 99),
                    "held": self.held_back_s, "share": self.share(), "rate": self.control.rate,
                    "wal_rate": self.wal_rate, "checkpoints": self._checkpoints(),
                    "before_p99": percentile(self.before[-BEFORE_SAMPLES:], 99)}

    def _finish(self) -> None:
        """The run's final figures recorded (:func:`~engine.probe_record.record_final`)."""
        record_final(self.site, self.report(), self.share(), self.measured_again_from)
        with self.lock:
            self._conn = None
