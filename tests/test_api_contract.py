"""Every answer and every webhook body, compared key by key with the seed's own examples.

Real service (uvicorn on a loopback port, its worker inside), real PostgreSQL, real callback
server (pytest-httpserver). The node names and row counts are the seed's, so most bodies must
equal the seed's example outright; only ``meta.version`` and error ``details`` are ours.
"""

from __future__ import annotations

import copy
import dataclasses

import httpx
import psycopg
import pytest

from engine.config import GcOptions
from engine.service import nodes
from engine.service.api_models import (
    CompletionWebhook,
    ErrorAnswer,
    MultiStartAnswer,
    SingleStartAnswer,
    SingleStatusAnswer,
)
from engine.service.contract import package_version
from engine.service.notify import SIGNATURE_HEADER, sign
from engine.service.settings import ServiceSettings, load_settings
from tests.api_support import (
    GC_PATH,
    assert_same_keys_in_order,
    closed_port_dsn,
    garbage_left,
    gc_of,
    posted_bodies,
    running_service,
    runs_of,
    seed_examples,
    wait_until,
)
from tests.data import fill

SEED = seed_examples()
SECRET = "contract-secret"


def with_our_version(example: dict) -> dict:
    expected = copy.deepcopy(example)
    expected["meta"]["version"] = package_version()
    return expected


@pytest.fixture
def callback(httpserver):
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    return httpserver


def settings_for(node_list, callback, **defaults) -> ServiceSettings:
    options = GcOptions(strategy="index", batch_size=defaults.pop("batch_size", 1000), **defaults)
    return ServiceSettings(nodes=tuple(node_list), multiconnect=any(n.name for n in node_list),
                           defaults=options, callback_url=callback.url_for("/gc"),
                           webhook_secret=SECRET, poll_s=0.2)


def test_single_instance_put_answers_the_seeds_processing_body_and_posts_its_webhook(conn, dsn, callback):
    fill(conn, [True] * 5 + [False] * 3)
    with running_service(settings_for(nodes.single(dsn), callback)) as url:
        answer = httpx.put(url + GC_PATH)
        wait_until(lambda: posted_bodies(callback))

    assert answer.status_code == 200
    assert answer.json() == with_our_version(SEED["single_answer"])
    SingleStartAnswer.model_validate(answer.json())
    request, _ = callback.log[0]
    body = posted_bodies(callback)[0]
    assert body == SEED["single_webhook"]
    assert_same_keys_in_order(body, SEED["single_webhook"])
    CompletionWebhook.model_validate(body)
    assert request.headers[SIGNATURE_HEADER] == sign(request.get_data(), SECRET)
    assert garbage_left(dsn) == 0


def test_multiconnect_answers_per_node_with_1014_for_an_unreachable_one_like_the_seed(conn, dsn, callback):
    fill(conn, [True] * 11 + [False] * 2)
    down = closed_port_dsn()
    node_list = nodes.build_nodes({"wacore1": dsn, "wacore2": down})
    with running_service(settings_for(node_list, callback)) as url:
        answer = httpx.put(url + GC_PATH)
        wait_until(lambda: posted_bodies(callback))

    assert answer.status_code == 200
    ours = answer.json()
    details = gc_of(ours)["wacore2"]["errors"][0]["details"]
    assert details.endswith(f"Please check if wacore2 is running: {node_list[1].address}")
    assert details.startswith("Connection refused")
    expected = with_our_version(SEED["multi_error"])
    gc_of(expected)["wacore2"]["errors"][0]["details"] = details
    assert ours == expected
    MultiStartAnswer.model_validate(ours)
    webhook = posted_bodies(callback)[0]
    expected_webhook = copy.deepcopy(SEED["multi_webhook_first"])
    gc_of(expected_webhook)["node"] = "wacore1"
    assert webhook == expected_webhook
    assert_same_keys_in_order(webhook, SEED["multi_webhook_first"])


def test_multiconnect_with_the_seeds_node_names_answers_and_notifies_exactly_like_the_seed(
        conn, dsn, make_dsn, callback):
    second = make_dsn()
    fill(conn, [True] * 11)
    with psycopg.connect(second, autocommit=True) as other:
        fill(other, [True] * 5 + [False])
    node_list = nodes.build_nodes({"wacore2:9dfe77618dba": dsn, "wacore3:a9dcc716fd6e": second})
    assert_the_seeds_multiconnect_exchange(settings_for(node_list, callback), callback)


def assert_the_seeds_multiconnect_exchange(settings: ServiceSettings, callback) -> None:
    """A PUT answers the seed's multiconnect body and each node posts the seed's webhook."""
    with running_service(settings) as url:
        answer = httpx.put(url + GC_PATH)
        wait_until(lambda: len(posted_bodies(callback)) == 2)

    assert answer.status_code == 200
    assert answer.json() == with_our_version(SEED["multi_answer"])
    by_node = {gc_of(body)["node"]: body for body in posted_bodies(callback)}
    for example in (SEED["multi_webhook_first"], SEED["multi_webhook_second"]):
        ours = by_node[gc_of(example)["node"]]
        assert ours == example
        assert_same_keys_in_order(ours, example)


def test_single_instance_that_cannot_start_answers_503_with_the_seeds_error_body(callback):
    down = nodes.single(closed_port_dsn())
    with running_service(settings_for(down, callback)) as url:
        answer = httpx.put(url + GC_PATH)

    assert answer.status_code == 503
    ours = answer.json()
    details = ours["errors"][0]["details"]
    assert details == f"Connection refused. Please check if postgresql is running: {down[0].address}"
    expected = with_our_version(SEED["single_error"])
    expected["errors"][0]["details"] = details
    assert ours == expected
    ErrorAnswer.model_validate(ours)


def test_a_budget_stop_posts_the_seeds_failure_body_and_the_next_put_continues(conn, dsn, callback):
    fill(conn, [True] * 20 + [False] * 5)
    with running_service(settings_for(nodes.single(dsn), callback, batch_size=5)) as url:
        stopped = httpx.put(url + GC_PATH, json={"max_rows": 5})
        wait_until(lambda: posted_bodies(callback))
        continued = httpx.put(url + GC_PATH)
        wait_until(lambda: len(posted_bodies(callback)) == 2)

    assert stopped.status_code == continued.status_code == 200
    failure, completion = posted_bodies(callback)
    details = gc_of(failure)["errors"][0]["details"]
    assert "max_rows=5" in details
    expected = copy.deepcopy(SEED["failure_webhook"])
    gc_of(expected)["messages_deleted"] = 5
    gc_of(expected)["errors"][0]["details"] = details
    assert failure == expected
    assert_same_keys_in_order(failure, SEED["failure_webhook"])
    assert gc_of(completion) == {"messages_deleted": 15, "status": "complete"}
    assert [run["status"] for run in runs_of(dsn)] == ["superseded", "complete"]
    assert garbage_left(dsn) == 0


def test_a_put_while_a_gc_runs_joins_it_instead_of_starting_a_second(conn, dsn, callback):
    fill(conn, [True] * 20)
    settings = dataclasses.replace(  # no auto budget: a guarded batch's size follows the server's WAL
        settings_for(nodes.single(dsn), callback, batch_size=4, sleep=0.15), auto_app_latency=False)
    with running_service(settings) as url:
        first = httpx.put(url + GC_PATH)
        wait_until(lambda: runs_of(dsn) and runs_of(dsn)[0]["batches"] >= 1)
        second = httpx.put(url + GC_PATH, json={"max_rows": 1})
        wait_until(lambda: posted_bodies(callback))
        status = httpx.get(url + GC_PATH)

    assert first.json() == second.json() == with_our_version(SEED["single_answer"])
    assert len(runs_of(dsn)) == 1
    only_webhook = {"messages_deleted": 20, "status": "complete"}
    assert [gc_of(body) for body in posted_bodies(callback)] == [only_webhook]
    reported = SingleStatusAnswer.model_validate(status.json()).services.message.gc
    assert (reported.status, reported.messages_deleted, reported.batches) == ("complete", 20, 5)
    assert reported.rows_per_s and reported.rows_per_s > 0



def test_a_config_naming_other_tables_and_columns_per_node_answers_and_notifies_like_the_seed(
        conn, dsn, make_dsn, callback, tmp_path):
    second = make_dsn()
    conn.execute("CREATE SCHEMA app")
    conn.execute("CREATE TABLE app.inbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                 " handled_at timestamptz, body text)")
    conn.execute("INSERT INTO app.inbox (handled_at, body) SELECT CASE WHEN g <= 11 THEN now() END, 'b'"
                 " FROM generate_series(1, 14) g")
    with psycopg.connect(second, autocommit=True) as other:
        other.execute("CREATE TABLE chat_log (id bigint PRIMARY KEY, status text NOT NULL)")
        other.execute("INSERT INTO chat_log SELECT g, CASE WHEN g <= 5 THEN 'read' ELSE 'new' END"
                      " FROM generate_series(1, 6) g")
    config = tmp_path / "msggc.toml"
    config.write_text(
        'table = "app.inbox"\nprocessed_column = "handled_at"\n'
        f'callback_url = "{callback.url_for("/gc")}"\nwebhook_secret = "{SECRET}"\npoll_s = 0.2\n'
        f'[nodes]\n"wacore2:9dfe77618dba" = "{dsn}"\n'
        f'[nodes."wacore3:a9dcc716fd6e"]\ndsn = "{second}"\ntable = "chat_log"\n'
        'where = "status = \'read\'"\n')
    assert_the_seeds_multiconnect_exchange(load_settings(config=str(config)), callback)
    assert conn.execute("SELECT count(*) FROM app.inbox").fetchone()[0] == 3
    with psycopg.connect(second) as other:
        assert other.execute("SELECT array_agg(id ORDER BY id) FROM chat_log").fetchone()[0] == [6]
