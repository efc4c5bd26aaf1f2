"""The CLI as a user meets it: real subprocesses, one-line errors, documented exit codes."""

from __future__ import annotations

import json
import subprocess

import psycopg
import pytest

from engine.runs import ADVISORY_LOCK_CLASS
from tests.data import fill, surviving_ids
from tests.support import run_cli


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in proc.stderr


def test_gc_json_reports_the_run_and_exits_zero(conn, dsn):
    fill(conn, [i % 2 == 0 for i in range(1000)])
    proc = run_cli("gc", "--dsn", dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "complete"
    assert result["messages_deleted"] == 500
    assert len(surviving_ids(conn)) == 500


def test_gc_summary_is_one_line(conn, dsn):
    fill(conn, [True] * 100)
    proc = run_cli("gc", "--dsn", dsn)
    assert proc.returncode == 0
    assert proc.stdout.count("\n") == 1
    assert proc.stdout.startswith("complete: deleted 100 rows")


def test_budget_stop_exits_three(conn, dsn):
    fill(conn, [True] * 1000)
    proc = run_cli("gc", "--dsn", dsn, "--batch-size", "10", "--max-rows", "50")
    assert proc.returncode == 3
    assert "stopped on max_rows=50: run again to resume" in proc.stdout


def test_unreachable_dsn_is_a_one_line_error():
    proc = run_cli("gc", "--dsn", "postgresql://postgres:s3cret@127.0.0.1:1/nope")
    assert_one_line_error(proc, "cannot connect to")
    assert "s3cret" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_missing_tables_ask_for_migrate(scratch_dsn):
    proc = run_cli("gc", "--dsn", scratch_dsn)
    assert_one_line_error(proc, "run `msggc migrate` first")


def test_missing_target_table_is_named(conn, dsn):
    proc = run_cli("gc", "--dsn", dsn, "--table", "nosuch")
    assert_one_line_error(proc, "table nosuch does not exist")


def test_table_without_the_expected_columns_is_refused(conn, dsn):
    conn.execute("CREATE TABLE other (id bigint primary key, note text)")
    proc = run_cli("gc", "--dsn", dsn, "--table", "other")
    assert_one_line_error(proc, "has no column 'processed_at'")


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--strategy", "fastest", "Invalid value for '--strategy'"),
        ("--batch-size", "0", "Invalid value for '--batch-size'"),
        ("--max-rows", "-1", "Invalid value for '--max-rows'"),
        ("--max-seconds", "0", "Invalid value for '--max-seconds'"),
        ("--older-than", "soon", "invalid duration 'soon'"),
        ("--workers", "99", "Invalid value for '--workers'"),
        ("--table", "a.", "invalid table name"),
    ],
)
def test_invalid_flags_change_nothing(conn, dsn, flag, value, fragment):
    fill(conn, [True] * 20)
    proc = run_cli("gc", "--dsn", dsn, flag, value)
    assert_one_line_error(proc, fragment)
    assert len(surviving_ids(conn)) == 20


def test_second_gc_on_a_table_exits_four(conn, dsn):
    fill(conn, [True] * 20)
    oid = conn.execute("SELECT 'messages'::regclass::oid::int").fetchone()[0]
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (ADVISORY_LOCK_CLASS, oid))
        proc = run_cli("gc", "--dsn", dsn)
    assert_one_line_error(proc, "another GC is already running on messages", code=4)
    assert len(surviving_ids(conn)) == 20


def test_dry_run_prints_the_plan_and_deletes_nothing(conn, dsn):
    fill(conn, [i % 10 == 0 for i in range(2000)])
    proc = run_cli("gc", "--dsn", dsn, "--dry-run")
    assert proc.returncode == 0
    assert proc.stdout.startswith("dry run: strategy key")
    assert len(surviving_ids(conn)) == 2000


def test_status_lists_recent_runs_as_json(conn, dsn):
    fill(conn, [True] * 5)
    run_cli("gc", "--dsn", dsn)
    proc = run_cli("status", "--dsn", dsn, "--json")
    runs = json.loads(proc.stdout)
    assert [(r["status"], r["messages_deleted"]) for r in runs] == [("complete", 5)]


def test_seed_of_a_schema_qualified_table_fills_it_and_keeps_the_schema_s_other_tables(conn, dsn):
    conn.execute("CREATE SCHEMA app")
    conn.execute("CREATE TABLE app.messages (LIKE public.messages INCLUDING ALL)")
    conn.execute("CREATE TABLE app.contacts (id bigint PRIMARY KEY)")
    conn.execute("INSERT INTO app.contacts VALUES (1), (2)")
    proc = run_cli("seed", "--dsn", dsn, "--table", "app.messages", "--rows", "100")
    assert proc.returncode == 0, proc.stderr
    assert conn.execute("SELECT count(*) FROM app.messages").fetchone()[0] == 100
    assert conn.execute("SELECT count(*) FROM public.messages").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM app.contacts").fetchone()[0] == 2


def test_status_piped_shows_every_column_and_the_whole_error(conn, dsn):
    error = "cannot delete batch: " + " ".join(f"detail{i}" for i in range(40)) + " END-OF-ERROR"
    conn.execute("INSERT INTO gc_runs (node, table_name, status, strategy, started_at, error)"
                 " VALUES ('wacore1:9dfe77618dba', 'app.messages', 'failed', 'physical', now(), %s)",
                 (error,))
    proc = run_cli("status", "--dsn", dsn)  # stdout is a pipe, not a terminal
    assert proc.returncode == 0, proc.stderr
    for header in ("run", "node", "table", "status", "strategy", "deleted", "batches", "throttled",
                   "started", "error"):
        assert header in proc.stdout
    for value in ("wacore1:9dfe77618dba", "app.messages", "failed", "physical", error):
        assert value in proc.stdout


def test_migrate_is_idempotent(dsn):
    proc = run_cli("migrate", "--dsn", dsn)
    assert proc.returncode == 0
    assert "already at revision" in proc.stdout
