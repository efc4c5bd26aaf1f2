"""Completion webhooks survive a callback server that is down or failing: delivered once, later."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pytest_httpserver import HTTPServer

from engine.config import GcOptions
from engine.service import nodes
from engine.service.settings import ServiceSettings
from engine.service.worker import Worker
from tests.api_support import GC_PATH, free_port, gc_of, posted_bodies, running_service, runs_of
from tests.data import fill
from tests.polling import wait_until


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


@pytest.fixture
def dsn_without_outbox_update(conn, dsn) -> Iterator[str]:
    """A login role that may do everything but UPDATE gc_outbox: a lasting delivery fault."""
    role = f"msggc_no_outbox_update_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}")
                 .format(sql.Identifier(role)))
    conn.execute(sql.SQL("REVOKE UPDATE ON gc_outbox FROM {}").format(sql.Identifier(role)))
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_lasting_delivery_fault_is_logged_once_naming_the_node_not_at_every_poll(
        dsn_without_outbox_update, caplog):
    settings = ServiceSettings(nodes=nodes.build_nodes({"wacore1": dsn_without_outbox_update}),
                               multiconnect=True, poll_s=0.05)
    caplog.set_level(logging.WARNING, logger="msggc.worker")
    worker = Worker(settings)
    worker.start()
    try:
        time.sleep(1.0)  # about 20 polls, each failing on the missing privilege
    finally:
        worker.close()

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "wacore1" in warnings[0]
    assert "gc_outbox" in warnings[0]
