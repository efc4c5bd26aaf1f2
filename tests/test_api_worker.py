"""The worker's queue: one claim per run, stale runs reclaimed, runs that cannot start reported."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from engine import runs
from engine.config import GcOptions
from engine.service import nodes, requests
from engine.service.settings import ServiceSettings
from engine.service.worker import Worker
from tests.api_support import gc_of, posted_bodies, runs_of
from tests.data import fill
from tests.polling import wait_until


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
