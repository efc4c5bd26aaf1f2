"""Partitioned tables are walked leaf by leaf (a ctid means nothing across leaves): each leaf with
the walk that fits it, checkpointed and resumed per leaf, workers spread over the leaves."""

from __future__ import annotations

import json

import pytest

from engine import collect
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus
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
    assert result["reason"] == "partitioned: 3 leaves walked one by one"
    assert set(result["partitions"]) == {"public.inbox_p0", "public.inbox_p1", "public.inbox_p2"}
    assert all(part["strategy"] in ("physical", "index") for part in result["partitions"].values())
