"""The latency guard against a real server: its probe measures, stops with the run, and a slow
application (a lock really held on the probe's row) holds the run back without failing it."""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest

from engine import collect, guard, runs
from engine.collector import check
from engine.config import GcOptions
from engine.db import connect
from engine.guard import BEFORE_SAMPLES
from engine.planner import SAMPLE_BLOCKS, take_sample
from engine.probe_record import PROBE_APPLICATION_NAME, ProbeSite
from engine.rate_control import MIN_RATE
from engine.result import Progress
from engine.throttle import BLOCK_BYTES, FIRST_BATCH_ROWS, Limits, Throttle
from tests.data import fill, live_ids, surviving_ids
from tests.polling import wait_until
from tests.support import run_cli

PROBE_BLOCKED_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE application_name = %s AND wait_event_type = 'Lock' AND datname = current_database()
  AND clock_timestamp() - query_start > interval '100 milliseconds'
"""


def probe_backends(conn: psycopg.Connection[Any]) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                        " AND datname = current_database()",  # other tests' runs may probe too
                        (PROBE_APPLICATION_NAME,)).fetchone()[0]


def blocked_probes(conn: psycopg.Connection[Any]) -> int:
    """Probe writes waiting on a lock for longer than the test's budget."""
    return conn.execute(PROBE_BLOCKED_SQL, (PROBE_APPLICATION_NAME,)).fetchone()[0]


def run_figures(conn: psycopg.Connection[Any], run_id: int) -> tuple[Any, ...]:
    return conn.execute("SELECT app_latency_p50_ms, app_latency_p99_ms, app_probes, held_back_seconds"
                        " FROM gc_runs WHERE id = %s", (run_id,)).fetchone()


def test_the_probe_records_commit_latencies_and_its_connection_closes_with_the_run(conn, dsn):
    garbage = [i % 2 == 0 for i in range(400)]
    fill(conn, garbage)
    result = collect(dsn, GcOptions(max_app_latency_ms=10_000, batch_size=10, sleep=0.05))
    assert result.status == "complete"
    assert surviving_ids(conn) == live_ids(garbage)
    assert result.app_latency_budget_ms == 10_000
    assert result.app_probes >= 1
    assert 0 < result.app_latency_p50_ms <= result.app_latency_p99_ms
    assert run_figures(conn, result.run_id) == (pytest.approx(result.app_latency_p50_ms),
                                                pytest.approx(result.app_latency_p99_ms),
                                                result.app_probes, pytest.approx(result.held_back_s))
    beats, run_id = conn.execute("SELECT beats, run_id FROM gc_probe WHERE table_name = 'messages'"
                                 ).fetchone()
    # the first write claims the row; the first BEFORE_SAMPLES time the application alone
    assert (beats, run_id) == (result.app_probes + BEFORE_SAMPLES - 1, result.run_id)
    wait_until(lambda: probe_backends(conn) == 0, what="the probe's backend to exit")


def test_a_run_without_a_budget_starts_no_probe(conn, dsn):
    fill(conn, [True] * 50)
    result = collect(dsn, GcOptions(batch_size=10))
    assert (result.status, result.app_latency_budget_ms, result.app_probes) == ("complete", None, 0)
    assert conn.execute("SELECT count(*) FROM gc_probe").fetchone()[0] == 0


def test_a_probe_held_by_a_lock_holds_the_run_back_and_the_run_still_completes(conn, dsn):
    garbage = [i % 3 != 0 for i in range(600)]
    fill(conn, garbage)
    conn.execute("INSERT INTO gc_probe (table_name, node) VALUES ('messages', '')")
    with psycopg.connect(dsn) as holder:  # the application, holding the probe's row in a long transaction
        holder.execute("SELECT * FROM gc_probe WHERE table_name = 'messages' FOR UPDATE")
        watcher = psycopg.connect(dsn, autocommit=True)

        def wait_for_a_stuck_probe(progress: Progress) -> None:
            """After the first batch: the probe's write has waited on the lock past the budget."""
            if progress.batches == 1:
                wait_until(lambda: blocked_probes(watcher), what="the probe to wait on the held row")

        try:
            result = collect(dsn, GcOptions(max_app_latency_ms=20, batch_size=10),
                             on_progress=wait_for_a_stuck_probe)
        finally:
            watcher.close()
        holder.rollback()
    assert result.status == "complete"
    assert surviving_ids(conn) == live_ids(garbage)
    assert result.held_back_s > 0
    assert result.throttle_reasons.get("app_latency", 0) >= 1
    assert result.throttled_s >= result.held_back_s
    assert result.rate_share_min < 1
    assert result.app_latency_p99_ms > 20  # the write the lock held, cancelled when the run ended
    assert run_figures(conn, result.run_id)[3] == pytest.approx(result.held_back_s)
    wait_until(lambda: probe_backends(conn) == 0, what="the probe's backend to exit")


def test_gc_summary_and_status_show_the_probe_latency_and_time_held_back(conn, dsn):
    fill(conn, [True] * 200)
    proc = run_cli("gc", "--dsn", dsn, "--max-app-latency", "10s", "--batch-size", "10", "--sleep", "0.05")
    assert proc.returncode == 0, proc.stderr
    assert "app commit latency p99" in proc.stdout and " ms before the run, p50 " in proc.stdout
    assert "(budget 10000 ms), held back 0.0s" in proc.stdout
    status = run_cli("status", "--dsn", dsn, "--json")
    latest = json.loads(status.stdout)[0]
    assert latest["app_latency_p99_ms"] > 0 and latest["held_back_seconds"] == 0
    table = run_cli("status", "--dsn", dsn)
    assert "app p50/p99, held back" in table.stdout


@pytest.mark.parametrize("value", ["abc", "0ms", "-5ms", "0"])
def test_a_bad_latency_budget_is_a_one_line_usage_error_that_changes_nothing(conn, dsn, value):
    fill(conn, [True] * 20)
    proc = run_cli("gc", "--dsn", dsn, f"--max-app-latency={value}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "invalid latency" in proc.stderr
    assert len(surviving_ids(conn)) == 20


def test_the_guards_series_and_the_p99_before_the_run_reach_json_gc_runs_and_status(conn, dsn):
    fill(conn, [i % 4 != 0 for i in range(2000)])
    proc = run_cli("gc", "--dsn", dsn, "--max-app-latency", "10s", "--batch-size", "20", "--sleep", "0.02",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["app_latency_before_p99_ms"] > 0
    series = result["guard_series"]
    assert series, "a run of a few seconds takes several control steps"
    assert set(series[0]) == {"t_s", "rate_bytes_per_s", "p99_ms", "wal_bytes_per_s",
                              "checkpoints_requested", "backend_writes"}
    assert [p["t_s"] for p in series] == sorted(p["t_s"] for p in series)
    assert all(p["rate_bytes_per_s"] >= MIN_RATE for p in series)
    stored, before = conn.execute("SELECT guard_series, app_latency_before_p99_ms FROM gc_runs WHERE id = %s",
                                  (result["run_id"],)).fetchone()
    assert stored == series and before == pytest.approx(result["app_latency_before_p99_ms"])
    latest = json.loads(run_cli("status", "--dsn", dsn, "--json").stdout)[0]
    assert latest["guard_series"] == series
    assert "before, " in run_cli("status", "--dsn", dsn).stdout


def test_a_guarded_run_starts_with_small_batches_bounded_by_its_wal(conn, dsn):
    """``--batch-size 5000`` alone deletes 5,000 rows a batch; under a guard the first batch takes
    ``FIRST_BATCH_ROWS`` and the next ones grow only as far as the WAL bound lets them."""
    fill(conn, [True] * 6000)
    sizes: list[int] = []

    def batch_rows(progress: Progress) -> None:
        sizes.append(progress.deleted - sum(sizes))

    result = collect(dsn, GcOptions(max_app_latency_ms=10_000, batch_size=5000), on_progress=batch_rows)
    assert result.status == "complete" and result.messages_deleted == 6000
    assert sizes[0] <= FIRST_BATCH_ROWS
    assert len(sizes) > 2, sizes
    assert max(sizes[:2]) < 5000


@pytest.mark.parametrize(("every", "per_page"), [(100, (1.0, 1.0)), (2, (5.0, 30.0))])
def test_the_plans_sample_says_how_many_garbage_rows_a_dirtied_page_holds(conn, dsn, every, per_page):
    """One garbage row in a hundred: each deleted row dirties a page of its own; one in two:
    a page holds a dozen of them (about 30 rows of this table a page)."""
    fill(conn, [i % every == 0 for i in range(20_000)])
    with connect(dsn) as engine_conn:
        _table, statements = check(engine_conn, GcOptions()).legs[None]
        sample = take_sample(engine_conn, statements, SAMPLE_BLOCKS, None)
    assert sample.garbage_per_block is not None
    assert per_page[0] <= sample.garbage_per_block <= per_page[1]


def test_a_guarded_batch_is_charged_the_pages_it_dirtied_when_they_cost_more_than_its_wal(conn, dsn):
    """A sparse delete writes ~100 bytes of WAL a row but dirties an 8 kB page for it: the
    guard's bucket and the next batch's bound take the larger of the two."""
    throttle = Throttle(Limits(max_app_latency_ms=50), 0, ProbeSite(dsn, 1, "messages", ""))
    assert throttle.probe is not None
    worker = threading.get_ident()
    throttle._batch_lsn[worker] = throttle._wal_lsn(conn)  # as wait() marks a batch's start
    sparse = throttle.batch_cost(conn, 100, garbage_per_block=1.0)
    assert sparse is not None and sparse >= 100 * BLOCK_BYTES
    throttle._batch_lsn[worker] = throttle._wal_lsn(conn)
    dense = throttle.batch_cost(conn, 100, garbage_per_block=100.0)
    assert dense is not None and dense >= BLOCK_BYTES  # one page at least (or the server's WAL meanwhile)
    assert throttle.probe.charged == sparse + dense


def test_a_dry_run_says_a_budget_below_the_applications_p99_alone_cannot_hold(conn, dsn):
    fill(conn, [True] * 500)
    proc = run_cli("gc", "--dsn", dsn, "--dry-run", "--max-app-latency", "0.001ms")
    assert proc.returncode == 0, proc.stderr
    assert "budget 0.001 ms:" in proc.stdout
    assert "cannot hold: the application's commit p99 alone is" in proc.stdout
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 500  # nothing deleted
    assert conn.execute("SELECT count(*) FROM gc_probe").fetchone()[0] == 0  # its probe row is gone


def test_a_dry_run_with_a_budget_predicts_the_duration_under_it(conn, dsn):
    fill(conn, [i % 2 == 0 for i in range(4000)])
    result = collect(dsn, GcOptions(dry_run=True, max_app_latency_ms=10_000))
    assert result.status == "dry-run"
    assert result.budget_verdict is not None and result.budget_verdict.startswith("holds: WAL at ~")
    assert result.app_latency_before_p99_ms is not None and result.app_latency_before_p99_ms > 0
    assert result.predicted_guarded_seconds is not None
    assert result.predicted_guarded_seconds >= result.predicted_seconds
    assert result.predicted_guarded_wal_rate is not None and result.predicted_guarded_wal_rate > 0


def test_the_api_and_metrics_show_the_guards_series_rate_and_p99_before(conn, dsn):
    from engine.service import nodes
    from engine.service.api_models import LatestRun
    from engine.service.metrics import Metrics
    from engine.service.settings import ServiceSettings

    fill(conn, [True] * 1500)
    result = collect(dsn, GcOptions(max_app_latency_ms=10_000, batch_size=20, sleep=0.02))
    answer = LatestRun.model_validate(runs.latest(conn, "messages", "")).model_dump(mode="json")
    assert answer["guard_series"] == result.guard_series and answer["guard_series"]
    assert answer["app_latency_before_p99_ms"] == pytest.approx(result.app_latency_before_p99_ms)
    settings = ServiceSettings(nodes=nodes.single(dsn), defaults=GcOptions(), callback_url=None)
    scraped = Metrics(settings).render().decode()
    assert 'msggc_guard_wal_bytes_per_second{kind="granted",node="postgresql"}' in scraped
    assert 'msggc_guard_checkpoints_requested{node="postgresql"}' in scraped
    assert 'msggc_app_latency_before_ms{node="postgresql"}' in scraped


def test_the_guards_series_is_live_in_gc_runs_status_the_api_and_metrics_while_the_run_goes(conn, dsn):
    """Every few control steps the probe writes the series so far into the run's row: a run still
    going shows it in ``msggc status``, the API's GET and ``/metrics``, before it ends."""
    import threading

    from engine.service import nodes
    from engine.service.api_models import LatestRun
    from engine.service.metrics import Metrics
    from engine.service.settings import ServiceSettings

    fill(conn, [True] * 5000)
    stop = threading.Event()
    results = []
    going = threading.Thread(target=lambda: results.append(collect(
        dsn, GcOptions(max_app_latency_ms=10_000, batch_size=10, sleep=0.05), stop=stop)))
    going.start()
    try:
        def live() -> dict[str, Any] | None:
            row = runs.latest(conn, "messages", "")
            return row if row and row["status"] == "running" and row["guard_series"] else None

        row = wait_until(live, timeout_s=20, what="a live series in gc_runs")
        answer = LatestRun.model_validate(row).model_dump(mode="json")
        assert answer["status"] == "running" and len(answer["guard_series"]) >= guard.LIVE_SERIES_STEPS
        assert set(answer["guard_series"][-1]) == {"t_s", "rate_bytes_per_s", "p99_ms", "wal_bytes_per_s",
                                                   "checkpoints_requested", "backend_writes"}
        listed = json.loads(run_cli("status", "--dsn", dsn, "--json").stdout)[0]
        assert listed["status"] == "running" and len(listed["guard_series"]) >= len(answer["guard_series"])
        settings = ServiceSettings(nodes=nodes.single(dsn), defaults=GcOptions(), callback_url=None)
        scraped = Metrics(settings).render().decode()
        assert 'msggc_guard_backend_writes{node="postgresql"}' in scraped
        assert conn.execute("SELECT count(*) FROM gc_runs WHERE finished_at IS NULL").fetchone()[0] == 1
    finally:
        stop.set()
        going.join(30)
    [result] = results
    assert result.status == "stopped" and result.guard_series
    assert runs.latest(conn, "messages", "")["guard_series"] == result.guard_series


def test_a_budget_the_application_is_over_before_the_run_refuses_it_and_deletes_nothing(conn, dsn):
    """10 microseconds: no commit of this server's is that fast, so every window of the
    commits timed alone is over it; the run waits ~10 s for a calmer one, then fails in one
    line saying why, with every row still there."""
    garbage = [True] * 200
    fill(conn, garbage)
    result = collect(dsn, GcOptions(max_app_latency_ms=0.01, batch_size=10))
    assert (result.status, result.messages_deleted) == ("failed", 0)
    assert "the latency budget cannot hold" in result.error and "nothing was deleted" in result.error
    assert "\n" not in result.error
    assert len(surviving_ids(conn)) == len(garbage)
    wait_until(lambda: probe_backends(conn) == 0, what="the probe's backend to exit")


def test_an_auto_budget_the_application_is_over_before_the_run_is_measured_again_and_the_run_completes(
        conn, dsn):
    """The same 10 microseconds, as an ``auto`` budget measured a moment before (the service's
    schedule): the application alone is slower than when it was measured, so the budget is made
    again from the commits just timed (3x their p99), the run completes, and its record says so."""
    fill(conn, [True] * 200)
    result = collect(dsn, GcOptions(max_app_latency_ms=0.01, latency_budget_auto=True, batch_size=10))
    assert (result.status, result.messages_deleted) == ("complete", 200)
    assert result.app_latency_budget_measured_again_from_ms == 0.01
    assert result.app_latency_budget_ms is not None and result.app_latency_budget_ms >= 5.0

    recorded = runs.latest(conn, "messages", "")
    assert recorded["app_latency_budget_ms"] == result.app_latency_budget_ms
