"""A run's progress in ``gc_runs.progress``: its plan, and samples that end at its exact count."""

from __future__ import annotations

import itertools

import pytest
from psycopg.types.json import Jsonb

from engine import collect, progress
from engine.config import GcOptions
from engine.errors import SchemaMissing
from tests.data import fill


def test_a_run_records_its_plan_and_samples_that_end_at_its_exact_count(conn, dsn):
    garbage = [i % 2 == 0 for i in range(12_000)]
    fill(conn, garbage)

    result = collect(dsn, GcOptions(strategy="key", batch_size=400, sleep=0.1))

    assert result.status == "complete" and result.messages_deleted == sum(garbage)
    recorded = conn.execute("SELECT progress FROM gc_runs WHERE id = %s", (result.run_id,)).fetchone()[0]
    assert recorded["reason"] == result.reason
    assert recorded["garbage_estimate"] == result.garbage_estimate > 0
    assert recorded["deleted_at_plan"] == 0
    series = recorded["series"]
    assert len(series) >= 3, series  # the first, one a second or so (a 1.5 s run), the last
    assert series[0][1] == 0 and series[-1][1] == result.messages_deleted
    for before, after in itertools.pairwise(series):
        assert before[0] <= after[0] and before[1] <= after[1] and before[2] <= after[2]
    assert series[-1][2] > series[0][2]  # deleting wrote WAL
    assert recorded["throttle"]["pauses"] == 0


def test_a_full_series_drops_every_other_point_before_the_next(conn):
    full = [[float(i), i * 10, i * 1000] for i in range(progress.MAX_POINTS)]
    run_id = conn.execute(
        "INSERT INTO gc_runs (table_name, status, started_at, messages_deleted, progress)"
        " VALUES ('public.messages', 'running', now(), 5000, %s) RETURNING id",
        (Jsonb({"series": full, "max_points": progress.MAX_POINTS}),)).fetchone()[0]

    conn.execute(f"UPDATE gc_runs SET progress = {progress.POINT} WHERE id = %s", (run_id,))

    series = conn.execute("SELECT progress -> 'series' FROM gc_runs WHERE id = %s", (run_id,)).fetchone()[0]
    assert series[:-1] == full[::2]
    assert series[-1][1] == 5000


def test_a_database_without_the_progress_column_is_refused_before_any_run(conn, dsn):
    conn.execute("ALTER TABLE gc_runs DROP COLUMN progress")
    fill(conn, [True] * 10)

    with pytest.raises(SchemaMissing, match="run `msggc migrate` first"):
        collect(dsn, GcOptions())

    assert conn.execute("SELECT count(*) FROM gc_runs").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 10
