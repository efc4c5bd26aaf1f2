"""The series the Grafana dashboard and the alert rules in ``deploy/`` read from ``/metrics``,
each produced by real runs on a real database (``tests/test_deploy_prometheus.py`` then
evaluates the rules themselves in a real Prometheus)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from engine import collect
from engine.config import GcOptions
from engine.result import GcResult
from engine.service import nodes
from engine.service.metrics import Metrics
from engine.service.notice import NoticeFinisher
from engine.service.notify import WebhookNotifier
from engine.service.settings import ServiceSettings
from engine.service.triggers import Every
from engine.service.worker import Worker
from engine.status import RunStatus
from tests.api_support import closed_port_dsn, free_port
from tests.data import REFUSE_DELETES, fill, run_rows
from tests.polling import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

def at(value: float) -> object:
    """Timestamps go through the text format as floats: equal to the millisecond."""
    return pytest.approx(value, abs=1e-3)


def scrape(metrics: Metrics) -> Samples:
    """Every sample of one scrape, by name and labels."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for sample in family.samples}


def of(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def epoch(conn: psycopg.Connection, column: str, run_id: int) -> float:
    query = sql.SQL("SELECT extract(epoch FROM {})::float8 FROM gc_runs WHERE id = %s").format(
        sql.Identifier(column))
    [value] = conn.execute(query, (run_id,)).fetchone()
    return value


def last_status(samples: Samples, node: str = "postgresql") -> dict[str, float | None]:
    return {status: of(samples, "msggc_last_run_status", node=node, status=status)
            for status in ("complete", "stopped", "failed")}


def test_a_failed_run_is_the_last_status_until_one_completes_and_its_undelivered_webhook_waits_since_its_end(
        conn, dsn):
    fill(conn, [True] * 5 + [False] * 2)
    conn.execute(REFUSE_DELETES)
    unreachable = WebhookNotifier(f"http://127.0.0.1:{free_port()}/gc")
    failed = collect(dsn, GcOptions(), NoticeFinisher(unreachable))
    metrics = Metrics(ServiceSettings(nodes=nodes.single(dsn)))

    after_failure = scrape(metrics)
    conn.execute("DROP TRIGGER refuse_deletes ON messages")
    complete = collect(dsn, GcOptions())
    after_success = scrape(metrics)

    assert (failed.status, complete.status) == (RunStatus.FAILED, RunStatus.COMPLETE)
    node = "postgresql"
    assert last_status(after_failure) == {"complete": 0, "stopped": 0, "failed": 1}
    assert of(after_failure, "msggc_last_run_finished_timestamp_seconds", node=node) == at(
        epoch(conn, "finished_at", failed.run_id))
    assert of(after_failure, "msggc_outbox_backlog", node=node) == 1
    assert of(after_failure, "msggc_outbox_oldest_timestamp_seconds", node=node) == at(
        epoch(conn, "finished_at", failed.run_id))
    assert last_status(after_success) == {"complete": 1, "stopped": 0, "failed": 0}
    assert of(after_success, "msggc_last_run_finished_timestamp_seconds", node=node) == at(
        epoch(conn, "finished_at", complete.run_id))
    assert of(after_success, "msggc_run_last_progress_timestamp_seconds", node=node) is None


def test_a_failed_run_stays_the_last_status_while_a_stalled_run_resumes_its_walk_which_exports_its_checkpoint(
        conn, dsn):
    """The resumed run supersedes the failed one as it starts: the alert must not clear before it ends."""
    metrics = Metrics(ServiceSettings(nodes=nodes.single(dsn)))
    before = scrape(metrics)
    fill(conn, [True] * 5)
    conn.execute(REFUSE_DELETES)
    failed = collect(dsn, GcOptions())
    conn.execute("DROP TRIGGER refuse_deletes ON messages")
    resumed: list[GcResult] = []
    patient = GcOptions(lock_timeout_ms=60_000, statement_timeout_ms=60_000)
    with psycopg.connect(dsn) as application:
        application.execute("LOCK TABLE messages IN SHARE MODE")  # the resumed run's delete waits
        thread = threading.Thread(target=lambda: resumed.append(collect(dsn, patient)))
        thread.start()
        wait_until(lambda: [run["status"] for run in run_rows(dsn)] == ["superseded", "running"])
        during = scrape(metrics)
        heartbeat = epoch(conn, "heartbeat_at", failed.run_id + 1)
    thread.join(30)
    after = scrape(metrics)

    assert last_status(before) == {"complete": None, "stopped": None, "failed": None}
    assert of(before, "msggc_run_last_progress_timestamp_seconds", node="postgresql") is None
    assert last_status(during) == {"complete": 0, "stopped": 0, "failed": 1}
    assert of(during, "msggc_run_last_progress_timestamp_seconds", node="postgresql") == at(heartbeat)
    assert [result.status for result in resumed] == [RunStatus.COMPLETE]
    assert last_status(after) == {"complete": 1, "stopped": 0, "failed": 0}


def test_the_schedule_exports_its_next_time_and_counts_a_request_a_stopped_node_missed(conn, dsn):
    fill(conn, [True] * 3)
    down = closed_port_dsn()
    settings = ServiceSettings(nodes=nodes.build_nodes({"up": dsn, "down": down}), multiconnect=True,
                               schedule=Every(timedelta(hours=1)), poll_s=0.1, connect_timeout_s=1)
    worker = Worker(settings)
    started = time.time()
    worker.start()

    def run_done() -> Samples | None:
        samples = scrape(worker.metrics)
        done = of(samples, "msggc_run_duration_seconds_count", node="up", status="complete")
        return samples if done else None

    try:
        samples = wait_until(run_done, timeout_s=20)
    finally:
        worker.close()

    counts = {(node, outcome): of(samples, "msggc_scheduled_requests_total", node=node, outcome=outcome)
              for node in ("up", "down") for outcome in ("queued", "joined", "failed")}
    assert counts == {("up", "queued"): 1, ("up", "joined"): 0, ("up", "failed"): 0,
                      ("down", "queued"): 0, ("down", "joined"): 0, ("down", "failed"): 1}
    next_at = of(samples, "msggc_schedule_next_timestamp_seconds")
    assert next_at is not None and started + 3600 <= next_at <= time.time() + 3600
    assert of(samples, "msggc_node_up", node="down") == 0
    assert of(samples, "msggc_last_run_status", node="up", status="complete") == 1

