"""The HTTP API under hostile input, and beside a GC started from the command line: schemathesis
finds no 500 and no answer outside the OpenAPI schema, huge bodies get 413, and a GC started by
the CLI and one started by the API on the same table never run at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.config import GcOptions
from engine.service import nodes, worker
from engine.service.body_limit import MAX_BODY_BYTES
from engine.service.settings import ServiceSettings
from tests.api_support import GC_PATH, running_service
from tests.data import fill, run_rows
from tests.faults.helpers import (
    CallbackServer,
    Conn,
    Ledger,
    batches_committed,
    free_port,
    notice,
    one_line_error,
    table_fate,
)
from tests.polling import wait_until
from tests.support import spawn_cli

TOKEN = "faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
"""The issue's bar: no 500, and every answer's status, type, headers and body in the schema."""
EXAMPLES_PER_OPERATION = 40


@pytest.fixture
def service(dsn: str, callback: CallbackServer) -> Iterator[str]:
    config = ServiceSettings(nodes=nodes.single(dsn), defaults=GcOptions(max_seconds=30), token=TOKEN,
                             poll_s=0.2, callback_url=callback.url)
    with running_service(config) as url:
        yield url


def fuzz(url: str, mode: GenerationMode, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Every operation of the live schema, ``EXAMPLES_PER_OPERATION`` cases each; returns the
    number of requests sent and the failures found."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    sent = 0
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            nonlocal sent
            sent += 1
            case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=10)

        try:
            check()
        except BaseException as exc:  # schemathesis raises a failure group
            if "Unable to satisfy assumptions" not in str(exc):  # nothing negative to generate
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    return sent, failures


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(
    conn: Conn, service: str, ledger: Ledger
) -> None:
    fill(conn, [True, False] * 50)
    outcomes = [fuzz(service, mode, headers) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                for headers in (AUTH, {}, {"Authorization": "Bearer wrong"})]
    sent = sum(count for count, _ in outcomes)
    failures = [failure for _, found in outcomes for failure in found]
    ledger.add(api_requests_fuzzed=sent)
    print(f"\nschemathesis: {sent} requests, {len(failures)} failures")
    assert failures == []
    assert sent >= 100


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
def test_a_huge_body_gets_413_in_the_errors_shape_and_queues_nothing(
    conn: Conn, service: str, chunked: bool, ledger: Ledger
) -> None:
    filler = b"x" * (4 * MAX_BODY_BYTES)
    body = b'{"max_rows": 5, "note": "' + filler + b'"}'
    content: Any = iter([body[i:i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
    answer = httpx.put(service + GC_PATH, content=content, timeout=30,
                       headers={**AUTH, "Content-Type": "application/json"})
    ledger.add(bad_inputs=1)
    assert answer.status_code == 413
    assert answer.json()["errors"][0]["code"] == 1025
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [(b"[" * 60_000, 400, 1025), (b'{"older_than": 1e300}', 422, 1009),
     (b'{"older_than": "1e300d"}', 422, 1009), (b'{"max_seconds": 1e999}', 422, 1009)],
    ids=["nested-too-deep", "retention-overflow", "retention-string-overflow", "infinite-budget"],
)
def test_a_body_that_breaks_parsing_or_arithmetic_is_refused_in_the_errors_shape(
    conn: Conn, service: str, body: bytes, status: int, code: int, ledger: Ledger
) -> None:
    answer = httpx.put(service + GC_PATH, content=body, timeout=30,
                       headers={**AUTH, "Content-Type": "application/json"})
    ledger.add(bad_inputs=1)
    assert (answer.status_code, answer.json()["errors"][0]["code"]) == (status, code)
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


def test_a_node_dsn_password_never_reaches_an_answer(ledger: Ledger) -> None:
    secret = "N0de-Pa55-never-answered"
    config = ServiceSettings(nodes=nodes.single(f"postgresql://postgres:{secret}@127.0.0.1:{free_port()}/x"),
                             poll_s=0.2)
    with running_service(config) as url:
        answers = [httpx.request(method, url + path, timeout=30)
                   for method, path in (("PUT", GC_PATH), ("GET", GC_PATH), ("GET", "/metrics"),
                                        ("GET", "/health"), ("GET", "/openapi.json"))]
    ledger.add(bad_inputs=1)
    assert [a.status_code for a in answers[:2]] == [503, 503]
    assert answers[0].json()["errors"][0]["code"] == 1014
    assert [a.request.url.path for a in answers if secret in a.text] == []


@pytest.fixture
def quick_busy_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued run finding its table busy retries after 0.3 s instead of 5 s."""
    monkeypatch.setattr(worker, "BUSY_TABLE_RETRY_S", 0.3)


def run_windows(dsn: str) -> list[dict[str, Any]]:
    return run_rows(dsn, ("id", "status", "messages_deleted", "started_at", "finished_at", "error"))


def all_finished(dsn: str) -> list[dict[str, Any]] | None:
    found = run_windows(dsn)
    return found if found and all(r["status"] in ("complete", "failed") for r in found) else None


@pytest.mark.slow
@pytest.mark.parametrize("first", ["cli", "api", "at-once"])
def test_a_gc_from_the_cli_and_one_from_the_api_never_run_at_once(
    conn: Conn, dsn: str, callback: CallbackServer, quick_busy_retry: None, first: str, ledger: Ledger
) -> None:
    garbage = [i % 4 != 0 for i in range(20_000)]
    fill(conn, garbage)
    slow = GcOptions(batch_size=50, sleep=0.01)
    config = ServiceSettings(nodes=nodes.single(dsn), defaults=slow, poll_s=0.1, callback_url=callback.url)
    cli_args = ("gc", "--dsn", dsn, "--json", "--batch-size", "50", "--sleep", "0.01")
    with running_service(config) as url:
        if first == "api":
            answer = httpx.put(url + GC_PATH, timeout=10)
            wait_until(lambda: batches_committed(conn) > 0, 30, "the API's run to start")
        cli = spawn_cli(*cli_args)
        if first == "cli":
            wait_until(lambda: batches_committed(conn) > 0, 30, "the CLI's run to start")
        if first != "api":
            answer = httpx.put(url + GC_PATH, timeout=10)
        out, err = cli.communicate(timeout=120)
        finished = wait_until(lambda: all_finished(dsn), 60, "both runs to end", interval_s=0.1)
        wait_until(lambda: len(callback.accepted) >= 1, 30, "the API run's webhook")

    ledger.add(**table_fate(conn, garbage).figures())
    assert answer.status_code == 200
    assert answer.json()["services"] == {"message": {"gc": {"status": "processing"}}}
    assert table_fate(conn, garbage).garbage_left == 0
    assert sum(r["messages_deleted"] for r in finished) == sum(garbage)
    if cli.returncode == 4:  # the API's run held the table: the CLI refused, in one line
        assert "another GC is already running on messages" in one_line_error(err)
        assert len(finished) == 1
    else:  # the CLI ran; the API's run waited for the table, then found what was left
        assert cli.returncode == 0, err
        assert json.loads(out)["status"] == "complete"
        assert len(finished) == 2
        cli_run, api_run = sorted(finished, key=lambda r: r["started_at"])
        assert cli_run["finished_at"] <= api_run["started_at"]  # one after the other, never together
    assert first != "api" or cli.returncode == 4
    assert first != "cli" or cli.returncode == 0
    assert [notice(body)["status"] for body in callback.accepted] == ["complete"]
