"""The worker's queue: one claim per run, stale runs reclaimed, runs that cannot start reported."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from engine import baseline, runs
from engine.config import GcOptions
from engine.service import nodes, requests
from engine.service.api_models import LatestRun
from engine.service.settings import ServiceSettings
from engine.service.worker import Worker
from tests.api_support import gc_of, posted_bodies, runs_of
from tests.data import fill
from tests.polling import wait_until
from tests.support import run_cli


@pytest.fixture
def callback(httpserver):
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    return httpserver


def settings_for(dsn: str, callback) -> ServiceSettings:
    return ServiceSettings(nodes=nodes.single(dsn), defaults=GcOptions(max_seconds=60),
                           callback_url=callback.url_for("/gc"), poll_s=0.1, stale_after_s=30)


def test_a_run_claimed_by_one_worker_is_skipped_by_another_until_its_heartbeat_is_stale(dsn):
    with psycopg.connect(dsn, autocommit=True) as first, psycopg.connect(dsn, autocommit=True) as second:
        run_id = runs.enqueue(first, "messages", "", {})
        with first.transaction():
            assert runs.claim(first, "messages", "", 30)[0] == run_id
            assert runs.claim(second, "messages", "", 30) is None  # row locked: skipped
        assert runs.claim(second, "messages", "", 30) is None  # running, heartbeat fresh
        first.execute("UPDATE gc_runs SET heartbeat_at = now() - interval '31 seconds'")
        assert runs.claim(second, "messages", "", 30)[0] == run_id  # its worker died


def test_concurrent_puts_queue_one_run_and_the_others_join_it(dsn, conn):
    fill(conn, [True])
    settings = ServiceSettings(nodes=nodes.single(dsn), run_worker=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(lambda _: requests.request_gc(settings, {}), range(8))
        answers = [result[0].value for result in results]
    assert len({started.run_id for started in answers}) == 1
    assert sorted(started.joined for started in answers) == [False] + [True] * 7
    assert len(runs_of(dsn)) == 1


def test_two_workers_on_one_node_execute_a_queued_run_once(conn, dsn, callback):
    fill(conn, [True] * 40 + [False] * 10)
    settings = settings_for(dsn, callback)
    requests.request_gc(settings, {})
    workers = [Worker(settings), Worker(settings)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: posted_bodies(callback))
        wait_until(lambda: all(run["status"] == "complete" for run in runs_of(dsn)))
    finally:
        for worker in workers:
            worker.close()

    assert [(run["status"], run["messages_deleted"]) for run in runs_of(dsn)] == [("complete", 40)]
    only = {"messages_deleted": 40, "status": "complete"}
    assert [gc_of(body) for body in posted_bodies(callback)] == [only]


def test_a_queued_run_that_cannot_start_ends_failed_with_a_1014_webhook(conn, dsn, callback):
    settings = settings_for(dsn, callback)
    requests.request_gc(settings, {})
    conn.execute("DROP TABLE messages")
    worker = Worker(settings)
    worker.start()
    try:
        wait_until(lambda: posted_bodies(callback))
    finally:
        worker.close()

    gc = gc_of(posted_bodies(callback)[0])
    assert gc == {"messages_deleted": 0, "errors": [{"code": 1014, "details": gc["errors"][0]["details"]}],
                  "status": "failed"}
    assert "messages does not exist" in gc["errors"][0]["details"]
    assert runs_of(dsn)[0]["status"] == "failed"


def test_a_database_error_on_a_node_is_told_in_the_servers_words_without_its_statement(dsn):
    """The node's error names the problem (and the server's hint where it helps), never the
    ``LINE 1: ...`` echo of msggc's statement with its caret."""
    settings = ServiceSettings(nodes=nodes.build_nodes({"wacore1": dsn}), multiconnect=True)

    def task(node: nodes.Node) -> None:
        with psycopg.connect(node.dsn) as conn:
            conn.execute("SELECT 1 + 'x'::int")

    [result] = requests.on_every_node(settings, task)
    assert result.error == 'database error on wacore1: invalid input syntax for type integer: "x"'


LONG_ENOUGH_TO_PROBE = {"max_seconds": 60, "batch_size": 5, "sleep": 0.05}
"""About 0.7 s for 60 rows: the probe (every 0.1 s) takes samples."""


def run_options(dsn: str) -> list[tuple[str, dict, float | None, int | None]]:
    """Each run's status, recorded options and the probe's p99 and sample count over the run."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        query = "SELECT status, options, app_latency_p99_ms, app_probes FROM gc_runs ORDER BY id"
        return conn.execute(query).fetchall()


def run_to_completion(settings: ServiceSettings, dsn: str, callback, overrides: dict | None = None) -> None:
    requests.request_gc(settings, overrides or {})
    work_until_notified(settings, callback)


def work_until_notified(settings: ServiceSettings, callback, webhooks: int = 1) -> Worker:
    """A worker runs what is queued until the callback server has taken ``webhooks`` bodies."""
    worker = Worker(settings)
    worker.start()
    try:
        wait_until(lambda: len(posted_bodies(callback)) >= webhooks, timeout_s=40)
    finally:
        worker.close()
    return worker


def test_an_auto_budget_is_three_times_the_probes_p99_measured_before_the_run_and_is_recorded(conn, dsn,
                                                                                            callback):
    """The application's commits are made slow (a trigger sleeps 10 ms in every update of the probe's
    row), so the p99 measured before the run is known to be over 10 ms and the budget over the
    floor: it is three times that p99, recorded with the run, and the run's probe worked to it."""
    fill(conn, [True] * 300 + [False] * 100)
    conn.execute("CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS"
                 " $$BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END$$")
    conn.execute("CREATE TRIGGER slow_commit BEFORE UPDATE ON gc_probe"
                 " FOR EACH ROW EXECUTE FUNCTION slow_commit()")
    settings = dataclasses.replace(settings_for(dsn, callback), baseline_s=1.0,  # a run of about a second:
                                   defaults=GcOptions(max_seconds=60, batch_size=20, sleep=0.05))  # probed
    assert settings.app_latency == "auto"
    run_to_completion(settings, dsn, callback)

    [(status, options, p99, probes)] = run_options(dsn)
    measured = options["app_latency_baseline"]
    assert status == "complete" and options["app_latency_auto"] is True
    assert measured["samples"] >= 9 and measured["p99_ms"] >= 10.0
    assert options["max_app_latency_ms"] == measured["budget_ms"]
    assert measured["budget_ms"] == pytest.approx(3 * measured["p99_ms"], abs=0.01)
    assert probes > 0 and p99 >= 10.0  # the guard's probe ran during the run, against that budget
    assert [gc_of(body) for body in posted_bodies(callback)] == [{"messages_deleted": 300,
                                                                  "status": "complete"}]


@pytest.mark.parametrize(("p99_ms", "budget_ms"), [(0.4, baseline.AUTO_FLOOR_MS), (1.2, 5.0),
                                                  (4.0, 12.0), (15.96, 47.88)])
def test_an_auto_budget_is_three_times_the_p99_never_under_the_floor(p99_ms, budget_ms):
    """On an idle server a tiny commit takes well under a millisecond: 3x that would hold a run
    back for scheduler noise."""
    found = baseline.Baseline(p99_ms=p99_ms, p50_ms=p99_ms / 2, samples=20, seconds=2.0)
    assert found.budget_ms == pytest.approx(budget_ms)
    assert found.describe()["budget_ms"] == found.budget_ms


@pytest.mark.parametrize(("budget", "overrides", "recorded"), [
    (None, {}, None),  # off: full speed, no probe
    (40.0, {}, 40.0),  # a number from the config
    (None, {"max_app_latency_ms": 25}, 25.0),  # a number in the PUT, the service being off
])
def test_off_or_a_number_takes_no_measurement(conn, dsn, callback, budget, overrides, recorded):
    fill(conn, [True] * 60)
    settings = dataclasses.replace(settings_for(dsn, callback), auto_app_latency=False,
                                   defaults=GcOptions(max_app_latency_ms=budget, **LONG_ENOUGH_TO_PROBE))
    run_to_completion(settings, dsn, callback, overrides)
    [(status, options, _p99, probes)] = run_options(dsn)
    assert status == "complete"
    assert options["max_app_latency_ms"] == recorded
    assert "app_latency_baseline" not in options and "app_latency_auto" not in options
    assert bool(probes) is (recorded is not None)


def test_a_number_in_the_put_overrides_the_services_auto_budget(conn, dsn, callback):
    fill(conn, [True] * 60)
    settings = dataclasses.replace(settings_for(dsn, callback), defaults=GcOptions(**LONG_ENOUGH_TO_PROBE))
    run_to_completion(settings, dsn, callback, {"max_app_latency_ms": 25})
    [(status, options, _p99, probes)] = run_options(dsn)
    assert (status, options["max_app_latency_ms"], probes > 0) == ("complete", 25, True)
    assert "app_latency_baseline" not in options


def test_a_run_whose_table_another_gc_holds_waits_queued_without_its_connections(conn, dsn, callback):
    """``msggc gc`` from the command line holds the table: the service's run goes back to queued
    and its connections to the other nodes, then runs once the table is free."""
    fill(conn, [True] * 30)
    oid = conn.execute("SELECT 'messages'::regclass::oid").fetchone()[0]
    assert runs.try_lock_table(conn, oid)
    settings = dataclasses.replace(settings_for(dsn, callback), auto_app_latency=False)
    requests.request_gc(settings, {})
    worker = Worker(settings)
    worker.start()
    try:
        slots = settings.slots_of(settings.nodes[0])
        wait_until(lambda: slots.peak_gcs == 1 and slots.gcs_running == 0
                   and runs_of(dsn)[0]["status"] == "queued", what="the run handed back")
        assert not posted_bodies(callback)
        runs.unlock_table(conn, oid)
        wait_until(lambda: posted_bodies(callback), timeout_s=30)
    finally:
        worker.close()
    assert [gc_of(body) for body in posted_bodies(callback)] == [{"messages_deleted": 30,
                                                                  "status": "complete"}]


def test_the_get_and_status_show_the_number_an_auto_budget_resolved_to_and_the_p99_it_came_from(conn, dsn,
                                                                                                callback):
    fill(conn, [True] * 60)
    settings = dataclasses.replace(settings_for(dsn, callback), baseline_s=0.5,
                                   defaults=GcOptions(**LONG_ENOUGH_TO_PROBE))
    requests.request_gc(settings, {})
    [queued] = requests.read_status(settings)
    waiting = LatestRun.model_validate(queued.value).model_dump(mode="json")
    assert (waiting["status"], waiting["app_latency_auto"], waiting["app_latency_budget_ms"]) == (
        "queued", True, None)
    assert "auto (not measured yet)" in run_cli("status", "--dsn", dsn).stdout

    work_until_notified(settings, callback)
    [(_status, options, _p99, _probes)] = run_options(dsn)
    measured = options["app_latency_baseline"]
    [latest] = requests.read_status(settings)
    answer = LatestRun.model_validate(latest.value).model_dump(mode="json")
    assert (answer["status"], answer["app_latency_auto"]) == ("complete", True)
    assert answer["app_latency_budget_ms"] == measured["budget_ms"] == options["max_app_latency_ms"]
    assert answer["app_latency_baseline"]["p99_ms"] == measured["p99_ms"] > 0
    [listed] = json.loads(run_cli("status", "--dsn", dsn, "--json").stdout)
    assert listed["app_latency_budget_ms"] == measured["budget_ms"]
    assert listed["app_latency_baseline"] == measured
    shown = run_cli("status", "--dsn", dsn).stdout
    came_from = f"3x the p99 of {measured['p99_ms']:.2f} ms before the run"
    assert f"auto {measured['budget_ms']:g} ms ({came_from}" in shown


def test_the_get_shows_a_budget_set_as_a_number_as_it_is(conn, dsn, callback):
    settings = dataclasses.replace(settings_for(dsn, callback), auto_app_latency=False,
                                   defaults=GcOptions(max_app_latency_ms=40.0))
    requests.request_gc(settings, {})
    [queued] = requests.read_status(settings)
    answer = LatestRun.model_validate(queued.value).model_dump(mode="json")
    assert (answer["app_latency_budget_ms"], answer["app_latency_auto"], answer["app_latency_baseline"]) == (
        40.0, False, None)


def test_the_nodes_of_one_server_go_by_one_auto_baseline_measured_before_their_runs(conn, dsn, make_dsn,
                                                                                     callback):
    """Three databases of one server, one request: the probe is timed once, before any of their
    runs writes, and every run records that one measurement (not one timed beside the others)."""
    dsns = [dsn, make_dsn(), make_dsn()]
    for node_dsn in dsns:
        with psycopg.connect(node_dsn, autocommit=True) as node_conn:
            fill(node_conn, [True] * 60)
    node_set = nodes.build_nodes({f"wacore{i + 1}": node_dsn for i, node_dsn in enumerate(dsns)})
    settings = ServiceSettings(nodes=node_set, multiconnect=True, callback_url=callback.url_for("/gc"),
                               defaults=GcOptions(**LONG_ENOUGH_TO_PROBE), baseline_s=0.5, poll_s=0.1,
                               max_concurrent_gcs=3)
    requests.request_gc(settings, {})
    worker = work_until_notified(settings, callback, webhooks=3)

    recorded = {}
    for name, node_dsn in zip(("wacore1", "wacore2", "wacore3"), dsns, strict=True):
        [(status, options, _p99, probes)] = run_options(node_dsn)
        assert status == "complete" and probes > 0
        recorded[name] = options["app_latency_baseline"]
    assert worker.baselines.of(node_set[0].address).measurements == 1
    assert len({(r["measured_at"], r["p99_ms"], r["budget_ms"]) for r in recorded.values()}) == 1
    assert sorted(r["shared"] for r in recorded.values()) == [False, True, True]
    assert all(r["server"] == node_set[0].address and r["beside_runs"] == 0 for r in recorded.values())
