"""Budgets, resumption and crashes: every garbage row is deleted once and counted once."""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import collect
from engine.config import GcOptions
from tests.data import fill, live_ids, surviving_ids
from tests.polling import wait_until
from tests.support import spawn_cli


def total_counted(conn) -> int:
    return conn.execute("SELECT coalesce(sum(messages_deleted), 0) FROM gc_runs").fetchone()[0]


@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_budgeted_runs_resume_and_cover_the_whole_table(conn, dsn, strategy):
    garbage = [i % 4 != 0 for i in range(4000)]
    fill(conn, garbage)
    statuses = []
    for _ in range(50):
        result = collect(dsn, GcOptions(strategy=strategy, batch_size=100, max_rows=400))
        statuses.append(result.status)
        if result.status == "complete":
            break
    assert statuses[-1] == "complete"
    assert set(statuses[:-1]) == {"stopped"}
    assert surviving_ids(conn) == live_ids(garbage)
    assert total_counted(conn) == sum(garbage)
    # resumed, not re-scanned: all runs together take about the batches of one walk
    walked = conn.execute("SELECT sum(batches) FROM gc_runs").fetchone()[0]
    assert walked <= sum(garbage) // 100 + len(statuses) + 2


def test_max_seconds_stops_the_run_and_the_next_one_resumes(conn, dsn):
    garbage = [True] * 3000
    fill(conn, garbage)
    first = collect(dsn, GcOptions(batch_size=10, sleep=0.05, max_seconds=0.3))
    assert first.status == "stopped"
    assert first.stop_reason == "max_seconds=0.3"
    assert 0 < first.messages_deleted < 3000
    second = collect(dsn, GcOptions())
    assert second.status == "complete"
    assert first.messages_deleted + second.messages_deleted == 3000
    resumed_from = conn.execute("SELECT resumed_from FROM gc_runs WHERE id = %s", (second.run_id,))
    assert resumed_from.fetchone()[0] == first.run_id


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.lists(st.booleans(), max_size=300),
    strategy=st.sampled_from(["auto", "physical", "index", "key"]),
    batch_size=st.integers(1, 120),
    max_rows=st.one_of(st.none(), st.integers(1, 200)),
    workers=st.integers(1, 3),
)
def test_any_table_and_budget_delete_exactly_the_garbage_once(
    conn, dsn, garbage, strategy, batch_size, max_rows, workers
):
    conn.execute("TRUNCATE messages, gc_sweep, gc_outbox, gc_runs RESTART IDENTITY")
    fill(conn, garbage)
    for _ in range(400):
        options = GcOptions(strategy=strategy, batch_size=batch_size, max_rows=max_rows,
                            workers=workers)
        if collect(dsn, options).status == "complete":
            break
    assert surviving_ids(conn) == live_ids(garbage)
    assert total_counted(conn) == sum(garbage)


def batches_so_far(conn) -> int:
    return conn.execute("SELECT coalesce(max(batches), 0) FROM gc_runs").fetchone()[0]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(conn, dsn):
    garbage = [i % 5 != 0 for i in range(6000)]
    fill(conn, garbage)
    process = spawn_cli("gc", "--dsn", dsn, "--json", "--batch-size", "40", "--sleep", "0.01")
    wait_until(lambda: batches_so_far(conn) >= 5, 20, "the GC subprocess to commit 5 batches")
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    killed_at = conn.execute("SELECT messages_deleted FROM gc_runs").fetchone()[0]
    assert 0 < killed_at < sum(garbage)

    finisher = spawn_cli("gc", "--dsn", dsn, "--json")
    _, err = finisher.communicate(timeout=60)
    assert finisher.returncode == 0, err

    assert surviving_ids(conn) == live_ids(garbage)
    assert total_counted(conn) == sum(garbage)
    statuses = [r[0] for r in conn.execute("SELECT status FROM gc_runs ORDER BY id")]
    assert statuses == ["superseded", "complete"]


@pytest.mark.slow
def test_sigterm_finishes_the_batch_in_flight_and_checkpoints(conn, dsn):
    garbage = [True] * 5000
    fill(conn, garbage)
    process = spawn_cli("gc", "--dsn", dsn, "--json", "--batch-size", "20", "--sleep", "0.02")
    wait_until(lambda: batches_so_far(conn) >= 3, 20, "the GC subprocess to commit 3 batches")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=20)
    assert process.returncode == 3
    gone = sum(garbage) - len(surviving_ids(conn))
    assert conn.execute("SELECT status, messages_deleted FROM gc_runs").fetchone() == ("stopped", gone)
    assert os.linesep not in out.strip()  # one JSON line
