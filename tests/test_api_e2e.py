"""End to end: ``msggc serve`` (and ``msggc worker``) as real subprocesses on real databases.

Covers what only a real process shows: the command line and config file, a SIGKILL mid-run and
a restart that resumes the run from its checkpoint, and the worker running in its own process.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from engine.service.nodes import Node
from engine.service.notify import SIGNATURE_HEADER, sign
from tests.api_support import (
    GC_PATH,
    TOKEN,
    cli_process,
    closed_port_dsn,
    gc_of,
    posted_bodies,
    runs_of,
)
from tests.data import fill, live_ids, surviving_ids
from tests.polling import wait_until

pytestmark = pytest.mark.slow

SECRET = "e2e-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def callback(httpserver):
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    return httpserver


def test_two_live_nodes_and_a_closed_port_get_a_mixed_answer_and_two_webhooks(
        conn, dsn, make_dsn, callback, tmp_path):
    second = make_dsn()
    fill(conn, [True] * 11 + [False] * 4)
    with psycopg.connect(second, autocommit=True) as other:
        fill(other, [True] * 5 + [False] * 2)
    dead = closed_port_dsn()
    config = {"nodes": {"wacore1": dsn, "wacore2": second, "wacore3": dead},
              "callback_url": callback.url_for("/gc"), "webhook_secret": SECRET, "poll_s": 0.2}
    with cli_process(tmp_path, "serve", config) as service:
        answer = httpx.put(service.url + GC_PATH, headers=AUTH)
        wait_until(lambda: len(posted_bodies(callback)) == 2, timeout_s=20)
        unauthorized = httpx.put(service.url + GC_PATH)

    print("PUT answer:", answer.text, *(request.get_data().decode() for request, _ in callback.log), sep="\n")
    assert (answer.status_code, unauthorized.status_code) == (200, 401)
    gc = gc_of(answer.json())
    assert list(gc) == ["wacore1", "wacore2", "wacore3"]
    assert gc["wacore1"] == gc["wacore2"] == {"status": "processing"}
    [error] = gc["wacore3"]["errors"]
    assert (error["code"], error["title"]) == (1014, "Internal error")
    assert error["details"].endswith(f"Please check if wacore3 is running: {Node('wacore3', dead).address}")
    webhooks = {gc_of(body)["node"]: gc_of(body) for body in posted_bodies(callback)}
    assert webhooks == {"wacore1": {"messages_deleted": 11, "node": "wacore1", "status": "complete"},
                        "wacore2": {"messages_deleted": 5, "node": "wacore2", "status": "complete"}}
    for request, _ in callback.log:
        assert request.headers[SIGNATURE_HEADER] == sign(request.get_data(), SECRET)


def test_a_service_killed_mid_run_resumes_it_after_restart_and_the_totals_are_exact(
        conn, dsn, callback, tmp_path):
    garbage = [i % 4 != 0 for i in range(4000)]
    fill(conn, garbage)
    config = {"dsn": dsn, "callback_url": callback.url_for("/gc"), "stale_after_s": 1, "poll_s": 0.2,
              "gc": {"strategy": "index", "batch_size": 100, "sleep": 0.1,
                     "max_app_latency_ms": "off"}}  # paced by its sleep alone, not by the load around
    with cli_process(tmp_path, "serve", config) as service:
        assert httpx.put(service.url + GC_PATH, headers=AUTH).status_code == 200
        wait_until(lambda: runs_of(dsn) and runs_of(dsn)[0]["batches"] >= 8)
        service.popen.kill()
        service.popen.wait()

    [killed] = runs_of(dsn)
    assert killed["status"] == "running"
    assert 0 < killed["messages_deleted"] < sum(garbage)
    assert not posted_bodies(callback)
    with cli_process(tmp_path, "serve", config) as service:
        wait_until(lambda: posted_bodies(callback), timeout_s=30)
        status = httpx.get(service.url + GC_PATH, headers=AUTH).json()

    [run] = runs_of(dsn)
    assert (run["id"], run["status"], run["messages_deleted"]) == (killed["id"], "complete", sum(garbage))
    assert surviving_ids(conn) == live_ids(garbage)
    assert [gc_of(body) for body in posted_bodies(callback)] == [
        {"messages_deleted": sum(garbage), "status": "complete"}]
    assert gc_of(status)["status"] == "complete"


def test_an_api_without_worker_and_a_separate_worker_process_complete_a_gc(conn, dsn, callback, tmp_path):
    fill(conn, [True] * 7 + [False])
    config = {"dsn": dsn, "callback_url": callback.url_for("/gc"), "poll_s": 0.2}
    with cli_process(tmp_path, "serve", config, "--no-worker") as service:
        assert httpx.put(service.url + GC_PATH, headers=AUTH).status_code == 200
        assert httpx.get(service.url + "/health").json()["worker"] == "disabled"
        assert runs_of(dsn)[0]["status"] == "queued"
        with cli_process(tmp_path, "worker", config):
            wait_until(lambda: posted_bodies(callback), timeout_s=20)

    assert [gc_of(body) for body in posted_bodies(callback)] == [
        {"messages_deleted": 7, "status": "complete"}]


def test_a_worker_with_every_collects_new_garbage_periodically(conn, dsn, callback, tmp_path):
    fill(conn, [True] * 5 + [False])
    config = {"dsn": dsn, "callback_url": callback.url_for("/gc"), "poll_s": 0.2}
    with cli_process(tmp_path, "worker", config, "--every", "2s"):
        _collects_new_garbage_again(conn, callback)


def test_a_service_with_a_cron_schedule_collects_on_time_and_shows_when(conn, dsn, callback, tmp_path):
    fill(conn, [True] * 5 + [False])
    config = {"dsn": dsn, "callback_url": callback.url_for("/gc"), "poll_s": 0.2, "cron": "*/2 * * * * *"}
    with cli_process(tmp_path, "serve", config) as service:
        health = httpx.get(service.url + "/health").json()
        assert health["schedule"] == "cron '*/2 * * * * *' (UTC)"
        next_at = datetime.fromisoformat(health["next_scheduled_gc"])
        assert next_at.second % 2 == 0 and next_at.microsecond == 0
        assert next_at - datetime.now(UTC) < timedelta(seconds=3)
        _collects_new_garbage_again(conn, callback)


def _collects_new_garbage_again(conn: psycopg.Connection, callback: Any) -> None:
    """Scheduled GCs, with no request: the first finds the 5 garbage rows, a later one the row
    processed since (GCs in between may find nothing)."""
    wait_until(lambda: len(posted_bodies(callback)) >= 1, timeout_s=20)
    conn.execute("UPDATE messages SET processed_at = now() WHERE processed_at IS NULL")
    wait_until(lambda: _deleted(callback) == 6, timeout_s=20)
    assert surviving_ids(conn) == []
    gcs = [gc_of(body) for body in posted_bodies(callback)]
    assert gcs[0] == {"messages_deleted": 5, "status": "complete"}
    assert {gc["status"] for gc in gcs} == {"complete"}


def _deleted(callback: Any) -> int:
    return sum(gc_of(body)["messages_deleted"] for body in posted_bodies(callback))
