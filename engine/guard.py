"""The latency guard: a run gives way to the application by measurement, not by guess.

A probe on its own connection and thread commits a one-row update of msggc's ``gc_probe`` row
every ``PROBE_INTERVAL_S`` with ``synchronous_commit = on``: the round trip of a tiny write
that waits for its WAL flush is what an application's commit feels beside the GC. After each
write it samples ``pg_stat_activity`` for other backends (not msggc's) waiting on a WAL flush
or a lock, reported beside the latencies as evidence of what the latencies come from.

An additive-increase/multiplicative-decrease controller turns the probe's recent p99 into the
share of wall time the run's workers may spend in batches: halved when the p99 passes the
budget, raised by ``AIMD_INCREASE`` when it stays under ``ROOM`` of it. The throttle makes each
worker pause after a batch so that its batches take no more than that share of its time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import psycopg

from engine.db import APPLICATION_NAME, Connection, connect
from engine.errors import MsggcError, SchemaMissing

PROBE_INTERVAL_S = 0.1
PROBE_APPLICATION_NAME = f"{APPLICATION_NAME}-probe"
STEP_SAMPLES = 5
"""Probe samples per control step: the controller judges each ~0.5 s of fresh samples once,
so one slow commit halves the rate once, not once per step it stays in a sliding window."""
AIMD_DECREASE = 0.5
AIMD_INCREASE = 0.1
MIN_SHARE = 0.05
"""The run never stops outright: at worst a worker pauses 19 times as long as its batch took,
so an impossible budget still lets the run finish (slowly)."""
ROOM = 0.8
"""The rate goes up only while the recent p99 is under this share of the budget."""
LIVE_WINDOW = 600
"""Samples behind the live p50/p99 written to ``gc_probe`` with every beat (about a minute)."""
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

CLAIM_SQL = """
INSERT INTO gc_probe (table_name, node, run_id, beats, beat_at)
VALUES (%(table)s, %(node)s, %(run_id)s, 0, now())
ON CONFLICT (table_name, node) DO UPDATE
SET run_id = excluded.run_id, beats = 0, beat_at = now(), p50_ms = NULL, p99_ms = NULL,
    held_back_seconds = 0, rate_share = 1
"""
BEAT_SQL = """
UPDATE gc_probe SET beats = beats + 1, beat_at = now(), p50_ms = %(p50)s, p99_ms = %(p99)s,
    held_back_seconds = %(held)s, rate_share = %(share)s
WHERE table_name = %(table)s AND node = %(node)s
"""
FINAL_SQL = """
UPDATE gc_probe SET p50_ms = %(p50)s, p99_ms = %(p99)s, held_back_seconds = %(held)s, rate_share = %(share)s
WHERE table_name = %(table)s AND node = %(node)s AND run_id = %(run_id)s
"""
"""The run's figures over all its samples, left in the row once it ended (not a beat)."""
RUN_SQL = """
UPDATE gc_runs SET app_latency_p50_ms = %(p50)s, app_latency_p99_ms = %(p99)s,
    app_probes = %(probes)s, held_back_seconds = %(held)s
WHERE id = %(run_id)s
"""

log = logging.getLogger("msggc.guard")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: with few samples the p99 is the worst one, as it should be."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Aimd:
    """Additive-increase/multiplicative-decrease of the share of time the run may work.

    Pure logic, fed the probe's samples with the time they were taken (tests give their own).
    """

    budget_ms: float
    share: float = 1.0
    pending: list[float] = field(default_factory=list)
    """Samples since the last step."""
    last_step_at: float | None = None
    decreases: int = 0
    increases: int = 0

    def observe(self, latency_ms: float, now: float) -> None:
        """One probe sample; every ``STEP_SAMPLES`` of them make one step."""
        self.pending.append(latency_ms)
        if len(self.pending) >= STEP_SAMPLES:
            p99 = percentile(self.pending, 99) or 0.0
            if p99 > self.budget_ms:
                self._decrease(now)
            elif p99 <= self.budget_ms * ROOM:
                self._increase(now)
            else:
                self._stepped(now)

    def stalled(self, waiting_ms: float, now: float) -> None:
        """A probe write still in flight after more than the budget is a sample over it already:
        the controller must not wait for it to finish (a lock may hold it for seconds)."""
        step_s = STEP_SAMPLES * PROBE_INTERVAL_S
        if waiting_ms > self.budget_ms and (self.last_step_at is None or now - self.last_step_at >= step_s):
            self._decrease(now)

    def pause_after(self, worked_s: float) -> float:
        """Seconds a worker pauses after working ``worked_s`` so work takes ``share`` of its time."""
        return max(0.0, worked_s) * (1.0 - self.share) / self.share

    def _decrease(self, now: float) -> None:
        self.share = max(MIN_SHARE, self.share * AIMD_DECREASE)
        self.decreases += 1
        self._stepped(now)

    def _increase(self, now: float) -> None:
        if self.share < 1.0:
            self.increases += 1
        self.share = min(1.0, self.share + AIMD_INCREASE)
        self._stepped(now)

    def _stepped(self, now: float) -> None:
        self.pending.clear()
        self.last_step_at = now


@dataclass(frozen=True)
class ProbeSite:
    """Where a run's probe writes: its ``gc_probe`` row (one per table and node) and its run."""

    dsn: str
    run_id: int
    table: str
    node: str

    @property
    def params(self) -> dict[str, Any]:
        return {"table": self.table, "node": self.node, "run_id": self.run_id}


def require_probe_table(conn: Connection) -> None:
    """``--max-app-latency`` needs migration 0008's ``gc_probe``: refused before the run exists."""
    row = conn.execute("SELECT to_regclass('gc_probe') IS NOT NULL").fetchone()
    if not row or not row[0]:
        raise SchemaMissing("--max-app-latency needs msggc's gc_probe table: run `msggc migrate` first")


class Probe:
    """The probe thread and the controller it feeds; shared by a run's workers."""

    def __init__(self, budget_ms: float, site: ProbeSite) -> None:
        self.site = site
        self.aimd = Aimd(budget_ms)
        self.lock = threading.Lock()
        self.samples: list[float] = []
        self.recent: deque[float] = deque(maxlen=LIVE_WINDOW)
        self.waits: Counter[str] = Counter()
        self.errors = 0
        self.held_back_s = 0.0
        """Kept up to date by the throttle; written with every beat and at the end."""
        self.min_share = 1.0
        self._stop = threading.Event()
        self._stopping = False
        self._inflight_since: float | None = None
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name=f"msggc-probe-{site.run_id}", daemon=True)

    @property
    def budget_ms(self) -> float:
        return self.aimd.budget_ms

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def share(self, now: float | None = None) -> float:
        """The share of time the workers may work now (a stuck probe write counts as slow)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if self._inflight_since is not None:
                self.aimd.stalled((now - self._inflight_since) * 1000, now)
                self.min_share = min(self.min_share, self.aimd.share)
            return self.aimd.share

    def pause_after(self, worked_s: float) -> float:
        self.share()
        with self.lock:
            return self.aimd.pause_after(worked_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the probe: a write in flight (held by a lock, say) is cancelled; the thread
        records the run's figures and closes its connection before this returns."""
        with self.lock:
            self._stopping = True
            busy = self._inflight_since is not None
            conn = self._conn
        self._stop.set()
        if busy and conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    def report(self) -> dict[str, Any]:
        """The run's figures, for its result."""
        with self.lock:
            return {"app_latency_budget_ms": self.aimd.budget_ms,
                    "app_latency_p50_ms": percentile(self.samples, 50),
                    "app_latency_p99_ms": percentile(self.samples, 99),
                    "app_probes": len(self.samples),
                    "app_waits": dict(self.waits),
                    "held_back_s": self.held_back_s,
                    "rate_share_min": self.min_share,
                    "rate_decreases": self.aimd.decreases}

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
            due = time.monotonic()
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                due += PROBE_INTERVAL_S
                if not self._timed(conn, BEAT_SQL, self._beat_params()):
                    return
                self._sample_waits(conn)
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
                self.samples.append(latency_ms)
                self.recent.append(latency_ms)
                self.aimd.observe(latency_ms, ended)
                self.min_share = min(self.min_share, self.aimd.share)
        return True

    def _sample_waits(self, conn: Connection) -> None:
        for event, count in conn.execute(WAITS_SQL, {"ours": f"{APPLICATION_NAME}%"}):
            with self.lock:
                self.waits[event] += count

    def _beat_params(self) -> dict[str, Any]:
        with self.lock:
            recent = list(self.recent)
            return {**self.site.params, "p50": percentile(recent, 50), "p99": percentile(recent, 99),
                    "held": self.held_back_s, "share": self.aimd.share}

    def _finish(self) -> None:
        """The run's final figures in ``gc_runs`` and ``gc_probe``, each committed alone on a
        connection of its own (the probe's may be the one a cancel just hit), never waiting long
        on a lock: a failure loses only the record, never holds up the run's close."""
        figures = self.report()
        params = {**self.site.params, "p50": figures["app_latency_p50_ms"],
                  "p99": figures["app_latency_p99_ms"], "probes": figures["app_probes"],
                  "held": figures["held_back_s"], "share": self.aimd.share}
        try:
            with connect(self.site.dsn) as conn:
                conn.execute("SELECT set_config('application_name', %s, false)", (PROBE_APPLICATION_NAME,))
                conn.execute("SET lock_timeout = '200ms'")  # the row the application may hold: skipped
                conn.execute(RUN_SQL, params)
                with contextlib.suppress(psycopg.errors.LockNotAvailable):
                    conn.execute(FINAL_SQL, params)
        except (psycopg.Error, MsggcError) as exc:
            log.warning("run %s: latency probe figures not recorded: %s", self.site.run_id, str(exc).strip())
        with self.lock:
            self._conn = None


def latest_figures(conn: Connection, table: str, node: str) -> dict[str, Any] | None:
    """The probe row of this table and node: the live (or last run's final) latency figures;
    None before any guarded run, or on a schema older than the probe's."""
    row = conn.execute("SELECT to_regclass('gc_probe') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    cur = conn.execute(
        "SELECT run_id, beats, p50_ms, p99_ms, held_back_seconds, rate_share FROM gc_probe"
        " WHERE table_name = %s AND node = %s",
        (table, node),
    )
    found = cur.fetchone()
    if found is None:
        return None
    return dict(zip([c.name for c in cur.description or []], found, strict=True))
