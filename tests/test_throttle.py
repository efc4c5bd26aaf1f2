"""Health-aware throttling against real servers: a WAL budget, a real streaming standby, VACUUM."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from engine import collect
from engine.config import GcOptions
from engine.migrate import upgrade
from engine.result import GcResult
from engine.throttle import REPLICA_LAG_SQL, WAL_BURST_S
from tests import standby
from tests.data import fill, live_ids, surviving_ids
from tests.polling import wait_until

MiB = 1024 * 1024


def wal_lsn(conn: psycopg.Connection[Any]) -> int:
    return conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint").fetchone()[0]


def replayed_lsn(standby_conn: psycopg.Connection[Any]) -> int:
    return standby_conn.execute("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint").fetchone()[0]


def run_batches(conn: psycopg.Connection[Any]) -> int | None:
    """Batches the latest run committed so far (None before it started)."""
    row = conn.execute("SELECT batches FROM gc_runs ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def wait_until_stalled(conn: psycopg.Connection[Any], quiet_s: float, timeout: float) -> int:
    """Block until the latest run's batch count stopped moving for ``quiet_s``; returns it."""
    last, since = run_batches(conn), time.monotonic()

    def stalled() -> bool:
        nonlocal last, since
        if (now := run_batches(conn)) != last:
            last, since = now, time.monotonic()
        return time.monotonic() - since >= quiet_s

    wait_until(stalled, timeout, f"the run to stall for {quiet_s:g}s", interval_s=0.05)
    assert last is not None, "the run never started"
    return last


class Background:
    """``collect`` in a thread, so a test can watch the run while it is throttled."""

    def __init__(self, dsn: str, options: GcOptions) -> None:
        self.result: GcResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(dsn, options), daemon=True)
        self.thread.start()

    def _run(self, dsn: str, options: GcOptions) -> None:
        try:
            self.result = collect(dsn, options)
        except BaseException as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float) -> GcResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"GC still running after {timeout:g}s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class WalWatch:
    """Server-wide WAL while a budgeted run goes on, sampled every ``STEP_S``.

    The budget is server-wide, so the measurement only means something when no other session
    writes WAL meanwhile (a test server shared with other runs may: a CREATE DATABASE on PG 15
    writes its whole template, 15-30 MB, to WAL). Runs here write a few MB in all, at most half
    a MB in a step even with the budget's burst; ``OTHERS`` in one step is someone else.
    """

    STEP_S = 0.25
    OTHERS = 4 * MiB

    def __init__(self, dsn: str, budget: float) -> None:
        self.dsn, self.budget = dsn, budget
        self.worst_step = 0
        self.done = threading.Event()
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.start_lsn, self.started = wal_lsn(self.conn), time.monotonic()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            last = wal_lsn(conn)
            while not self.done.wait(self.STEP_S):
                now = wal_lsn(conn)
                self.worst_step, last = max(self.worst_step, now - last), now

    def stop(self, result: GcResult) -> tuple[int, float]:
        """(bytes of WAL written, seconds) since the watch began; skips when others disturbed it."""
        written, elapsed = wal_lsn(self.conn) - self.start_lsn, time.monotonic() - self.started
        self.done.set()
        self.thread.join()
        self.conn.close()
        if self.worst_step > self.OTHERS:
            pytest.skip(f"another session wrote {self.worst_step / MiB:.1f} MB of WAL in {self.STEP_S:g}s"
                        " during the run: a server-wide WAL budget cannot be measured on a busy server")
        if result.status == "stopped" and written > self.budget * elapsed:
            pytest.skip(f"the server wrote {written / elapsed / MiB:.2f} MB/s of WAL, over the run's budget"
                        " by itself: other sessions held the run (as a server-wide budget must)")
        return written, elapsed


def assert_complete(conn: psycopg.Connection[Any], result: GcResult, garbage: list[bool]) -> None:
    assert result.status == "complete", result.error
    assert result.messages_deleted == sum(garbage)
    assert surviving_ids(conn) == live_ids(garbage)


# -- WAL rate --------------------------------------------------------------------------------------


def test_wal_budget_holds_the_runs_wal_rate_and_it_still_deletes_exactly_the_garbage(conn, dsn):
    garbage = [i % 2 == 0 for i in range(120_000)]
    fill(conn, garbage)
    budget = 1 * MiB

    watch = WalWatch(dsn, budget)
    result = collect(dsn, GcOptions(batch_size=1000, max_wal_rate=budget, max_seconds=15))
    written, elapsed = watch.stop(result)

    assert_complete(conn, result, garbage)
    assert written > 3 * MiB, "the run must write several MB of WAL for its rate to mean something"
    assert result.throttle_pauses > 0
    assert set(result.throttle_reasons) == {"wal_rate"}
    rate = written / elapsed
    print(f"\nWAL budget {budget / MiB:.2f} MB/s: wrote {written / MiB:.2f} MB in {elapsed:.2f}s"
          f" = {rate / MiB:.2f} MB/s; {result.throttle_pauses} pauses, {result.throttled_s:.2f}s throttled")
    assert rate <= 1.3 * budget
    assert rate >= 0.7 * budget, "over-throttled: the run waited far longer than its budget asks"


# -- VACUUM on the table ---------------------------------------------------------------------------


class SlowVacuum:
    """A manual VACUUM of ``messages`` slowed to a crawl by cost-based delay; ``cancel`` ends it."""

    def __init__(self, dsn: str, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(dsn,), daemon=True)
        self.thread.start()
        wait_until(lambda: self.pid is not None, 10, "VACUUM to show in pg_stat_progress_vacuum")

    def _run(self, dsn: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as vacuuming:
            vacuuming.execute("SET vacuum_cost_delay = '100ms'")
            vacuuming.execute("SET vacuum_cost_limit = 1")  # sleeps ~100ms after every page
            try:
                vacuuming.execute("VACUUM messages")
            except psycopg.errors.QueryCanceled as exc:
                self.error = exc

    @property
    def pid(self) -> int | None:
        row = self.conn.execute("SELECT pid FROM pg_stat_progress_vacuum"
                                " WHERE relid = 'messages'::regclass").fetchone()
        return row[0] if row else None

    def cancel(self) -> None:
        self.conn.execute("SELECT pg_cancel_backend(%s)", (self.pid,))
        self.thread.join(10)
        assert isinstance(self.error, psycopg.errors.QueryCanceled)


def test_run_waits_while_vacuum_works_on_the_table_and_completes_after_it_ends(conn, dsn):
    garbage = [i % 2 == 0 for i in range(20_000)]
    fill(conn, garbage)
    vacuum = SlowVacuum(dsn, conn)

    gc = Background(dsn, GcOptions(batch_size=500, pause_for_vacuum=True))
    wait_until(lambda: run_batches(conn) is not None, 10, "the run to start")
    time.sleep(2.0)
    assert gc.running
    assert run_batches(conn) == 0, "a batch ran while VACUUM was working on the table"

    vacuum.cancel()
    result = gc.join(30)

    assert_complete(conn, result, garbage)
    assert set(result.throttle_reasons) == {"vacuum"}  # autovacuum may add a pause of its own
    assert result.throttle_pauses >= 1
    assert result.throttled_s >= 2.0


def test_wal_budget_banks_no_credit_while_the_run_waits_for_vacuum(conn, dsn):
    """Held 3s by a VACUUM, a run must not then write 3s worth of WAL budget in one burst."""
    garbage = [i % 2 == 0 for i in range(60_000)]
    fill(conn, garbage)
    budget = MiB // 2
    vacuum = SlowVacuum(dsn, conn)
    gc = Background(dsn, GcOptions(batch_size=500, pause_for_vacuum=True, max_wal_rate=budget,
                                   max_seconds=15))
    wait_until(lambda: run_batches(conn) is not None, 10, "the run to start")
    time.sleep(3.0)

    vacuum.cancel()
    watch = WalWatch(dsn, budget)
    result = gc.join(25)
    written, elapsed = watch.stop(result)

    assert_complete(conn, result, garbage)
    assert set(result.throttle_reasons) == {"vacuum", "wal_rate"}
    paced_s = written / budget
    print(f"\nafter a 3s VACUUM hold: {written / MiB:.2f} MB of WAL in {elapsed:.2f}s"
          f" ({paced_s:.2f}s at the {budget / MiB:.2f} MB/s budget, {WAL_BURST_S:g}s burst allowed)")
    assert written > 1.5 * MiB
    # Only WAL_BURST_S of budget may be banked; the 3s of the hold would let it finish 3s early.
    assert elapsed >= paced_s - WAL_BURST_S - 0.3


# -- replica lag, against a real streaming standby -------------------------------------------------


@pytest.fixture(scope="module")
def replica() -> Iterator[standby.Replica]:
    """A dedicated embedded primary with a streaming standby, whatever server the session uses."""
    try:
        pair = standby.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run a streaming standby here: {exc}")
    try:
        upgrade(pair.primary_dsn)
        yield pair
    finally:
        standby.stop(pair)


def test_replica_lag_holds_the_run_while_standby_replay_is_paused_and_resumes_once_caught_up(replica):
    with psycopg.connect(replica.primary_dsn, autocommit=True) as primary, \
            psycopg.connect(replica.standby_dsn, autocommit=True) as replica_conn:
        garbage = [i % 2 == 0 for i in range(20_000)]
        fill(primary, garbage)
        filled = wal_lsn(primary)
        wait_until(lambda: replayed_lsn(replica_conn) >= filled, 10, "the standby to replay the fill")
        replica_conn.execute("SELECT pg_wal_replay_pause()")

        # Small paced batches: the run writes WAL for seconds, so the standby falls behind mid-run.
        gc = Background(replica.primary_dsn, GcOptions(batch_size=100, sleep=0.02,
                                                       max_replica_lag=timedelta(seconds=1)))
        frozen = wait_until_stalled(primary, quiet_s=1.0, timeout=20)
        seen_lag = primary.execute(REPLICA_LAG_SQL).fetchone()[0]
        time.sleep(2.0)
        assert gc.running
        assert run_batches(primary) == frozen, "a batch ran while the standby was more than 1s behind"
        assert 0 < frozen < sum(garbage) / 100, "the run should stall mid-way, when the standby fell behind"
        assert seen_lag > 1.0

        resumed = time.monotonic()
        replica_conn.execute("SELECT pg_wal_replay_resume()")
        wait_until(lambda: (run_batches(primary) or 0) > frozen, 30, "the run to go on after replay resumed")
        went_on_s = time.monotonic() - resumed
        result = gc.join(60)

        assert_complete(primary, result, garbage)
        assert result.throttle_reasons.get("replica_lag", 0) >= 1
        assert result.throttled_s >= 3.0
        print(f"\nreplica lag: stalled at batch {frozen} of {sum(garbage) // 100} with lag {seen_lag:.2f}s;"
              f" went on {went_on_s:.2f}s after replay resumed; {result.throttle_pauses} pauses,"
              f" {result.throttled_s:.1f}s throttled")
        # The standby reports its position as soon as it caught up, but replay_lag stays stale
        # until its next status reply (10s): the run must go on long before that.
        assert went_on_s < 5.0


# -- the latency guard's pace: no forced checkpoint ------------------------------------------


def guarded_throttle(dsn: str, rows_left: int) -> Any:
    """A guarded run's throttle (its probe not started), told that ``rows_left`` rows remain."""
    from engine.probe_record import ProbeSite
    from engine.throttle import Limits, Throttle

    throttle = Throttle(Limits(max_app_latency_ms=50), 0, ProbeSite(dsn, 1, "messages", ""))
    throttle._remaining_rows = rows_left  # as ``start`` would set it, without starting the probe
    return throttle


def test_the_guard_paces_a_run_whose_wal_would_force_a_checkpoint_and_not_one_that_fits(conn, dsn):
    """The pace comes from the server's own settings and last checkpoint: a run whose rest
    (rows left x WAL per row so far) exceeds the WAL before the next requested checkpoint is
    held to the headroom over the time to the timed one; a run that fits is not paced."""
    max_wal, completion, timeout = conn.execute(
        "SELECT pg_size_bytes(current_setting('max_wal_size')),"
        " current_setting('checkpoint_completion_target')::float8,"
        " extract(epoch FROM current_setting('checkpoint_timeout')::interval)::float8").fetchone()
    between = max_wal / (1 + completion)
    huge = guarded_throttle(dsn, rows_left=10**9)
    huge._rows, huge._own_wal = 1000, 300_000  # 300 B a row so far: 300 GB to come
    pace = huge.checkpoint_pace(conn)
    assert pace is not None
    assert 0 < pace <= max(between / 1.0, between / timeout)
    assert huge.guard_rate(conn) == (min(pace, huge.probe.rate()), "checkpoint_pace"
                                     if pace < huge.probe.rate() else "app_latency")
    small = guarded_throttle(dsn, rows_left=2000)
    small._rows, small._own_wal = 1000, 300_000  # 300 kB to come: fits the headroom...
    used = conn.execute("SELECT pg_current_wal_insert_lsn() - redo_lsn FROM pg_control_checkpoint()"
                        ).fetchone()[0]
    past_due = used > between - 2**20  # ...unless other sessions already wrote it all (a shared server)
    assert small.checkpoint_pace(conn) is None or past_due
    assert guarded_throttle(dsn, rows_left=10**9).checkpoint_pace(conn) is None  # no row yet
