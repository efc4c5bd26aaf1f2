"""A fan-out that fits the server: many nodes on one PostgreSQL, one PUT, a bounded service.

The service holds at most ``max_connections`` on a server (its polls, deliveries, the PUT's
enqueues, and each run's workers and probe), runs at most ``max_concurrent_gcs`` there, queues
the rest in order, and a connection the server refuses for being full is tried again at once.
Counted from the server's side: ``pg_stat_activity`` rows of msggc's application names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from engine.config import GcOptions
from engine.service import nodes, requests
from engine.service.settings import ServiceSettings
from engine.service.slots import light_share, refused
from engine.service.worker import Worker
from tests.api_support import GC_PATH, gc_of, posted_bodies, running_service, runs_of
from tests.data import fill
from tests.polling import wait_until


@pytest.fixture
def callback(httpserver):
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    return httpserver


def database_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


@contextmanager
def msggc_connections(server_dsn: str, databases: list[str]) -> Iterator[list[int]]:
    """Sample, every 10 ms, how many connections msggc holds on these databases; yields the list
    of samples (the peak is its max)."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            while not stop.is_set():
                samples.append(conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s)"
                    " AND application_name LIKE 'msggc%%'", (databases,)).fetchone()[0])
                stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(5)


def test_twelve_nodes_on_one_server_complete_within_a_connection_cap_each_webhook_once(make_dsn, server_dsn,
                                                                                      callback):
    """7 connections for 12 nodes: one for the polls, deliveries and the PUT, six for runs of three
    (two workers and the latency probe): two runs at a time, the others
    queued in the nodes' order; every node completes, its webhook arrives once, msggc never holds
    more than 7."""
    dsns = [make_dsn() for _ in range(12)]
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            fill(conn, [i % 4 != 0 for i in range(2000)])
    node_set = nodes.build_nodes({f"wacore{i}": dsn for i, dsn in enumerate(dsns)})
    settings = ServiceSettings(nodes=node_set, multiconnect=True, callback_url=callback.url_for("/gc"),
                               defaults=GcOptions(max_seconds=120, workers=2),  # 3 connections with the probe
                               poll_s=0.2, baseline_s=0.3, max_connections=7)
    assert light_share(7) == 1
    with msggc_connections(server_dsn, [database_of(dsn) for dsn in dsns]) as samples, \
            running_service(settings) as url:
        answer = httpx.put(url + GC_PATH, timeout=30)
        wait_until(lambda: len(posted_bodies(callback)) >= 12, timeout_s=120, what="12 webhooks")
        time.sleep(1.0)  # a second webhook of a node would arrive by now
        peak_runs = settings.slots_of(node_set[0]).peak_gcs
        started = [place for _requested, place in settings.slots_of(node_set[0]).started_order]

    assert answer.status_code == 200
    assert gc_of(answer.json()) == {node.name: {"status": "processing"} for node in node_set}
    gcs = [gc_of(body) for body in posted_bodies(callback)]
    assert sorted(gc.pop("node") for gc in gcs) == sorted(node.name for node in node_set)
    assert all(gc == {"messages_deleted": 1500, "status": "complete"} for gc in gcs)
    for dsn in dsns:
        assert [(run["status"], run["messages_deleted"]) for run in runs_of(dsn)] == [("complete", 1500)]
    assert samples and max(samples) <= 7, f"msggc held {max(samples)} connections"
    assert peak_runs == 2  # the cap, not the number of nodes, set how many ran at once
    assert sorted(started) == list(range(12))
    assert started[2:] == sorted(started[2:])  # the first two start as they come; the others queue in order


def test_the_runs_at_once_are_bounded_apart_from_the_connections(make_dsn, server_dsn, callback):
    dsns = [make_dsn() for _ in range(4)]
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            fill(conn, [True] * 200)
    node_set = nodes.build_nodes({f"n{i}": dsn for i, dsn in enumerate(dsns)})
    settings = ServiceSettings(nodes=node_set, multiconnect=True, defaults=GcOptions(max_seconds=60),
                               callback_url=callback.url_for("/gc"), poll_s=0.2, auto_app_latency=False,
                               max_connections=40, max_concurrent_gcs=1)
    requests.request_gc(settings, {})
    worker = Worker(settings)
    worker.start()
    try:
        wait_until(lambda: len(posted_bodies(callback)) >= 4, timeout_s=60)
    finally:
        worker.close()
    assert settings.slots_of(node_set[0]).peak_gcs == 1
    assert sorted(gc_of(body)["node"] for body in posted_bodies(callback)) == ["n0", "n1", "n2", "n3"]


@pytest.fixture
def limited_role(role_dsn) -> str:
    """A DSN of a role allowed 4 connections: the server refuses a fifth with "too many connections
    for role", SQLSTATE 53300, as it says "too many clients already" when it is full."""
    return role_dsn("ALTER ROLE {role} CONNECTION LIMIT 4",
                    "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
                    "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")


def test_a_run_refused_for_too_many_connections_is_tried_again_at_once_not_after_stale_after(
        conn, limited_role, callback):
    """The run's connections are refused while the application holds the role's slots; the run
    goes through as soon as they are free, well before ``stale_after_s`` (60 s here)."""
    fill(conn, [True] * 50 + [False] * 10)
    settings = ServiceSettings(nodes=nodes.single(limited_role),
                               defaults=GcOptions(max_seconds=60, workers=1),
                               callback_url=callback.url_for("/gc"), poll_s=0.1, stale_after_s=60,
                               auto_app_latency=False, max_connections=20)
    [queued] = requests.request_gc(settings, {})
    assert queued.ok
    held: list[Any] = []
    for _ in range(4):  # the application takes every slot the pool's idle connection leaves
        try:
            held.append(psycopg.connect(limited_role))
        except psycopg.OperationalError as exc:
            assert refused(exc)
            break
    assert len(held) == 3
    worker = Worker(settings)
    worker.start()
    try:
        wait_until(lambda: runs_of(conn.info.dsn)[0]["status"] == "running", timeout_s=10)
        time.sleep(1.5)  # refused meanwhile, tried again with backoff
        assert not posted_bodies(callback)
        freed_at = time.monotonic()
        for other in held:
            other.close()
        wait_until(lambda: posted_bodies(callback), timeout_s=20)
        waited = time.monotonic() - freed_at
    finally:
        worker.close()
    assert [gc_of(body) for body in posted_bodies(callback)] == [{"messages_deleted": 50,
                                                                  "status": "complete"}]
    assert waited < 10, f"the run went on {waited:.1f}s after the connections were free"


def test_without_a_setting_the_service_takes_half_the_room_the_server_has_left(dsn):
    settings = ServiceSettings(nodes=nodes.single(dsn), run_worker=False)
    slots = settings.slots_of(settings.nodes[0])
    with psycopg.connect(dsn, autocommit=True) as conn:
        total, superuser = (int(conn.execute(f"SHOW {name}").fetchone()[0])
                            for name in ("max_connections", "superuser_reserved_connections"))
    assert slots.measured and 3 <= slots.connections <= (total - superuser) // 2
    assert slots.light == light_share(slots.connections) and slots.gcs == 4
    assert settings.slots_of(settings.nodes[0]) is slots  # measured once per server
