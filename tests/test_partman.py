"""msggc on a table that pg_partman manages: daily range partitions, a default partition, premade
future partitions and pg_partman's template table. Wholly-garbage past leaves are dropped, the
rest walked row by row; maintenance still works afterwards, may run while msggc does, and while
it holds its advisory lock msggc detaches nothing.

Skipped on a server without pg_partman (the embedded one); on Debian: postgresql-NN-partman.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from engine import collect, partitions
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus
from tests.support import run_cli

PAST_DAYS = 6
GARBAGE_DAYS = 3  # the oldest days: every row processed
PREMAKE = 3
ROWS_PER_DAY = 150


@pytest.fixture(autouse=True, scope="module")
def _pg_partman_available(server_dsn: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        available = admin.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman'")
        if available.fetchone() is None:
            pytest.skip("pg_partman is not available on this server (on Debian: apt-get install"
                        " postgresql-15-partman for the PostgreSQL 15 server)")


def make_partman_inbox(conn) -> dict[str, Any]:
    """``inbox`` partitioned by day by pg_partman: ``PAST_DAYS`` days back to today, ``PREMAKE``
    empty days ahead and a default partition. The oldest ``GARBAGE_DAYS`` days are wholly
    processed; the later past days and today a fifth. What the test expects, by leaf name."""
    conn.execute("CREATE SCHEMA partman")
    conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
    version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'").fetchone()[0]
    conn.execute("CREATE TABLE inbox (id bigint NOT NULL, created_at timestamptz NOT NULL,"
                 " processed_at timestamptz, body text, PRIMARY KEY (id, created_at))"
                 " PARTITION BY RANGE (created_at)")
    # v4 needs p_type 'native'; v5 dropped it (its default, 'range', is the same thing)
    p_type = ", p_type => 'native'" if version.startswith("4.") else ""
    conn.execute(f"SELECT partman.create_parent(p_parent_table => 'public.inbox', p_control => 'created_at',"
                 f" p_interval => '1 day', p_premake => %s, p_start_partition => %s{p_type})",
                 (PREMAKE, conn.execute("SELECT (current_date - %s)::text", (PAST_DAYS,)).fetchone()[0]))
    # day -PAST_DAYS .. 0 (today), each row in the middle of its day (today: its first minutes)
    conn.execute(
        "INSERT INTO inbox SELECT g, date_trunc('day', now()) - make_interval(days => d)"
        "   + CASE WHEN d = 0 THEN make_interval(secs => g %% 60) ELSE interval '12 hours' END,"
        " CASE WHEN d > %(fresh)s OR g %% 5 = 0 THEN now() END, 'b'"
        " FROM generate_series(0, %(past)s) d, generate_series(d * %(n)s + 1, (d + 1) * %(n)s) g",
        {"past": PAST_DAYS, "fresh": PAST_DAYS - GARBAGE_DAYS, "n": ROWS_PER_DAY})
    conn.execute("ANALYZE inbox")
    day_leaf = "'inbox_p' || to_char(date_trunc('day', now()) + make_interval(days => d), 'YYYY_MM_DD')"
    old = [name for (name,) in conn.execute(
        f"SELECT {day_leaf} FROM generate_series(-%s::int, -%s::int) d",
        (PAST_DAYS, PAST_DAYS - GARBAGE_DAYS + 1))]
    future = [name for (name,) in conn.execute(
        f"SELECT {day_leaf} FROM generate_series(1, %s) d", (PREMAKE,))]
    per_leaf = dict(conn.execute("SELECT tableoid::regclass::text, count(*) FROM inbox"
                                 " WHERE processed_at IS NOT NULL GROUP BY 1").fetchall())
    assert len(old) == GARBAGE_DAYS and len(future) == PREMAKE
    assert set(old) <= set(leaves(conn)) and set(future) <= set(leaves(conn)), leaves(conn)
    assert {leaf: per_leaf[leaf] for leaf in old} == dict.fromkeys(old, ROWS_PER_DAY)
    return {"version": version, "old": old, "future": future, "per_leaf": per_leaf,
            "garbage": sum(per_leaf.values()), "kept": unprocessed(conn), "leaves": leaves(conn)}


def leaves(conn) -> list[str]:
    return [name for (name,) in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'inbox'::regclass ORDER BY 1")]


def unprocessed(conn) -> tuple[int, str]:
    return conn.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM inbox t"
                        " WHERE processed_at IS NULL").fetchone()


def assert_collected_exactly(conn, setup: dict[str, Any], deleted: int) -> None:
    assert deleted == setup["garbage"]
    assert conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0] == 0
    assert unprocessed(conn) == setup["kept"]
    assert conn.execute("SELECT sum(messages_deleted) FROM gc_runs").fetchone()[0] == setup["garbage"]
    # premade future leaves, the default leaf and the template table are all still there
    assert set(setup["future"]) | {"inbox_default"} <= set(leaves(conn))
    assert conn.execute("SELECT to_regclass('partman.template_public_inbox')").fetchone()[0] is not None


def assert_partman_still_manages_inbox(conn, setup: dict[str, Any]) -> None:
    conn.execute("SELECT partman.run_maintenance(p_analyze := false)")
    assert conn.execute("SELECT control, premake FROM partman.part_config"
                        " WHERE parent_table = 'public.inbox'").fetchone()[0] == "created_at"
    shown = {name for (name,) in conn.execute(
        "SELECT partition_tablename FROM partman.show_partitions('public.inbox')")}
    assert shown == set(leaves(conn)) - {"inbox_default"}
    assert set(setup["future"]) <= shown
    # maintenance still inserts where it should: a row for tomorrow goes to tomorrow's leaf
    conn.execute("INSERT INTO inbox VALUES (0, date_trunc('day', now()) + interval '25 hours', NULL, 'x')")
    leaf = conn.execute("SELECT tableoid::regclass::text FROM inbox WHERE id = 0").fetchone()[0]
    assert leaf == setup["future"][0]


def test_msggc_drops_the_wholly_garbage_past_leaves_of_a_partman_table_and_walks_the_rest(conn, dsn):
    setup = make_partman_inbox(conn)
    done = run_cli("gc", "--dsn", dsn, "--table", "inbox", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    assert result["status"] == "complete"
    dropped = {leaf for leaf, part in result["partitions"].items() if part["dropped"]}
    assert dropped == {f"public.{leaf}" for leaf in setup["old"]}
    assert leaves(conn) == sorted(set(setup["leaves"]) - set(setup["old"]))
    assert {leaf: part["deleted"] for leaf, part in result["partitions"].items()} == {
        leaf: setup["per_leaf"].get(leaf.removeprefix("public."), 0) for leaf in result["partitions"]}
    assert_collected_exactly(conn, setup, result["messages_deleted"])
    assert_partman_still_manages_inbox(conn, setup)
    assert not set(setup["old"]) & set(leaves(conn))  # maintenance does not bring a dropped day back


def test_msggc_completes_exactly_while_partman_maintenance_runs_in_a_loop(conn, dsn):
    setup = make_partman_inbox(conn)
    stop = threading.Event()
    maintenance: dict[str, Any] = {"runs": 0, "skipped": 0, "errors": [], "during_gc": 0}
    gc_running = threading.Event()

    def loop() -> None:
        """Maintenance as a cron would run it, often: each round premakes one more day."""
        def notice(diagnostic: psycopg.errors.Diagnostic) -> None:
            if "already running" in (diagnostic.message_primary or ""):  # its lock was taken: skipped
                maintenance["skipped"] += 1

        with psycopg.connect(dsn, autocommit=True) as session:
            session.add_notice_handler(notice)
            while not stop.is_set():
                try:
                    session.execute("UPDATE partman.part_config SET premake = premake + 1"
                                    " WHERE parent_table = 'public.inbox' AND premake < 20")
                    session.execute("SELECT partman.run_maintenance(p_analyze := false)")
                    maintenance["runs"] += 1
                    maintenance["during_gc"] += gc_running.is_set()
                except psycopg.errors.LockNotAvailable:
                    maintenance["skipped"] += 1
                except psycopg.Error as exc:
                    maintenance["errors"].append(repr(exc))
                time.sleep(0.01)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while maintenance["runs"] < 2 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.01)
        gc_running.set()
        result = collect(dsn, GcOptions(table=TableSpec(name="inbox"), batch_size=25))
        gc_running.clear()
    finally:
        stop.set()
        thread.join(30)

    assert not thread.is_alive() and maintenance["errors"] == []
    assert maintenance["during_gc"] > 0, maintenance
    assert result.status is RunStatus.COMPLETE
    dropped = {leaf for leaf, part in result.partitions.items() if part["dropped"]}
    assert dropped <= {f"public.{leaf}" for leaf in setup["old"]}
    assert set(setup["old"]) - {leaf.removeprefix("public.") for leaf in dropped} <= set(leaves(conn))
    assert {leaf: part["deleted"] for leaf, part in result.partitions.items()} == {
        leaf: setup["per_leaf"].get(leaf.removeprefix("public."), 0) for leaf in result.partitions}
    assert_collected_exactly(conn, setup, result.messages_deleted)
    assert_partman_still_manages_inbox(conn, setup)


def test_msggc_detaches_nothing_while_partman_holds_its_lock_and_walks_the_leaves_instead(
        conn, dsn, monkeypatch):
    setup = make_partman_inbox(conn)
    sleeps: list[float] = []
    detached: list[str] = []
    monkeypatch.setattr(partitions, "time", SimpleNamespace(sleep=sleeps.append))  # the backoff, not waited
    real_drop = partitions.Drop._detach_if_wholly_garbage
    monkeypatch.setattr(partitions.Drop, "_detach_if_wholly_garbage",
                        lambda drop, c: detached.append(drop.leaf) or real_drop(drop, c))
    with psycopg.connect(dsn, autocommit=True) as partman_session:
        partman_session.execute("SELECT pg_advisory_lock(hashtext('pg_partman run_maintenance'))")
        result = collect(dsn, GcOptions(table=TableSpec(name="inbox")))
        partman_session.execute("SELECT pg_advisory_unlock(hashtext('pg_partman run_maintenance'))")

    assert result.status is RunStatus.COMPLETE
    assert detached == [] and len(sleeps) >= partitions.DETACH_ATTEMPTS * len(setup["old"])
    assert not any(part["dropped"] for part in result.partitions.values())
    assert leaves(conn) == setup["leaves"]
    assert all(result.partitions[f"public.{leaf}"]["deleted"] == ROWS_PER_DAY for leaf in setup["old"])
    assert all(conn.execute(f"SELECT count(*) FROM {leaf}").fetchone()[0] == 0 for leaf in setup["old"])
    assert_collected_exactly(conn, setup, result.messages_deleted)
    assert_partman_still_manages_inbox(conn, setup)
