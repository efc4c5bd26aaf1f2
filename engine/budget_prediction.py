"""A dry run's word on a latency budget: the application's commits timed alone and beside the
sample batches (:class:`CommitTimer`), and the rate and duration the guard would settle at, or
why the budget cannot hold (:func:`predict_under_budget`)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass

import psycopg

from engine.cleaning import CleaningPace
from engine.db import Connection, connect
from engine.guard import BEFORE_MAX_SAMPLES, BEFORE_SAMPLES, REFUSE_PERCENTILE
from engine.probe_record import CLAIM_SQL, PROBE_APPLICATION_NAME
from engine.rate_control import (
    INITIAL_RATE,
    MIN_RATE,
    PROBE_INTERVAL_S,
    ROOM,
    SLOW_START_GROWTH,
    STEP_SAMPLES,
    MiB,
    percentile,
)


class CommitTimer:
    """Probe commits on a thread of their own, every ``interval_s``, on a ``gc_probe`` row of
    their own (the dry run's, beside any run's): :meth:`take` hands over what they felt since
    the last take, so a dry run times the application's commits alone, then beside its samples."""

    def __init__(self, dsn: str, table: str, node: str, interval_s: float = 0.02) -> None:
        self.dsn = dsn
        self.site = {"table": table, "node": f"{node}\x1fdry-run", "run_id": None}
        self.interval_s = interval_s
        self._latencies: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="msggc-dry-run-probe", daemon=True)

    def __enter__(self) -> CommitTimer:
        self._conn = connect(self.dsn)
        self._conn.execute("SELECT set_config('application_name', %s, false)", (PROBE_APPLICATION_NAME,))
        self._conn.execute("SET synchronous_commit = on")
        self._conn.execute(CLAIM_SQL, self.site)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("DELETE FROM gc_probe WHERE table_name = %(table)s AND node = %(node)s",
                                   self.site)
            self._conn.close()

    def take(self) -> list[float]:
        with self._lock:
            taken, self._latencies = self._latencies, []
        return taken

    def _run(self) -> None:
        assert self._conn is not None
        with contextlib.suppress(psycopg.Error):
            while not self._stop.wait(self.interval_s):
                began = time.monotonic()
                self._conn.execute("UPDATE gc_probe SET beats = beats + 1, beat_at = now()"
                                   " WHERE table_name = %(table)s AND node = %(node)s", self.site)
                with self._lock:
                    self._latencies.append((time.monotonic() - began) * 1000)


@dataclass(frozen=True)
class BudgetPrediction:
    """A dry run's word on a latency budget: whether it can hold, at what WAL rate, how long."""

    verdict: str
    seconds: float | None
    rate: float | None
    alone_p99_ms: float | None


ALONE_S = 1.5
"""How long a dry run times the application's commits alone before its sample batches."""


def ramp_seconds(wal_bytes: float, rate: float) -> float:
    """Seconds to write ``wal_bytes`` from ``INITIAL_RATE`` doubled each control step (slow
    start) up to ``rate``, then at it."""
    step_s = STEP_SAMPLES * PROBE_INTERVAL_S
    elapsed, written, granted = 0.0, 0.0, min(INITIAL_RATE, rate)
    while written < wal_bytes:
        if granted >= rate:
            return elapsed + (wal_bytes - written) / rate
        span = min(step_s, (wal_bytes - written) / granted)
        written += granted * span
        elapsed += span
        granted = min(rate, granted * SLOW_START_GROWTH)
    return elapsed


def predict_under_budget(budget_ms: float, alone: list[float], during: list[float],
                         wal_bytes: int | None, seconds: float | None,
                         checkpoint: tuple[float, float] | None = None,
                         cleaning: CleaningPace | None = None) -> BudgetPrediction:
    """The rate the guard settles at, by a straight line from (0, the p99 alone) through (the
    samples' WAL rate, the p99 beside them) to the middle of the band the controller holds
    (between ``ROOM`` of the budget and the budget); the duration is the second alone, then the
    run's WAL written in slow start up to that rate (:func:`ramp_seconds`), or the unguarded
    prediction if that is longer. With ``checkpoint`` (the WAL between requested checkpoints
    and ``checkpoint_timeout``) and more WAL than that, the run is paced (from a fresh
    checkpoint) one timed cycle after another until its rest fits in one, then goes at the rate.
    With ``cleaning`` it takes at least that floor. A p99
    alone at or above the budget: the budget cannot hold, whatever msggc does."""
    p_alone, p_full = percentile(alone, 99), percentile(during, 99)
    if p_alone is None:
        return BudgetPrediction("unknown: the probe could not time a commit", None, None, None)
    if p_alone >= budget_ms:
        p_refuse = percentile(alone, REFUSE_PERCENTILE) or 0.0
        return BudgetPrediction(
            f"cannot hold: the application's commit p99 alone is {p_alone:.1f} ms over {len(alone)}"
            f" commits, at or above the budget ({budget_ms:g} ms) before msggc writes anything"
            + (f"; a run now would be refused: its {REFUSE_PERCENTILE}th percentile alone is"
               f" {p_refuse:.1f} ms (the run waits up to {BEFORE_MAX_SAMPLES * PROBE_INTERVAL_S:g} s"
               " for a calmer moment first)" if p_refuse > budget_ms else
               f"; the run would crawl at {MIN_RATE / 1024:.0f} kB/s of WAL and still not keep it"),
            None if not wal_bytes else wal_bytes / MIN_RATE, MIN_RATE, p_alone)
    if not wal_bytes or not seconds:
        return BudgetPrediction("holds by the probe; duration unknown (no sample batch finished)",
                                None, None, p_alone)
    full = wal_bytes / seconds
    target = budget_ms * (1 + ROOM) / 2
    rate = full if p_full is None or p_full <= target else full * (target - p_alone) / (p_full - p_alone)
    rate = max(MIN_RATE, rate)
    body = ramp_seconds(wal_bytes, rate)
    paced = ""
    if checkpoint is not None and wal_bytes > checkpoint[0]:
        between, timeout = checkpoint  # paced one cycle after another while the rest does not fit
        cycles = math.ceil(wal_bytes / between) - 1
        rest = wal_bytes - cycles * between
        body = cycles * timeout + rest / rate
        paced = (f"; paced to force no checkpoint: {cycles} x checkpoint_timeout ({timeout:g} s) at"
                 f" ~{between / timeout / MiB:.2f} MB/s, then the last {rest / MiB:.0f} MB")
    if cleaning is not None and (cleaning.floor_seconds or 0.0) > body:
        body, paced = cleaning.floor_seconds or 0.0, paced + cleaning.describe()
    predicted = BEFORE_SAMPLES * PROBE_INTERVAL_S + max(seconds, body)
    why = (f"the probe's p99 {p_full:.1f} ms beside full speed ({full / MiB:.1f} MB/s)"
           if p_full is not None else "no probe beside the samples")
    verdict = (f"may not hold: the budget is under twice the application's commit p99 alone"
               f" ({p_alone:.1f} ms); " if budget_ms < 2 * p_alone else "holds: ")
    return BudgetPrediction(f"{verdict}WAL at ~{rate / MiB:.2f} MB/s ({why}, {p_alone:.1f} ms alone){paced}",
                            predicted, rate, p_alone)
