"""A scheduled GC on a node whose database cannot be reached: its 1014 webhook goes out through a
live node's outbox while it is down, and its GCs resume once it is back (issue 22 item 4)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql
from werkzeug import Request, Response

from engine.config import GcOptions
from engine.service import nodes, outbox, unstarted
from engine.service.metrics import Metrics
from engine.service.requests import NodeResult, Started
from engine.service.settings import ServiceSettings
from engine.service.triggers import Every
from engine.service.worker import Worker
from tests.api_support import closed_port_dsn, free_port, gc_of, posted_bodies
from tests.data import fill
from tests.polling import wait_until


def settings_for(node_set: tuple[nodes.Node, ...], url: str) -> ServiceSettings:
    return ServiceSettings(nodes=node_set, multiconnect=len(node_set) > 1, callback_url=url,
                           defaults=GcOptions(max_seconds=60), auto_app_latency=False, poll_s=0.1,
                           schedule=Every(timedelta(seconds=1)))


def webhooks_of(httpserver, node: str | None) -> list[dict]:
    return [gc_of(body) for body in posted_bodies(httpserver) if gc_of(body).get("node") == node]


def failed_with_1014(gc: dict) -> bool:
    return gc["status"] == "failed" and [e["code"] for e in gc["errors"]] == [1014]


def refuse_the_first_of(node: str) -> Callable[[Request], Response]:
    """A callback server that answers 503 to the first webhook of ``node``, 200 to the rest."""
    refused: list[bytes] = []

    def answer(request: Request) -> Response:
        if gc_of(json.loads(request.get_data())).get("node") == node and not refused:
            refused.append(request.get_data())
            return Response("busy", status=503)
        return Response("ok")

    return answer


def allow_connections(server_dsn: str, dsn: str, allowed: bool) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(name), sql.Literal(allowed)))


@pytest.fixture
def down_then_up(make_dsn, server_dsn):
    """A node's database that refuses every connection until the test lets it in again."""
    dsn = make_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        fill(conn, [True] * 7 + [False] * 2)
    allow_connections(server_dsn, dsn, False)
    yield dsn
    allow_connections(server_dsn, dsn, True)


def test_a_scheduled_gc_on_a_node_that_is_down_posts_its_1014_through_a_live_nodes_outbox_and_resumes(
        conn, dsn, down_then_up, server_dsn, httpserver):
    """The callback server refuses the first POST: the notice is retried from wacore1's outbox,
    where it is kept as a failed run of wacore2, and arrives; once wacore2's database lets
    connections in again, its scheduled GC runs and completes."""
    fill(conn, [True] * 5)
    httpserver.expect_request("/gc", method="POST").respond_with_handler(refuse_the_first_of("wacore2"))
    node_set = nodes.build_nodes({"wacore1": dsn, "wacore2": down_then_up})
    worker = Worker(settings_for(node_set, httpserver.url_for("/gc")))
    worker.start()
    try:
        said = wait_until(lambda: [gc for gc in webhooks_of(httpserver, "wacore2") if failed_with_1014(gc)],
                          timeout_s=20, what="a 1014 webhook of wacore2")
        allow_connections(server_dsn, down_then_up, True)
        wait_until(lambda: any(gc["status"] == "complete" for gc in webhooks_of(httpserver, "wacore2")),
                   timeout_s=20, what="wacore2 complete once back")
    finally:
        worker.close()

    details = said[0]["errors"][0]["details"]
    assert "is not currently accepting connections" in details
    assert details.endswith(f"Please check if wacore2 is running: {node_set[1].address}")
    assert said[0]["messages_deleted"] == 0
    assert list(said[0]) == ["messages_deleted", "node", "errors", "status"]
    kept = conn.execute(
        "SELECT r.status, r.table_name, r.options, r.error, o.attempts, o.delivered_at IS NOT NULL"
        " FROM gc_runs r JOIN gc_outbox o ON o.run_id = r.id WHERE r.node = 'wacore2' ORDER BY r.id"
    ).fetchall()
    assert kept, "wacore2's failures are kept in wacore1's database"
    status, table, options, error, attempts, delivered = kept[0]
    assert (status, table, options, error, delivered) == ("failed", "messages", {outbox.KEPT_BY: "wacore1"},
                                                          details, True)
    assert attempts == 2, "the first POST, refused, was retried from the outbox"
    assert sum(gc["messages_deleted"] for gc in webhooks_of(httpserver, "wacore2")) == 7
    with psycopg.connect(down_then_up, autocommit=True) as back:
        assert back.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
    assert all(gc["status"] == "complete" for gc in webhooks_of(httpserver, "wacore1"))


def test_a_scheduled_gc_on_a_single_instance_that_is_down_posts_its_1014_directly(httpserver):
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    down = nodes.single(closed_port_dsn())
    worker = Worker(settings_for(down, httpserver.url_for("/gc")))
    worker.start()
    try:
        wait_until(lambda: webhooks_of(httpserver, None), timeout_s=20, what="a webhook")
    finally:
        worker.close()

    gc = webhooks_of(httpserver, None)[0]
    details = f"Connection refused. Please check if postgresql is running: {down[0].address}"
    assert gc == {"messages_deleted": 0, "errors": [{"code": 1014, "details": details}], "status": "failed"}


def test_a_notice_kept_for_a_node_that_is_down_is_in_the_keepers_outbox_backlog_until_delivered(conn, dsn):
    """The callback server is down too: the notice waits in wacore1's outbox, and the metrics'
    backlog of wacore1 (whose delivery loop posts it) counts it."""
    node_set = nodes.build_nodes({"wacore1": dsn, "wacore2": closed_port_dsn()})
    settings = settings_for(node_set, f"http://127.0.0.1:{free_port()}/gc")
    unstarted.notify(settings, [NodeResult(node_set[0], value=Started(1, joined=False)),
                                NodeResult(node_set[1], error="Connection refused. Please check ...")])

    assert outbox.backlog(conn, "wacore1").pending == 1
    assert outbox.waiting(conn, "wacore1")["waiting"] == 1
    scraped = Metrics(settings).render().decode()
    assert 'msggc_outbox_backlog{node="wacore1"} 1.0' in scraped
    [(node, status, body)] = conn.execute(
        "SELECT r.node, r.status, o.body FROM gc_runs r JOIN gc_outbox o ON o.run_id = r.id").fetchall()
    assert (node, status) == ("wacore2", "failed")
    assert gc_of(json.loads(body)) == {"messages_deleted": 0, "node": "wacore2", "errors": [
        {"code": 1014, "details": "Connection refused. Please check ..."}], "status": "failed"}
