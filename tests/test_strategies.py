"""Each strategy deletes exactly the garbage rows and reports exactly what it deleted."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from engine import collect
from engine.cli_output import summary
from engine.config import GcOptions
from tests.data import fill, live_ids, surviving_ids
from tests.polling import wait_until


@pytest.mark.parametrize("strategy", ["physical", "index", "key", "auto"])
@pytest.mark.parametrize("garbage_share", [0.8, 0.01])
def test_strategy_deletes_exactly_the_garbage(conn, dsn, strategy, garbage_share):
    rng = random.Random(42)
    garbage = [rng.random() < garbage_share for _ in range(5000)]
    fill(conn, garbage)

    result = collect(dsn, GcOptions(strategy=strategy, batch_size=97))

    assert result.status == "complete"
    assert surviving_ids(conn) == live_ids(garbage)
    assert result.messages_deleted == sum(garbage)


@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_parallel_workers_split_the_table_and_count_each_row_once(conn, dsn, strategy):
    garbage = [i % 3 != 0 for i in range(6000)]
    fill(conn, garbage)

    result = collect(dsn, GcOptions(strategy=strategy, workers=3, batch_size=200))

    assert result.status == "complete"
    assert surviving_ids(conn) == live_ids(garbage)
    assert result.messages_deleted == sum(garbage)
    runs = conn.execute("SELECT messages_deleted, cursor FROM gc_runs").fetchall()
    assert runs[0][0] == sum(garbage)
    assert len(runs[0][1]["slices"]) == 3


@pytest.mark.parametrize("workers", [1, 3])
def test_a_key_walk_over_a_key_with_wide_gaps_deletes_exactly_the_garbage(conn, dsn, workers):
    """Nine keys in ten gone: the key is not dense, its ranges are bounded by the index probe."""
    rng = random.Random(7)
    garbage = [rng.random() < 0.6 for _ in range(20000)]
    fill(conn, garbage)
    conn.execute("DELETE FROM messages WHERE id % 10 <> 0")
    conn.execute("ANALYZE messages")
    kept = [i for i in live_ids(garbage) if i % 10 == 0]

    result = collect(dsn, GcOptions(strategy="key", workers=workers, batch_size=37))

    assert result.status == "complete"
    assert surviving_ids(conn) == kept
    assert result.messages_deleted == sum(flag for i, flag in enumerate(garbage, start=1) if i % 10 == 0)


def test_retention_keeps_rows_processed_more_recently(conn, dsn):
    garbage = [True] * 100
    ages = [10.0] * 50 + [0.5] * 50
    fill(conn, garbage, processed_days_ago=ages)

    from datetime import timedelta

    result = collect(dsn, GcOptions(older_than=timedelta(days=2)))

    assert result.messages_deleted == 50
    assert surviving_ids(conn) == list(range(51, 101))


def test_auto_picks_key_ranges_in_heap_order_else_physical_on_dense_and_index_on_sparse(conn, dsn):
    """Dense garbage: key ranges when the key follows the heap's order (no sweep needed after),
    the heap walk when rows are scattered over it; sparse garbage: the partial index."""
    fill(conn, [i % 10 != 0 for i in range(20000)])
    assert collect(dsn, GcOptions(dry_run=True)).strategy == "key"
    conn.execute("CREATE TEMP TABLE shuffled AS SELECT * FROM messages ORDER BY md5(id::text)")
    conn.execute("DELETE FROM messages")
    conn.execute("INSERT INTO messages SELECT * FROM shuffled")
    conn.execute("VACUUM ANALYZE messages")
    assert collect(dsn, GcOptions(dry_run=True)).strategy == "physical"
    conn.execute("DELETE FROM messages WHERE id % 1000 <> 0 AND processed_at IS NOT NULL")
    conn.execute("UPDATE messages SET processed_at = NULL WHERE id % 100 <> 0")
    conn.execute("VACUUM ANALYZE messages")
    assert collect(dsn, GcOptions(dry_run=True)).strategy == "index"


def test_auto_plans_with_what_a_foreign_table_has(conn, dsn):
    """A messages table msggc did not create, without the partial index, is still collected:
    by key ranges, its key following the heap's order."""
    conn.execute("DROP INDEX ix_messages_garbage")
    garbage = [i % 50 == 0 for i in range(3000)]
    fill(conn, garbage)

    result = collect(dsn, GcOptions())

    assert result.strategy == "key"
    assert surviving_ids(conn) == live_ids(garbage)


def test_dry_run_deletes_nothing_and_estimates_the_garbage(conn, dsn):
    garbage = [i % 5 != 0 for i in range(10000)]
    fill(conn, garbage)

    result = collect(dsn, GcOptions(dry_run=True, batch_size=1000))

    assert result.status == "dry-run"
    assert len(surviving_ids(conn)) == 10000
    assert result.garbage_estimate == pytest.approx(8000, rel=0.05)
    assert result.planned_batches == pytest.approx(8, abs=1)
    assert result.checkpoint_advice is None  # a few MB of WAL against max_wal_size
    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0


@pytest.fixture
def small_max_wal_size(conn) -> Iterator[None]:
    """The server's max_wal_size at its floor (two 16 MB segments) for one test."""
    conn.execute("ALTER SYSTEM SET max_wal_size = '32MB'")
    conn.execute("SELECT pg_reload_conf()")
    try:
        wait_until(lambda: conn.execute("SELECT current_setting('max_wal_size')").fetchone()[0] == "32MB",
                   timeout_s=5, what="the server to reload max_wal_size")
        yield
    finally:
        conn.execute("ALTER SYSTEM RESET max_wal_size")
        conn.execute("SELECT pg_reload_conf()")


def test_dry_run_says_how_many_checkpoints_the_runs_wal_forces_and_how_to_avoid_them(
        conn, dsn, small_max_wal_size):
    fill(conn, [True] * 150000)

    conn.execute("CHECKPOINT")  # the sample batches write full-page images, as the run's would

    result = collect(dsn, GcOptions(dry_run=True))

    advice = result.checkpoint_advice
    between = advice["wal_between_checkpoints_bytes"]
    assert advice["max_wal_size_bytes"] == 32 * 2**20
    assert advice["forced_checkpoints"] == result.predicted_wal_bytes // between >= 1
    assert advice["max_wal_size_to_avoid_them_bytes"] > result.predicted_wal_bytes
    assert advice["timed_wal_rate_bytes_per_s"] < between
    printed = summary(result)
    assert f"its WAL forces ~{advice['forced_checkpoints']} checkpoints (one every" in printed
    assert f"--max-wal-rate {advice['timed_wal_rate_bytes_per_s'] // 1024}KB" in printed
    assert len(surviving_ids(conn)) == 150000


@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_dry_run_prediction_comes_from_rolled_back_samples(conn, dsn, strategy):
    garbage = [i % 4 != 0 for i in range(20000)]
    fill(conn, garbage)

    result = collect(dsn, GcOptions(dry_run=True, strategy=strategy))

    assert len(surviving_ids(conn)) == 20000
    assert result.predicted_seconds > 0
    # a delete writes WAL for every row: at least ~50 bytes each
    assert result.predicted_wal_bytes > 50 * result.garbage_estimate
