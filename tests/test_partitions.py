"""Partitioned tables are walked leaf by leaf (a ctid means nothing across leaves): each leaf with
the walk that fits it, checkpointed and resumed per leaf, workers spread over the leaves."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from engine import collect, partitions, runs
from engine.config import GcOptions, TableSpec
from engine.planner import DROP_WHOLE_REASON
from engine.status import RunStatus
from tests.polling import wait_until
from tests.support import run_cli

LAYOUTS = {
    "range": ("PARTITION BY RANGE (day)", [
        "FOR VALUES FROM (0) TO (4)", "FOR VALUES FROM (4) TO (8)", "FOR VALUES FROM (8) TO (12)"]),
    "list": ("PARTITION BY LIST (day)", [
        "FOR VALUES IN (0, 1, 2, 3)", "FOR VALUES IN (4, 5, 6, 7)", "DEFAULT"]),
    "hash": ("PARTITION BY HASH (id)", [
        f"FOR VALUES WITH (MODULUS 3, REMAINDER {r})" for r in range(3)]),
}


def make_partitioned(conn, layout: str, rows: int = 3000) -> None:
    """``inbox`` partitioned as asked: days 0..11, the oldest days wholly processed, the rest a
    fifth; a primary key that includes the partition key, as PostgreSQL requires."""
    partition_by, bounds = LAYOUTS[layout]
    conn.execute(f"CREATE TABLE inbox (id bigint NOT NULL, day int NOT NULL, processed_at timestamptz,"
                 f" body text, PRIMARY KEY (id, day)) {partition_by}")
    for number, bound in enumerate(bounds):
        conn.execute(f"CREATE TABLE inbox_p{number} PARTITION OF inbox {bound}")
    conn.execute("INSERT INTO inbox SELECT g, g %% 12, CASE WHEN g %% 12 < 6 OR g %% 5 = 0 THEN now() END,"
                 " repeat('b', 40) FROM generate_series(1, %s) g", (rows,))
    conn.execute("ANALYZE inbox")


def survivors(conn) -> tuple[int, str]:
    row = conn.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM inbox t"
                       " WHERE processed_at IS NULL").fetchone()
    left = conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0]
    assert left == 0, f"{left} garbage rows left"
    return row


def expected_survivors(conn) -> tuple[int, str]:
    return conn.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM inbox t"
                        " WHERE processed_at IS NULL").fetchone()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("strategy", "workers"), [("auto", 1), ("physical", 2), ("index", 3)])
def test_every_leaf_is_collected_exactly_and_counted_per_partition(conn, dsn, layout, strategy, workers):
    make_partitioned(conn, layout)
    garbage = conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0]
    per_leaf = dict(conn.execute("SELECT 'public.' || tableoid::regclass::text, count(*) FROM inbox"
                                 " WHERE processed_at IS NOT NULL GROUP BY 1").fetchall())
    kept = expected_survivors(conn)

    result = collect(dsn, GcOptions(table=TableSpec(name="inbox"), strategy=strategy, workers=workers,
                                    batch_size=100))

    assert result.status is RunStatus.COMPLETE and result.messages_deleted == garbage
    assert {leaf: part["deleted"] for leaf, part in result.partitions.items()} == {
        leaf: per_leaf.get(leaf, 0) for leaf in result.partitions}
    assert len(result.partitions) == 3
    assert survivors(conn) == kept
    assert conn.execute("SELECT messages_deleted FROM gc_runs").fetchone()[0] == garbage


def test_nested_partitions_are_walked_down_to_their_leaves(conn, dsn):
    conn.execute("CREATE TABLE inbox (id bigint NOT NULL, day int NOT NULL, processed_at timestamptz,"
                 " body text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    conn.execute("CREATE TABLE inbox_old PARTITION OF inbox FOR VALUES FROM (0) TO (6)"
                 " PARTITION BY HASH (id)")
    for r in range(2):
        conn.execute(f"CREATE TABLE inbox_old_{r} PARTITION OF inbox_old"
                     f" FOR VALUES WITH (MODULUS 2, REMAINDER {r})")
    conn.execute("CREATE TABLE inbox_new PARTITION OF inbox FOR VALUES FROM (6) TO (12)")
    conn.execute("INSERT INTO inbox SELECT g, g %% 12, CASE WHEN g %% 3 > 0 THEN now() END, 'b'"
                 " FROM generate_series(1, %s) g", (1200,))
    kept = expected_survivors(conn)
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox")))
    assert result.status is RunStatus.COMPLETE and result.messages_deleted == 800
    assert sorted(result.partitions) == ["public.inbox_new", "public.inbox_old_0", "public.inbox_old_1"]
    assert survivors(conn) == kept


def test_a_stopped_partitioned_walk_resumes_leaf_by_leaf_and_takes_in_new_leaves(conn, dsn):
    make_partitioned(conn, "range")
    kept = expected_survivors(conn)
    garbage = conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0]
    first = collect(dsn, GcOptions(table=TableSpec(name="inbox"), batch_size=50, max_rows=700))
    assert first.status is RunStatus.STOPPED
    conn.execute("CREATE TABLE inbox_p3 PARTITION OF inbox FOR VALUES FROM (12) TO (16)")
    conn.execute("INSERT INTO inbox SELECT 100000 + g, 12, now(), 'new leaf' FROM generate_series(1, 30) g")

    second = collect(dsn, GcOptions(table=TableSpec(name="inbox"), batch_size=50))

    assert second.status is RunStatus.COMPLETE and second.resumed_from == first.run_id
    assert second.partitions["public.inbox_p3"]["deleted"] == 30
    assert first.messages_deleted + second.messages_deleted == garbage + 30
    assert survivors(conn) == kept


def test_referenced_rows_of_a_leaf_are_kept_and_counted(conn, dsn):
    make_partitioned(conn, "range")
    conn.execute("CREATE TABLE replies (id serial PRIMARY KEY, inbox_id bigint, inbox_day int,"
                 " FOREIGN KEY (inbox_id, inbox_day) REFERENCES inbox (id, day))")
    conn.execute("INSERT INTO replies (inbox_id, inbox_day) SELECT id, day FROM inbox"
                 " WHERE processed_at IS NOT NULL ORDER BY id LIMIT 7")
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox")))
    assert result.status is RunStatus.COMPLETE
    assert sum(result.kept_referenced.values()) == 7
    assert conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0] == 7


def test_dry_run_plans_each_leaf_and_says_how(conn, dsn):
    make_partitioned(conn, "list")
    done = run_cli("gc", "--dsn", dsn, "--table", "inbox", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reason"].startswith("partitioned: 3 leaves, 3 walked (")
    assert set(result["partitions"]) == {"public.inbox_p0", "public.inbox_p1", "public.inbox_p2"}
    assert all(part["strategy"] in ("physical", "index") for part in result["partitions"].values())


def make_daily(conn, days: int = 6, rows_per_day: int = 200, garbage_days: int = 3) -> None:
    """``inbox`` by day: the oldest ``garbage_days`` wholly processed, the others a fifth."""
    conn.execute("CREATE TABLE inbox (id bigint NOT NULL, day int NOT NULL, processed_at timestamptz,"
                 " body text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    for day in range(days):
        conn.execute(f"CREATE TABLE inbox_d{day} PARTITION OF inbox FOR VALUES FROM ({day}) TO ({day + 1})")
    conn.execute("INSERT INTO inbox SELECT g, g %% %(days)s,"
                 " CASE WHEN g %% %(days)s < %(old)s OR g %% 5 = 0 THEN now() END, 'b'"
                 " FROM generate_series(1, %(rows)s) g",
                 {"days": days, "old": garbage_days, "rows": days * rows_per_day})
    conn.execute("ANALYZE inbox")


def leaves(conn) -> list[str]:
    return [name for (name,) in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'inbox'::regclass ORDER BY 1")]


def test_wholly_garbage_leaves_are_dropped_and_counted_the_rest_walked(conn, dsn):
    make_daily(conn)
    kept = expected_survivors(conn)
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox")))
    assert result.status is RunStatus.COMPLETE
    assert leaves(conn) == ["inbox_d3", "inbox_d4", "inbox_d5"]
    dropped = {leaf for leaf, part in result.partitions.items() if part["dropped"]}
    assert dropped == {"public.inbox_d0", "public.inbox_d1", "public.inbox_d2"}
    assert all(result.partitions[leaf]["deleted"] == 200 for leaf in dropped)
    assert result.messages_deleted == 3 * 200 + 3 * 40
    assert survivors(conn) == kept


def test_no_drop_walks_every_leaf_row_by_row_to_the_same_rows(conn, dsn):
    make_daily(conn)
    kept = expected_survivors(conn)
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox"), no_drop=True))
    assert result.status is RunStatus.COMPLETE and not any(p["dropped"] for p in result.partitions.values())
    assert len(leaves(conn)) == 6 and result.messages_deleted == 3 * 200 + 3 * 40
    assert survivors(conn) == kept


def test_a_leaf_with_one_live_row_and_the_newest_leaf_are_never_dropped(conn, dsn):
    make_daily(conn, garbage_days=6)
    conn.execute("UPDATE inbox SET processed_at = NULL WHERE id = (SELECT min(id) FROM inbox_d1)")
    kept = expected_survivors(conn)
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox")))
    # d1 keeps a live row; d5, the newest, still receives the application's rows
    assert leaves(conn) == ["inbox_d1", "inbox_d5"]
    assert survivors(conn) == kept and result.status is RunStatus.COMPLETE


APP_WRITES = {
    "insert": "INSERT INTO inbox VALUES (999999, 0, NULL, 'late')",
    "unprocess": "UPDATE inbox SET processed_at = NULL, body = 'late', id = 999999"
                 " WHERE id = (SELECT min(id) FROM inbox_d0)",
}


@pytest.mark.parametrize("write", sorted(APP_WRITES))
def test_a_row_written_live_while_the_leaf_waits_to_be_dropped_keeps_it_and_is_not_lost(conn, dsn, write):
    """The drop locks the table before the leaf's last read: the application's write, not yet
    committed, holds it off; once committed, the read finds the live row."""
    make_daily(conn)
    app = psycopg.connect(dsn)  # the application: a live row, not yet committed
    app.execute(APP_WRITES[write])
    done: list[Any] = []
    gc = threading.Thread(target=lambda: done.append(collect(dsn, GcOptions(table=TableSpec(name="inbox")))))
    gc.start()
    wait_until(lambda: conn.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'msggc'"
                                    " AND query LIKE 'LOCK TABLE ONLY %'").fetchone(),
               what="the drop to lock the leaf")
    app.commit()
    app.close()
    gc.join(60)
    assert done and done[0].status is RunStatus.COMPLETE
    assert conn.execute("SELECT body FROM inbox WHERE id = 999999").fetchone() == ("late",)
    assert "inbox_d0" in leaves(conn)
    assert conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0] == 0


def test_a_read_held_open_across_the_run_costs_the_first_drop_its_retries_and_the_others_one_try(
        conn, dsn, monkeypatch):
    """A transaction of the application's that read the table holds its lock: the first drop
    backs off five times, then each other leaf tries once before it is walked; the result says
    the planned drops were walked, nothing is left aside."""
    make_daily(conn)
    kept = expected_survivors(conn)
    sleeps: list[float] = []
    monkeypatch.setattr(partitions, "time", SimpleNamespace(sleep=sleeps.append))  # the backoff, not waited
    reader = psycopg.connect(dsn)
    reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    reader.execute("SELECT count(*) FROM inbox")
    try:
        result = collect(dsn, GcOptions(table=TableSpec(name="inbox"), workers=1))
    finally:
        reader.close()
    assert result.status is RunStatus.COMPLETE, result.error
    assert len(sleeps) == partitions.DETACH_ATTEMPTS + 2
    assert not any(part["dropped"] for part in result.partitions.values()) and len(leaves(conn)) == 6
    assert result.reason.endswith("; 3 of the leaves to drop walked row by row instead (the table's lock"
                                  " not granted within lock_timeout, or a row not garbage)")
    assert survivors(conn) == kept


def test_two_workers_drop_many_wholly_garbage_leaves_side_by_side_and_count_them_exactly(conn, dsn):
    make_daily(conn, days=12, rows_per_day=300, garbage_days=9)
    kept = expected_survivors(conn)
    garbage = conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0]
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox"), workers=2))
    assert result.status is RunStatus.COMPLETE, result.error
    assert leaves(conn) == ["inbox_d10", "inbox_d11", "inbox_d9"]
    assert sum(part["dropped"] for part in result.partitions.values()) == 9
    assert result.messages_deleted == garbage
    assert survivors(conn) == kept
    assert conn.execute("SELECT cursor -> 'detaching' FROM gc_runs").fetchone()[0] in (None, {})


def test_a_leaf_with_scarce_garbage_is_walked_by_its_sweep_alone(conn, dsn):
    """Every leaf is swept after its walk; where garbage is scarce the sweep's one read is the walk."""
    make_daily(conn, days=4, rows_per_day=500, garbage_days=0)
    conn.execute("UPDATE inbox SET processed_at = NULL WHERE day = 3 AND id % 100 <> 3")
    conn.execute("ANALYZE inbox")
    kept = expected_survivors(conn)
    scarce = conn.execute("SELECT count(*) FROM inbox_d3 WHERE processed_at IS NOT NULL").fetchone()[0]
    result = collect(dsn, GcOptions(table=TableSpec(name="inbox")))
    assert result.status is RunStatus.COMPLETE
    assert result.partitions["public.inbox_d3"] == {"strategy": "sweep", "deleted": scarce, "dropped": False}
    assert result.partitions["public.inbox_d0"]["strategy"] == "physical"
    assert survivors(conn) == kept


def left_detached_by_an_earlier_version(conn, dsn: str, leaf: str, *, concurrently: bool = False) -> int:
    """What a run of a version that detached and dropped in two steps left when it was killed
    between them: the leaf recorded in its run's cursor, then detached (or, ``concurrently``,
    left pending detach: its ``DETACH ... CONCURRENTLY`` killed while an old snapshot held it)."""
    run = collect(dsn, GcOptions(table=TableSpec(name="inbox"), no_drop=True, max_rows=10, batch_size=10))
    assert run.status is RunStatus.STOPPED
    bound = conn.execute("SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = %s",
                         (leaf,)).fetchone()[0]
    conn.execute("UPDATE gc_runs SET cursor = jsonb_set(cursor, '{detaching}', jsonb_build_object(%s::text,"
                 " jsonb_build_object('leaf', %s::text, 'parent', 'public.inbox', 'bound', %s::text)))"
                 " WHERE id = %s", (f"public.{leaf}", f"public.{leaf}", bound, run.run_id))
    if not concurrently:
        conn.execute(f"ALTER TABLE inbox DETACH PARTITION {leaf}")
        return run.run_id
    reader = psycopg.connect(dsn)  # an old snapshot: the concurrent detach waits for it
    reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    reader.execute("SELECT count(*) FROM inbox")
    detacher = psycopg.connect(dsn, autocommit=True)
    pid = detacher.info.backend_pid

    def detach() -> None:
        with pytest.raises(psycopg.OperationalError):  # killed while it waits
            detacher.execute(f"ALTER TABLE inbox DETACH PARTITION {leaf} CONCURRENTLY")

    waiting = threading.Thread(target=detach)
    waiting.start()
    wait_until(lambda: conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s"
                                    " AND wait_event_type = 'Lock'", (pid,)).fetchone(),
               what="the concurrent detach to wait")
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    waiting.join()
    reader.close()
    assert conn.execute("SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = %s::regclass",
                        (leaf,)).fetchone() == (True,)
    return run.run_id


def unfinished_leaves(conn) -> list[Any]:
    return conn.execute("SELECT c.relname FROM pg_class c WHERE c.relname LIKE 'inbox_d%'"
                        " AND c.relkind = 'r' AND NOT EXISTS (SELECT 1 FROM pg_inherits i"
                        "  WHERE i.inhrelid = c.oid AND NOT i.inhdetachpending)").fetchall()


@pytest.mark.parametrize("concurrently", [False, True], ids=["detached", "pending"])
@pytest.mark.parametrize("flags", [{}, {"no_drop": True}, {"archive_to": "archive.csv.gz"}],
                         ids=["default", "no-drop", "archive-to"])
def test_a_leaf_an_earlier_version_left_detached_is_attached_again_by_the_next_run_whatever_its_flags(
        conn, dsn, tmp_path, flags, concurrently):
    make_daily(conn)
    kept = expected_survivors(conn)
    left_detached_by_an_earlier_version(conn, dsn, "inbox_d2", concurrently=concurrently)
    if "archive_to" in flags:
        flags = {"archive_to": str(tmp_path / flags["archive_to"])}
    again = collect(dsn, GcOptions(table=TableSpec(name="inbox"), **flags))
    assert again.status is RunStatus.COMPLETE, again.error
    assert unfinished_leaves(conn) == [] and runs.unfinished_detaches(conn) == []
    assert survivors(conn) == kept
    assert conn.execute("SELECT sum(messages_deleted) FROM gc_runs").fetchone()[0] == 3 * 200 + 3 * 40


@pytest.mark.parametrize("flags", [{}, {"no_drop": True}], ids=["default", "no-drop"])
def test_rows_a_default_partition_took_while_a_leaf_was_detached_move_back_when_it_is_attached_again(
        conn, dsn, flags):
    make_daily(conn)
    conn.execute("CREATE TABLE inbox_rest PARTITION OF inbox DEFAULT")
    kept = expected_survivors(conn)
    left_detached_by_an_earlier_version(conn, dsn, "inbox_d1")
    conn.execute("INSERT INTO inbox VALUES (900001, 1, NULL, 'while detached'), (900002, 1, now(), 'old')")
    assert conn.execute("SELECT tableoid::regclass::text FROM inbox WHERE id = 900001").fetchone() == (
        "inbox_rest",)
    again = collect(dsn, GcOptions(table=TableSpec(name="inbox"), **flags))
    assert again.status is RunStatus.COMPLETE, again.error
    assert conn.execute("SELECT tableoid::regclass::text, body FROM inbox WHERE id >= 900000").fetchall() == [
        ("inbox_d1", "while detached")]
    assert conn.execute("SELECT count(*) FROM inbox_rest").fetchone()[0] == 0
    assert unfinished_leaves(conn) == []
    assert survivors(conn)[0] == kept[0] + 1
    assert conn.execute("SELECT sum(messages_deleted) FROM gc_runs").fetchone()[0] == 3 * 200 + 3 * 40 + 1


def test_a_leaf_left_pending_that_cannot_be_finalized_fails_the_run_in_one_line_and_status_shows_it(
        conn, dsn):
    make_daily(conn)
    left_detached_by_an_earlier_version(conn, dsn, "inbox_d2", concurrently=True)
    reader = psycopg.connect(dsn)  # holds the leaf: FINALIZE waits for it past lock_timeout
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM inbox_d2")
    try:
        done = run_cli("gc", "--dsn", dsn, "--table", "inbox", "--lock-timeout-ms", "20")
    finally:
        reader.close()
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "msggc: error: public.inbox_d2, left detached by an earlier run, could not finalize its pending"
        " detach: the application held its locks past lock_timeout (20 ms) 5 times; nothing is lost,"
        " and the next run tries again first"]
    status = run_cli("status", "--dsn", dsn)
    assert "public.inbox_d2 of public.inbox: pending detach" in status.stdout
    assert collect(dsn, GcOptions(table=TableSpec(name="inbox"))).status is RunStatus.COMPLETE
    assert unfinished_leaves(conn) == []


def test_a_role_that_may_delete_but_does_not_own_the_table_walks_every_leaf_row_by_row(conn, dsn, role_dsn):
    make_daily(conn)
    kept = expected_survivors(conn)
    deleter = role_dsn("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    planned = run_cli("gc", "--dsn", deleter, "--table", "inbox", "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["partitions"]["public.inbox_d0"]["why"] == (
        "walked row by row: not a range leaf, owned by this role, that a later leaf with rows follows")
    result = collect(deleter, GcOptions(table=TableSpec(name="inbox")))
    assert result.status is RunStatus.COMPLETE, result.error
    assert not any(part["dropped"] for part in result.partitions.values()) and len(leaves(conn)) == 6
    assert result.messages_deleted == 3 * 200 + 3 * 40
    assert survivors(conn) == kept


def test_dry_run_says_which_leaves_would_be_dropped_and_why(conn, dsn):
    make_daily(conn)
    done = run_cli("gc", "--dsn", dsn, "--table", "inbox", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    planned = json.loads(done.stdout)["partitions"]
    verdicts = {leaf: (part["drop"], part["why"]) for leaf, part in planned.items()}
    assert verdicts["public.inbox_d0"] == (True, DROP_WHOLE_REASON)
    assert verdicts["public.inbox_d4"] == (False, "walked row by row: not all its rows are garbage")
    assert len(leaves(conn)) == 6


def test_dry_run_of_a_plain_table_says_what_a_daily_partitioning_would_drop(conn, dsn):
    conn.execute("CREATE TABLE log (id bigint PRIMARY KEY, created_at timestamptz NOT NULL,"
                 " processed_at timestamptz)")
    conn.execute("INSERT INTO log SELECT g, date '2026-11-01' + (g % 10) * interval '1 day',"
                 " CASE WHEN g % 10 < 4 OR g % 3 = 0 THEN now() END FROM generate_series(1, 1000) g")
    done = run_cli("gc", "--dsn", dsn, "--table", "log", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["partitioning_advice"] == {
        "column": "created_at", "interval": "day", "partitions": 10, "droppable": 4, "rows": 400}


def test_an_application_writing_into_the_leaves_being_dropped_for_the_whole_run_loses_nothing(conn, dsn):
    """While the run detaches and drops the wholly-garbage days, the application inserts live
    rows into those very days and un-processes some of their rows, all run long: every row it
    wrote or un-processed is still there after, and no other garbage is left."""
    make_daily(conn, days=8, rows_per_day=300, garbage_days=5)
    stop = threading.Event()
    written: list[int] = []
    app = psycopg.connect(dsn, autocommit=True)

    def application() -> None:
        next_id = 100_000
        while not stop.is_set():
            day = next_id % 5
            try:
                app.execute("INSERT INTO inbox VALUES (%s, %s, NULL, 'live')", (next_id, day))
                written.append(next_id)
            except psycopg.errors.CheckViolation:
                pass  # its day was dropped: the application is told, nothing is lost
            row = app.execute("UPDATE inbox SET processed_at = NULL, body = 'kept' WHERE (id, day) ="
                              " (SELECT id, day FROM inbox WHERE day = %s AND processed_at IS NOT NULL"
                              "  LIMIT 1) RETURNING id", (day,)).fetchone()
            written.extend(row or ())
            next_id += 1

    thread = threading.Thread(target=application)
    thread.start()
    try:
        wait_until(lambda: len(written) > 20, what="the application to write")
        result = collect(dsn, GcOptions(table=TableSpec(name="inbox"), lock_timeout_ms=50))
    finally:
        stop.set()
        thread.join()
        app.close()
    assert result.status is RunStatus.COMPLETE, result.error
    there = {row[0] for row in conn.execute("SELECT id FROM inbox WHERE processed_at IS NULL")}
    assert set(written) <= there
    assert conn.execute("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL").fetchone()[0] == 0
