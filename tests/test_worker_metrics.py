"""``msggc worker --metrics-port``: the worker's own series (batch and run histograms, its
schedule's), behind the token, without the databases' series that ``msggc serve`` exports."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api_support import cli_process, free_port
from tests.data import fill, run_rows
from tests.polling import wait_until
from tests.support import run_cli

TOKEN = "worker-token"


def test_a_worker_serves_its_histograms_and_schedule_behind_the_token_and_no_database_series(
        conn, dsn, tmp_path):
    fill(conn, [True] * 30 + [False] * 5)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    config = {"dsn": dsn, "token": TOKEN, "every": "1h", "poll_s": 0.2, "gc": {"max_app_latency_ms": "off"}}
    with cli_process(tmp_path, "worker", config, "--metrics-port", str(port)):
        wait_until(lambda: [run["status"] for run in run_rows(dsn)] == ["complete"], timeout_s=30)
        scraped = wait_until(lambda: _scrape(url), timeout_s=10, what="the worker's metrics")
        anonymous = httpx.get(url, timeout=5)

    names = {sample.name for family in text_string_to_metric_families(scraped) for sample in family.samples}
    assert anonymous.status_code == 401
    assert 'msggc_run_duration_seconds_count{node="postgresql",status="complete"} 1.0' in scraped
    assert 'msggc_scheduled_requests_total{node="postgresql",outcome="queued"} 1.0' in scraped
    assert {"msggc_batch_duration_seconds_count", "msggc_schedule_next_timestamp_seconds"} <= names
    assert not {name for name in names if name.startswith(("msggc_node_up", "msggc_runs", "msggc_outbox"))}


def _scrape(url: str) -> str | None:
    try:
        answer = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    except httpx.HTTPError:
        return None
    return answer.text if "msggc_run_duration_seconds_count{" in answer.text else None


def test_a_worker_refuses_metrics_beyond_loopback_without_a_token_in_one_line(dsn):
    done = run_cli("worker", "--dsn", dsn, "--metrics-port", str(free_port()), "--metrics-host", "0.0.0.0")

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "msggc: error: refusing to listen on 0.0.0.0 without a token: set --token or MSGGC_API_TOKEN"
        " (or listen on 127.0.0.1)"]
