"""``GET /v1/overview``, the status page's data, and the page's files as the service serves them."""

from __future__ import annotations

import httpx

from engine.config import GcOptions
from engine.migrate import upgrade
from engine.service import nodes
from engine.service.api_models import Overview
from engine.service.settings import ServiceSettings
from tests.api_support import GC_PATH, closed_port_dsn, free_port, running_service
from tests.data import fill
from tests.polling import wait_until

OVERVIEW = "/v1/overview"


def test_the_overview_shows_each_run_its_chart_its_kept_rows_its_webhook_waiting_and_a_node_down(conn, dsn):
    fill(conn, [i % 2 == 0 for i in range(3000)])  # ids 1, 3, 5, ... are garbage
    conn.execute("CREATE TABLE replies (id int PRIMARY KEY, message_id bigint REFERENCES messages (id))")
    conn.execute("INSERT INTO replies VALUES (1, 1), (2, 3), (3, 5)")
    down = closed_port_dsn()
    settings = ServiceSettings(nodes=nodes.build_nodes({"wacore1": dsn, "wacore2": down}), multiconnect=True,
                               defaults=GcOptions(max_seconds=60, batch_size=100, sleep=0.05),
                               auto_app_latency=False, poll_s=0.2,
                               callback_url=f"http://127.0.0.1:{free_port()}/gc")  # nobody listens
    with running_service(settings) as url:
        assert httpx.put(url + GC_PATH).status_code == 200

        def waiting() -> Overview | None:
            body = Overview.model_validate(httpx.get(url + OVERVIEW).json())
            node = body.nodes[0]
            return body if node.outbox and node.outbox.waiting and node.outbox.last_error else None

        overview = wait_until(waiting, timeout_s=30, what="the run's webhook waiting in the outbox")
    first, second = overview.nodes
    assert (first.node, second.node) == ("wacore1", "wacore2")
    run = first.latest
    assert run is not None and run.status == "complete"
    assert (run.messages_deleted, run.kept_by_foreign_keys) == (1500 - 3, 3)
    assert run.garbage_estimate and run.reason and run.strategy and run.workers and run.garbage_left == 0
    assert run.chart and all(point.rows_per_s >= 0 and point.wal_bytes_per_s >= 0 for point in run.chart)
    assert run.eta_s is None and run.duration_s and run.rows_per_s
    assert [r.run_id for r in first.recent] == [run.run_id]
    assert first.outbox is not None and first.outbox.attempts >= 1
    assert second.latest is None and second.error is not None and second.error.code == 1014
    assert f"Please check if wacore2 is running: {nodes.build_nodes({'x': down})[0].address}" \
        in second.error.details


def test_the_overview_needs_the_token_the_page_and_its_files_do_not(dsn):
    settings = ServiceSettings(nodes=nodes.single(dsn), token="t0ken", run_worker=False)
    with running_service(settings) as url:
        assert httpx.get(url + OVERVIEW).status_code == 401
        assert httpx.get(url + OVERVIEW, headers={"Authorization": "Bearer t0ken"}).status_code == 200
        page = httpx.get(url + "/")
        script = httpx.get(url + "/page/page.js")
        missing = httpx.get(url + "/page/nothing.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert '<script src="/page/page.js"' in page.text
    assert script.status_code == 200 and OVERVIEW in script.text
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == 1006


def test_a_node_whose_server_stops_is_a_1014_at_the_next_read_not_a_dead_connection(dsn, private_server):
    stopping = private_server.start()
    upgrade(stopping)
    settings = ServiceSettings(nodes=nodes.build_nodes({"wacore1": dsn, "wacore2": stopping}),
                               multiconnect=True, run_worker=False, connect_timeout_s=1.0)
    with running_service(settings) as url:
        before = Overview.model_validate(httpx.get(url + OVERVIEW).json())  # leaves a pooled connection
        private_server.stop()
        after = Overview.model_validate(httpx.get(url + OVERVIEW).json())
        status = httpx.get(url + GC_PATH).json()["services"]["message"]["gc"]
    assert [node.error for node in before.nodes] == [None, None]
    assert after.nodes[0].error is None
    error = after.nodes[1].error
    assert error is not None and error.code == 1014
    assert error.details.endswith(f"Please check if wacore2 is running: {settings.nodes[1].address}")
    assert status["wacore2"]["errors"][0]["details"].endswith(settings.nodes[1].address)
