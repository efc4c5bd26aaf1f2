"""Completion webhooks survive a callback server that is down or failing: delivered once, later."""

from __future__ import annotations

import time

import httpx
import psycopg
from pytest_httpserver import HTTPServer

from engine.config import GcOptions
from engine.service import nodes
from engine.service.settings import ServiceSettings
from tests.api_support import GC_PATH, free_port, gc_of, posted_bodies, running_service, runs_of, wait_until
from tests.data import fill


def outbox_row(dsn: str) -> dict | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute("SELECT attempts, delivered_at, last_error FROM gc_outbox")
        row = cur.fetchone()
        return dict(zip([c.name for c in cur.description or []], row, strict=True)) if row else None


def complete(deleted: int) -> dict:
    return {"messages_deleted": deleted, "status": "complete"}


def settings_with_callback(dsn: str, url: str) -> ServiceSettings:
    return ServiceSettings(nodes=nodes.single(dsn), defaults=GcOptions(max_seconds=60),
                           callback_url=url, poll_s=0.2)


def test_a_webhook_the_callback_server_missed_arrives_once_when_it_is_back_even_after_a_restart(conn, dsn):
    fill(conn, [True] * 5 + [False])
    port = free_port()
    settings = settings_with_callback(dsn, f"http://127.0.0.1:{port}/gc")
    with running_service(settings) as url:
        httpx.put(url + GC_PATH)
        wait_until(lambda: (row := outbox_row(dsn)) and row["attempts"] >= 3, timeout_s=20)
    assert runs_of(dsn)[0]["status"] == "complete"
    assert "failed" in outbox_row(dsn)["last_error"]

    receiver = HTTPServer(host="127.0.0.1", port=port)
    receiver.expect_request("/gc", method="POST").respond_with_data("ok")
    receiver.start()
    try:
        with running_service(settings):
            wait_until(lambda: posted_bodies(receiver), timeout_s=30)
            time.sleep(1.0)  # a duplicate would come within a few poll intervals
    finally:
        receiver.stop()

    assert [gc_of(body) for body in posted_bodies(receiver)] == [complete(5)]
    assert len(receiver.log) == 1
    assert outbox_row(dsn)["delivered_at"] is not None


def test_a_callback_server_answering_5xx_gets_the_webhook_again_until_it_takes_it(conn, dsn, httpserver):
    fill(conn, [True] * 3)
    httpserver.expect_oneshot_request("/gc", method="POST").respond_with_data("busy", status=503)
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    with running_service(settings_with_callback(dsn, httpserver.url_for("/gc"))) as url:
        httpx.put(url + GC_PATH)
        wait_until(lambda: posted_bodies(httpserver))

    assert [response.status_code for _, response in httpserver.log] == [503, 200]
    assert [gc_of(body) for body in posted_bodies(httpserver)] == [complete(3)]
    assert outbox_row(dsn)["attempts"] == 2
