"""Space reclaim: what a run leaves behind, what --vacuum gives back, and how status reports both."""

from __future__ import annotations

import json

import psycopg
import pytest

from engine import collect
from engine.config import GcOptions
from tests.data import fill, live_ids, surviving_ids
from tests.support import run_cli


def fill_settled(conn: psycopg.Connection, garbage: list[bool]) -> None:
    """:func:`fill`, with its inserts already counted in pg_stat_user_tables.

    A session publishes its counts up to a second late; were the fill's inserts published after its
    ANALYZE, or after the run's VACUUM, live tuples would be counted twice. Autovacuum is off on the
    table: woken by the run's dead tuples, it would reset their count before the report reads it.
    """
    conn.execute("ALTER TABLE messages SET (autovacuum_enabled = off)")
    fill(conn, garbage)
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("ANALYZE messages")


def stats(conn: psycopg.Connection) -> tuple[int, int]:
    """(live, dead) tuples of messages as pg_stat_user_tables shows them to a new session."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables"
                        " WHERE relname = 'messages'").fetchone()


def test_vacuum_run_reports_dead_tuples_and_sizes_before_and_after_and_gives_space_back(conn, dsn):
    live, garbage_rows = 20_000, 20_000
    garbage = [False] * live + [True] * garbage_rows  # garbage at the end: VACUUM can truncate it

    fill_settled(conn, garbage)
    result = collect(dsn, GcOptions(vacuum=True))

    assert result.status == "complete"
    assert surviving_ids(conn) == live_ids(garbage)
    space = result.reclaim
    before, after_gc, after_vacuum = space["before"], space["after_gc"], space["after_vacuum"]
    assert before["dead_tuples"] == 0
    # The run's own deletes are in the report at once (no one-second statistics lag).
    assert after_gc["dead_tuples"] == garbage_rows
    assert after_gc["live_tuples"] == live
    assert after_gc["table_bytes"] == before["table_bytes"], "DELETE alone frees no space"
    assert space["vacuum_s"] > 0
    assert after_vacuum["dead_tuples"] == 0
    assert after_vacuum["live_tuples"] == live
    assert after_vacuum["last_vacuum"] is not None
    assert after_vacuum["table_bytes"] < 0.6 * after_gc["table_bytes"]
    assert after_vacuum["index_bytes"] == after_gc["index_bytes"], "VACUUM never shrinks index files"

    stored = conn.execute("SELECT reclaim FROM gc_runs WHERE id = %s", (result.run_id,)).fetchone()[0]
    assert stored == json.loads(json.dumps(space))


def test_vacuum_leaves_statistics_that_match_the_table(conn, dsn):
    """The run's deletes must reach the statistics before VACUUM resets them, not after."""
    fill_settled(conn, [i % 2 == 0 for i in range(20_000)])

    collect(dsn, GcOptions(vacuum=True))

    conn.execute("SELECT pg_sleep(1.2)")  # longer than a backend may hold its statistics back
    assert stats(conn) == (10_000, 0)


def test_run_without_vacuum_reports_what_it_left_and_leaves_it(conn, dsn):
    fill_settled(conn, [i % 4 == 0 for i in range(8_000)])

    result = collect(dsn, GcOptions())

    assert set(result.reclaim) == {"before", "after_gc"}
    assert result.reclaim["after_gc"]["dead_tuples"] == 2_000
    assert result.reclaim["after_gc"]["last_vacuum"] is None


def test_pgstattuple_free_space_is_reported_when_installed(conn, dsn):
    # Asked, not tried: 16.2 answers CREATE EXTENSION of a missing contrib with 0A000, not 58P01.
    if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgstattuple'").fetchone() is None:
        pytest.skip("the server has no pgstattuple extension (contrib not installed)")
    conn.execute("CREATE EXTENSION pgstattuple")
    fill(conn, [i % 2 == 0 for i in range(20_000)])  # every other row: pages half empty, none truncated

    space = collect(dsn, GcOptions(vacuum=True)).reclaim

    after_gc, after_vacuum = space["after_gc"], space["after_vacuum"]
    assert after_gc["dead_tuple_percent"] > 30
    assert after_vacuum["dead_tuple_percent"] == 0
    assert after_vacuum["free_percent"] > 30 > after_gc["free_percent"]
    # Without truncation VACUUM returns nothing to the OS (it even adds free-space and visibility maps).
    assert after_vacuum["table_bytes"] >= after_gc["table_bytes"]


@pytest.mark.slow
def test_status_json_shows_throttling_and_reclaim_of_a_cli_run(conn, dsn):
    fill_settled(conn, [i % 2 == 0 for i in range(20_000)])

    gc = run_cli("gc", "--dsn", dsn, "--batch-size", "500", "--max-wal-rate", "256KB", "--vacuum", "--json",
                 "--max-seconds", "15")
    # 3: stopped by --max-seconds, when other sessions of a shared server used up the WAL budget.
    assert gc.returncode in (0, 3), gc.stdout + gc.stderr
    result = json.loads(gc.stdout)
    status = run_cli("status", "--dsn", dsn, "--json")
    assert status.returncode == 0, status.stderr
    [run] = json.loads(status.stdout)

    assert run["messages_deleted"] == result["messages_deleted"] > 0
    assert result["throttle_pauses"] > 0
    assert result["throttle_reasons"] == {"wal_rate": result["throttle_pauses"]}
    assert run["throttle_pauses"] == result["throttle_pauses"]
    assert run["throttled_seconds"] == pytest.approx(result["throttled_s"])
    assert run["throttled_seconds"] > 0.5
    assert run["reclaim"] == result["reclaim"]
    assert run["reclaim"]["after_gc"]["dead_tuples"] == result["messages_deleted"]
    assert run["reclaim"]["after_vacuum"]["dead_tuples"] == 0


def test_vacuum_by_a_role_that_does_not_own_the_table_says_it_was_skipped_and_why(conn, dsn, role_dsn):
    """PostgreSQL skips such a VACUUM with a warning and succeeds: the report must not read as a
    VACUUM that found nothing to reclaim (``vacuum 0.0s: dead tuples N -> N``)."""
    fill_settled(conn, [i % 2 == 0 for i in range(4_000)])
    deleter = role_dsn("GRANT SELECT, DELETE ON messages TO {role}",
                       "GRANT SELECT, INSERT, UPDATE, DELETE ON gc_runs, gc_outbox, gc_sweep TO {role}")
    role = conn.execute("SELECT usename FROM pg_user WHERE usename LIKE 'msggc_role_%'").fetchone()[0]
    why = (f"role {role} does not own table messages: only its owner, the database's owner or a superuser"
           " may VACUUM it (PostgreSQL skips it with a warning)")

    gc = run_cli("gc", "--dsn", deleter, "--vacuum", "--json")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    space = json.loads(gc.stdout)["reclaim"]
    assert space["vacuum_skipped"] == why
    assert "vacuum_s" not in space and "after_vacuum" not in space
    assert space["after_gc"]["dead_tuples"] == 2_000
    assert stats(conn)[1] == 2_000, "nothing was vacuumed"
    stored = conn.execute("SELECT reclaim FROM gc_runs ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert stored["vacuum_skipped"] == why  # `msggc status --json` and the API's GET show it too

    conn.execute("INSERT INTO messages (message_id, chat_id, direction, status, payload, processed_at)"
                 " SELECT 'late.' || g, 'c', 1, 2, 'p', now() FROM generate_series(1, 10) g")
    line = run_cli("gc", "--dsn", deleter, "--vacuum")
    assert line.returncode == 0, line.stderr
    assert line.stdout.startswith("complete: deleted 10 rows")
    assert line.stdout.rstrip().endswith(f"; vacuum skipped: {why}"), line.stdout
    assert "vacuum 0.0s" not in line.stdout
