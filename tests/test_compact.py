"""Compaction (``--strategy compact``) on a plain table: the live rows kept, the garbage counted
exactly, and the table's catalog (grants, triggers, policies, defaults, identity position,
indexes, constraints, comments) the same after the swap; the refusals, one line each."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest

from engine import collect, runs
from engine.compact import choice, flow
from engine.compact.preconditions import CompactRefused
from engine.config import GcOptions, TableSpec
from engine.service import nodes
from engine.service.settings import ServiceSettings
from engine.status import RunStatus
from tests.api_support import GC_PATH, gc_of, posted_bodies, running_service
from tests.compact_app import CATALOG, LEAF_CATALOG, LEAVES, App, Turnstile, leftovers, make_inbox
from tests.data import fill, surviving_ids
from tests.polling import wait_until
from tests.support import run_cli, spawn_cli

Conn = psycopg.Connection[Any]

def options(**settings: Any) -> GcOptions:
    return GcOptions(table=TableSpec(name="inbox", schema="public"), strategy="compact", **settings)


def test_compaction_keeps_live_rows_counts_garbage_and_carries_the_catalog(conn: Conn, dsn: str) -> None:
    live = make_inbox(conn, 5000, 10)
    before = conn.execute(CATALOG).fetchone()[0]
    result = collect(dsn, options())
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.strategy == "compact"
    assert re.search(r"the swap held the table's lock \d+ ms", result.reason), result.reason
    assert result.messages_deleted == 4500
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == live
    assert conn.execute(CATALOG).fetchone()[0] == before
    assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'msggc%%'").fetchone()[0] == 0
    # the identity goes on where it stood, the application's trigger fires on the new table
    new_id = conn.execute("INSERT INTO inbox (msg) VALUES ('after') RETURNING id").fetchone()[0]
    assert new_id == 5001
    assert conn.execute("SELECT op FROM inbox_audit WHERE id = %s", (new_id,)).fetchone() == ("INSERT",)
    assert conn.execute("SELECT messages_deleted, status FROM gc_runs WHERE id = %s",
                        (result.run_id,)).fetchone() == (4500, "complete")


@pytest.mark.parametrize(("setup", "reason"), [
    ("CREATE VIEW inbox_view AS SELECT id FROM inbox", "views, materialized views or rules depend on it"),
    ("CREATE TABLE reply (id int PRIMARY KEY, inbox_id bigint REFERENCES inbox (id))",
     "foreign keys point at it"),
    ("CREATE PUBLICATION inbox_pub FOR TABLE inbox", "it is published"),
    ("ALTER TABLE inbox DROP CONSTRAINT inbox_pkey, DROP CONSTRAINT inbox_msg_key", "no key"),
    ("CREATE TABLE inbox_child () INHERITS (inbox)", "it takes part in inheritance"),
    ("CREATE FUNCTION first_inbox() RETURNS inbox LANGUAGE sql AS 'SELECT * FROM inbox LIMIT 1'",
     "objects depend on it or on its row type"),
])
def test_compaction_is_refused_in_one_line_when_a_rename_cannot_carry_the_table(
        conn: Conn, dsn: str, setup: str, reason: str) -> None:
    make_inbox(conn, 100, 2)
    conn.execute(setup)
    with pytest.raises(CompactRefused, match=reason) as refused:
        collect(dsn, options())
    assert "\n" not in str(refused.value)
    assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 100
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


def test_compaction_is_refused_to_a_role_that_does_not_own_the_table(
        conn: Conn, role_dsn: Any) -> None:
    make_inbox(conn, 100, 2)
    other = role_dsn("GRANT SELECT, DELETE ON inbox TO {role}",
                     "GRANT SELECT, INSERT, UPDATE, DELETE ON gc_runs, gc_outbox, gc_sweep TO {role}")
    with pytest.raises(CompactRefused, match="the role does not own it"):
        collect(other, options())


def test_compaction_beside_a_writing_application_keeps_every_change_and_counts_exactly(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, 20_000, 5)
    app = App.on(conn, dsn, seed=7)
    writer = threading.Thread(target=app.run)
    writer.start()
    try:
        wait_until(lambda: app.inserted >= 20, 30, "the application to write")
        result = collect(dsn, options())
        assert result.status is RunStatus.COMPLETE, result.error
    finally:
        app.stop.set()
        writer.join(30)
    app.check(conn, 20_000)
    assert leftovers(conn) == []


def test_the_swap_waits_at_most_lock_timeout_behind_a_long_read_and_gives_up_undone(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, 2000, 5)
    app = App.on(conn, dsn, seed=3)
    writer = threading.Thread(target=app.run)
    with psycopg.connect(dsn) as reader:
        reader.execute("SELECT count(*) FROM inbox")  # an open transaction holding the table
        writer.start()
        try:
            result = collect(dsn, options(lock_timeout_ms=50))
        finally:
            app.stop.set()
            writer.join(30)
        assert result.status is RunStatus.FAILED
        assert "was not granted within 50 ms" in str(result.error)
        # each attempt queued the application behind it for 50 ms at most (slack for a busy machine)
        assert app.slowest_s < 1.0
    walk = GcOptions(table=TableSpec(name="inbox", schema="public"))
    assert collect(dsn, walk).status is RunStatus.COMPLETE
    app.check(conn, 2000)
    assert leftovers(conn) == []


@pytest.mark.parametrize(("change", "reason"), [
    ("TRUNCATE inbox", "the application truncated public.inbox during the compaction"),
    ("ALTER TABLE inbox ADD COLUMN extra int", "the columns or constraints of public.inbox changed"),
    ("CREATE INDEX inbox_n ON inbox (n)", "the indexes of public.inbox changed"),
])
def test_a_compaction_the_application_changes_the_table_under_is_undone(
        conn: Conn, dsn: str, change: str, reason: str) -> None:
    make_inbox(conn, 2000, 5)
    proc = spawn_cli("gc", "--dsn", dsn, "--table", "public.inbox", "--strategy", "compact", "--json")
    with Turnstile(conn, dsn, proc) as gate:
        gate.pause_at("indexes")
        conn.execute(change)
    out, _err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert reason in json.loads(out)["error"]
    assert leftovers(conn) == []
    assert conn.execute("SELECT status FROM gc_runs").fetchall() == [("failed",)]


def test_a_compaction_with_archive_keeps_exactly_the_garbage_and_restore_puts_it_back(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, 3000, 4)
    original = conn.execute("SELECT id, msg, code, n, processed_at FROM inbox ORDER BY id").fetchall()
    result = collect(dsn, options(archive=True))
    assert result.status is RunStatus.COMPLETE, result.error
    kept = f"msggc_old_{result.run_id}"
    assert conn.execute(f"SELECT count(*), bool_and(processed_at IS NOT NULL) FROM {kept}").fetchone() == (
        2250, True)
    conn.execute("DELETE FROM app_ref WHERE code = 'b'")  # the archive holds no foreign key
    restored = run_cli("restore", "--dsn", dsn, "--table", "public.inbox", "--run", str(result.run_id))
    assert restored.returncode == 0, restored.stderr
    assert "restored 2,250 rows" in restored.stdout
    assert conn.execute("SELECT id, msg, code, n, processed_at FROM inbox ORDER BY id").fetchall() == original
    assert leftovers(conn) == []


def test_a_compaction_dry_run_predicts_from_a_rolled_back_sample_copy_and_changes_nothing(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, 5000, 5)
    conn.execute("ANALYZE inbox")
    before = conn.execute(CATALOG).fetchone()[0]
    result = collect(dsn, options(dry_run=True))
    assert result.status is RunStatus.DRY_RUN
    figures = result.compaction
    assert figures is not None and figures["refused"] == []
    assert 500 <= figures["live_rows"] <= 1500  # 1000 live, from a sample
    assert result.predicted_wal_bytes and result.predicted_wal_bytes > 0
    find, verify = figures["predicted_find_seconds"], figures["predicted_verify_seconds"]
    assert find > 0 and verify > 0 and result.predicted_seconds and result.predicted_seconds > find + verify
    assert figures["disk_bytes"] > 0 and figures["walk"]["strategy"] in ("physical", "index", "key")
    assert conn.execute(CATALOG).fetchone()[0] == before
    assert leftovers(conn) == [] and conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 5000
    conn.execute("CREATE VIEW inbox_view AS SELECT id FROM inbox")
    refused = run_cli("gc", "--dsn", dsn, "--table", "public.inbox", "--strategy", "compact", "--dry-run")
    assert refused.returncode == 0
    assert "compaction refused: views, materialized views or rules depend on it" in refused.stdout


def test_a_put_with_strategy_compact_compacts_and_its_webhook_counts_exactly(
        conn: Conn, dsn: str, httpserver: Any) -> None:
    httpserver.expect_request("/gc", method="POST").respond_with_data("ok")
    fill(conn, [i % 3 != 0 for i in range(600)])
    settings = ServiceSettings(nodes=tuple(nodes.single(dsn)), defaults=GcOptions(),
                               callback_url=httpserver.url_for("/gc"), poll_s=0.2, auto_app_latency=False)
    with running_service(settings) as url:
        answer = httpx.put(url + GC_PATH, json={"strategy": "compact"})
        wait_until(lambda: posted_bodies(httpserver))
        status = httpx.get(url + GC_PATH).json()["services"]["message"]["gc"]
    assert answer.status_code == 200
    bodies = [gc_of(body) for body in posted_bodies(httpserver)]
    assert bodies == [{"messages_deleted": 400, "status": "complete"}]
    assert status["status"] == "complete" and status["messages_deleted"] == 400
    assert conn.execute("SELECT strategy FROM gc_runs").fetchall() == [("compact",)]
    assert surviving_ids(conn) == list(range(1, 601, 3))


def test_auto_compacts_a_table_mostly_garbage_above_the_threshold_unless_a_walk_is_to_continue(
        conn: Conn, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "MIN_ROWS", 1000)  # the measured threshold is a million rows
    make_inbox(conn, 4000, 50)
    conn.execute("ANALYZE inbox")
    auto = GcOptions(table=TableSpec(name="inbox", schema="public"))
    planned = collect(dsn, replace(auto, dry_run=True))
    assert planned.strategy == "compact" and planned.compaction is not None
    stopped = collect(dsn, replace(auto, strategy="index", max_rows=10, batch_size=10))
    assert stopped.status is RunStatus.STOPPED  # a walk to continue: auto walks on
    assert collect(dsn, auto).strategy == "index"
    make_more = "INSERT INTO inbox (msg, processed_at) SELECT 'x' || g, now() FROM generate_series(1, 4000) g"
    conn.execute(make_more)
    conn.execute("ANALYZE inbox")
    result = collect(dsn, auto)
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.strategy == "compact" and result.reason.startswith("compacts: ~")
    assert conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0] == 0


def test_the_compacted_table_has_its_planner_statistics_at_once(conn: Conn, dsn: str) -> None:
    make_inbox(conn, 3000, 3)
    assert collect(dsn, options()).status is RunStatus.COMPLETE
    analyzed = conn.execute("SELECT reltuples, (SELECT count(*) FROM pg_stats WHERE tablename = 'inbox')"
                            " FROM pg_class WHERE oid = 'inbox'::regclass").fetchone()
    assert analyzed == (1000, 6)  # each of its 6 columns, 1,000 live rows; no ANALYZE by the test


def test_a_row_budget_is_refused_by_compaction_and_keeps_auto_on_the_walk(
        conn: Conn, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "MIN_ROWS", 1000)
    make_inbox(conn, 4000, 50)
    conn.execute("ANALYZE inbox")
    with pytest.raises(CompactRefused, match="cannot stop after --max-rows"):
        collect(dsn, options(max_rows=100))
    walked = collect(dsn, GcOptions(table=TableSpec(name="inbox", schema="public"), max_rows=100))
    assert walked.strategy != "compact" and walked.messages_deleted >= 100


def test_a_leaf_is_compacted_by_detach_and_attach_keeping_its_bound_indexes_and_triggers(
        conn: Conn, dsn: str) -> None:
    conn.execute(LEAVES)
    live = conn.execute("SELECT id FROM events WHERE processed_at IS NULL ORDER BY id").fetchall()
    before = conn.execute(LEAF_CATALOG).fetchone()
    result = collect(dsn, GcOptions(table=TableSpec(name="events_1", schema="public"), strategy="compact"))
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.messages_deleted == 1600  # the leaf's garbage (2,000 rows, 400 live); events_2 untouched
    assert conn.execute(LEAF_CATALOG).fetchone() == before
    assert conn.execute("SELECT count(*) FROM events_2").fetchone()[0] == 2000
    assert conn.execute("SELECT id FROM events WHERE processed_at IS NULL ORDER BY id").fetchall() == live
    conn.execute("INSERT INTO events VALUES (9001, '2026-01-01', 'new', NULL)")  # routed into the new leaf
    routed = conn.execute("SELECT tableoid::regclass::text FROM events WHERE id = 9001").fetchone()
    assert routed == ("events_1",)
    assert conn.execute("SELECT count(*) FROM event_log WHERE id = 9001").fetchone()[0] == 1  # cloned once
    assert leftovers(conn) == []


def test_a_leaf_whose_parent_has_a_default_partition_is_refused(conn: Conn, dsn: str) -> None:
    conn.execute(LEAVES)
    conn.execute("CREATE TABLE events_other PARTITION OF events DEFAULT")
    with pytest.raises(CompactRefused, match="its parent has a default partition"):
        collect(dsn, GcOptions(table=TableSpec(name="events_1", schema="public"), strategy="compact"))


def test_a_stopped_compaction_leaves_no_walk_to_resume_and_the_next_walk_collects_everything(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, 2000, 4)
    stopped = collect(dsn, options(max_seconds=1e-6))
    assert stopped.status is RunStatus.STOPPED and leftovers(conn) == []
    walk = collect(dsn, GcOptions(table=TableSpec(name="inbox", schema="public")))
    assert walk.status is RunStatus.COMPLETE and walk.messages_deleted == 1500
    resumed = conn.execute("SELECT resumed_from FROM gc_runs WHERE id = %s", (walk.run_id,)).fetchone()
    assert resumed == (None,)


def test_a_compaction_reconnecting_after_another_run_took_the_table_does_not_touch_it(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, 100, 2)
    oid = conn.execute("SELECT 'inbox'::regclass::oid").fetchone()[0]
    with psycopg.connect(dsn, autocommit=True) as other:
        assert runs.try_lock_table(other, oid)
        fresh, held = flow._reconnected(dsn, oid)
        fresh.close()
    assert held is False
