"""HTTP behaviour beyond the seed: auth, errors in the seed's shape, OpenAPI, metrics, health."""

from __future__ import annotations

import httpx
import pytest

from engine.config import GcOptions
from engine.service import nodes
from engine.service.api_models import ErrorAnswer
from engine.service.contract import package_version
from engine.service.settings import ServiceSettings
from tests.api_support import GC_PATH, running_service, runs_of
from tests.data import fill
from tests.polling import wait_until

TOKEN = "t0ken-for-tests"


@pytest.fixture
def service(dsn):
    settings = ServiceSettings(nodes=nodes.single(dsn), defaults=GcOptions(max_seconds=60),
                               token=TOKEN, poll_s=0.2)
    with running_service(settings) as url:
        yield url


def error_of(answer: httpx.Response) -> dict:
    body = answer.json()
    ErrorAnswer.model_validate(body)
    assert body["meta"] == {"api_status": "stable", "version": package_version()}
    return body["errors"][0]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"}],
                         ids=["missing", "wrong", "not-bearer"])
def test_a_missing_or_wrong_token_gets_401_in_the_errors_shape(service, headers):
    answers = [httpx.request(method, service + path, headers=headers)
               for method, path in (("PUT", GC_PATH), ("GET", GC_PATH), ("GET", "/metrics"))]
    for answer in answers:
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert error_of(answer)["code"] == 1005


def test_the_right_token_starts_gc_and_health_needs_none(service, conn):
    fill(conn, [True, False])
    answer = httpx.put(service + GC_PATH, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert answer.json()["services"] == {"message": {"gc": {"status": "processing"}}}
    health = httpx.get(service + "/health")
    assert (health.status_code, health.json()["worker"]) == (200, "running")


@pytest.mark.parametrize(("body", "code", "mentions"), [
    (b'{"max_rows": ', 1025, "not valid JSON"),
    (b'{"max_rows": 0}', 1009, "max_rows"),
    (b'{"max_seconds": -1}', 1009, "max_seconds"),
    (b'{"older_than": "ten days"}', 1009, "older_than"),
    (b'{"budget": 5}', 1009, "budget"),
    (b'[1, 2]', 1009, "body"),
])
def test_a_malformed_body_gets_422_in_the_errors_shape(service, body, code, mentions):
    answer = httpx.put(service + GC_PATH, content=body, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert answer.status_code == 422
    error = error_of(answer)
    assert error["code"] == code
    assert mentions in error["details"]


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
def test_a_wrong_method_gets_405_with_allow_in_the_errors_shape(service, method):
    answer = httpx.request(method, service + GC_PATH, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "GET, PUT"
    assert error_of(answer)["code"] == 1025


def test_an_unknown_path_gets_404_in_the_errors_shape(service):
    answer = httpx.get(service + "/v1/services/message/nothing")
    assert answer.status_code == 404
    assert error_of(answer)["code"] == 1006


def test_openapi_declares_a_schema_for_every_answer(service):
    schema = httpx.get(service + "/openapi.json").json()
    gc = schema["paths"][GC_PATH]
    expected = {"put": {"200", "400", "401", "405", "413", "422", "500", "503"},
                "get": {"200", "401", "405", "413", "500", "503"}}
    for method, codes in expected.items():
        responses = gc[method]["responses"]
        assert set(responses) == codes
        for code in codes:
            assert "$ref" in responses[code]["content"]["application/json"]["schema"], (method, code)
    assert gc["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert "401" in schema["paths"]["/metrics"]["get"]["responses"]
    assert "401" not in schema["paths"]["/health"]["get"]["responses"]  # health is open
    assert "message-gc-completion" in schema["webhooks"]
    assert "401" in schema["paths"]["/v1/overview"]["get"]["responses"]
    assert set(schema["paths"]) == {GC_PATH, "/v1/overview", "/metrics", "/health"}  # not the page


def test_metrics_report_runs_rows_batches_and_backlog(service, conn):
    fill(conn, [True] * 3 + [False])
    httpx.put(service + GC_PATH, headers={"Authorization": f"Bearer {TOKEN}"})

    def scraped() -> str | None:
        text = httpx.get(service + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        return text if 'msggc_runs{node="postgresql",status="complete"} 1.0' in text else None

    text = wait_until(scraped)
    for line in ('msggc_node_up{node="postgresql"} 1.0',
                 'msggc_messages_deleted_total{node="postgresql"} 3.0',
                 'msggc_outbox_backlog{node="postgresql"} 0.0',
                 'msggc_batch_duration_seconds_count{node="postgresql"} 1.0'):
        assert line in text


def test_a_put_can_archive_throttle_and_vacuum_and_status_shows_the_results(conn, dsn, httpserver):
    """The beyond-the-seed options work through the API as through the CLI."""
    from engine.config import GcOptions
    from engine.service import nodes
    from engine.service.settings import ServiceSettings
    from tests.api_support import GC_PATH, posted_bodies, running_service
    from tests.data import fill, surviving_ids

    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    fill(conn, [i % 2 == 0 for i in range(400)])
    settings = ServiceSettings(nodes=tuple(nodes.single(dsn)), defaults=GcOptions(),
                               callback_url=httpserver.url_for("/gc"), poll_s=0.2,
                               auto_app_latency=False)  # no pause of the latency guard's either
    with running_service(settings) as url:
        answer = httpx.put(url + GC_PATH, json={"archive": True, "vacuum": True, "max_wal_rate": 2**30,
                                                "max_replica_lag": "10s", "pause_for_vacuum": True})
        wait_until(lambda: posted_bodies(httpserver))
        status = httpx.get(url + GC_PATH).json()["services"]["message"]["gc"]

    assert answer.status_code == 200
    assert surviving_ids(conn) == list(range(2, 401, 2))
    assert conn.execute("SELECT count(*) FROM messages_archive").fetchone()[0] == 200
    assert status["status"] == "complete"
    assert status["reclaim"]["after_vacuum"]["dead_tuples"] == 0
    assert status["throttle_pauses"] == 0


def test_a_put_can_archive_to_a_file_in_the_configured_directory(conn, dsn, httpserver, tmp_path):
    from engine.config import GcOptions
    from engine.service import nodes
    from engine.service.settings import ServiceSettings
    from tests.api_support import GC_PATH, posted_bodies, running_service
    from tests.data import fill, surviving_ids
    from tests.test_archive_file import archived_ids

    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    fill(conn, [i % 2 == 0 for i in range(400)])
    settings = ServiceSettings(nodes=tuple(nodes.single(dsn)), defaults=GcOptions(),
                               callback_url=httpserver.url_for("/gc"), poll_s=0.2, archive_dir=str(tmp_path))
    with running_service(settings) as url:
        answer = httpx.put(url + GC_PATH, json={"archive_to_file": True})
        wait_until(lambda: posted_bodies(httpserver))
        run_id = httpx.get(url + GC_PATH).json()["services"]["message"]["gc"]["run_id"]

    assert answer.status_code == 200
    assert surviving_ids(conn) == list(range(2, 401, 2))
    assert archived_ids(tmp_path / f"messages-run{run_id}.csv.gz") == list(range(1, 401, 2))


@pytest.mark.parametrize(("with_archive_dir", "body", "mentions"), [
    (False, {"archive_to_file": True}, "no archive_dir configured"),
    (True, {"archive_to_file": True, "archive": True}, "not both"),
])
def test_options_that_cannot_apply_are_a_parameter_error(dsn, tmp_path, with_archive_dir, body, mentions):
    from engine.config import GcOptions
    from engine.service import nodes
    from engine.service.settings import ServiceSettings
    from tests.api_support import GC_PATH, running_service, runs_of

    settings = ServiceSettings(nodes=tuple(nodes.single(dsn)), defaults=GcOptions(), run_worker=False,
                               archive_dir=str(tmp_path) if with_archive_dir else None)
    with running_service(settings) as url:
        answer = httpx.put(url + GC_PATH, json=body)

    assert answer.status_code == 422
    assert answer.json()["errors"][0]["code"] == 1009
    assert mentions in answer.json()["errors"][0]["details"]
    assert runs_of(dsn) == []


@pytest.fixture
def tokenless_service(dsn):
    """No token, as ``msggc serve`` allows on loopback; no worker, so a queued run stays queued."""
    settings = ServiceSettings(nodes=nodes.single(dsn), run_worker=False)
    with running_service(settings) as url:
        yield url


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", ""])
def test_without_a_token_a_foreign_host_header_gets_400_and_queues_no_gc(tokenless_service, dsn, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends its own Host."""
    answer = httpx.put(tokenless_service + GC_PATH, headers={"Host": host})
    assert answer.status_code == 400
    assert error_of(answer)["code"] == 1025
    assert runs_of(dsn) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost:{port}", "LOCALHOST",
                                  "[::1]:{port}", "::1"])
def test_without_a_token_a_loopback_host_header_is_accepted(tokenless_service, dsn, host):
    port = httpx.URL(tokenless_service).port
    answer = httpx.put(tokenless_service + GC_PATH, headers={"Host": host.format(port=port)})
    assert answer.status_code == 200
    assert [run["status"] for run in runs_of(dsn)] == ["queued"]


@pytest.mark.parametrize("origin", ["http://evil.example", "http://evil.example:{port}", "null",
                                    "http://127.0.0.1.evil.example:{port}"])
def test_without_a_token_a_cross_origin_request_gets_403_and_queues_no_gc(tokenless_service, dsn, origin):
    port = httpx.URL(tokenless_service).port
    answer = httpx.put(tokenless_service + GC_PATH, headers={"Origin": origin.format(port=port)})
    assert answer.status_code == 403
    assert error_of(answer)["code"] == 1005
    assert runs_of(dsn) == []


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:3000", "http://[::1]"])
def test_without_a_token_a_loopback_origin_is_accepted(tokenless_service, dsn, origin):
    port = httpx.URL(tokenless_service).port
    answer = httpx.put(tokenless_service + GC_PATH, headers={"Origin": origin.format(port=port)})
    assert answer.status_code == 200
    assert [run["status"] for run in runs_of(dsn)] == ["queued"]


def test_with_a_token_any_host_and_origin_may_start_gc(service):
    answer = httpx.put(service + GC_PATH, headers={"Authorization": f"Bearer {TOKEN}",
                                                   "Host": "gc.example", "Origin": "https://ops.example"})
    assert answer.status_code == 200
