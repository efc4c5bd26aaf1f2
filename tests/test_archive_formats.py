"""--archive-to in zstd CSV and parquet: every deleted row in the archive exactly once (after a
crash between a batch's append and its commit too), readable without msggc (parquet), and
put back by restore --file."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import psycopg
import pyarrow.dataset as ds
import pytest
import zstandard

from engine import collect
from engine.archive_formats import members
from engine.config import GcOptions
from tests.data import fill, live_ids, surviving_ids
from tests.support import run_cli
from tests.test_cli import assert_one_line_error


def archived(path: Path) -> list[dict[str, str]]:
    text = "".join(part.decode() for part in members(path))
    return list(csv.DictReader(io.StringIO(text)))


def archived_ids(path: Path) -> list[int]:
    return sorted(int(row["id"]) for row in archived(path))


@pytest.mark.parametrize(("name", "fmt", "strategy", "workers"), [
    ("gone.csv.zst", None, "physical", 1),
    ("gone.csv.zst", "zstd", "index", 1),
    ("gone.parquet", None, "physical", 2),
    ("gone", "parquet", "key", 1),
])
def test_each_deleted_row_is_archived_once_and_restore_puts_them_back(conn, dsn, tmp_path, name, fmt,
                                                                      strategy, workers):
    garbage = [i % 3 != 0 for i in range(3000)]
    fill(conn, garbage)
    before = {row[0]: row[1] for row in conn.execute("SELECT id, payload FROM messages")}
    path = tmp_path / name

    result = collect(dsn, GcOptions(strategy=strategy, workers=workers, batch_size=100,
                                    archive_to=str(path), archive_format=fmt))

    assert result.status == "complete"
    gone = sorted(set(before) - set(live_ids(garbage)))
    rows = archived(path)
    assert sorted(int(row["id"]) for row in rows) == gone
    assert all(row["payload"] == before[int(row["id"])] for row in rows)
    assert {row["run_id"] for row in rows} == {str(result.run_id)}

    proc = run_cli("restore", "--dsn", dsn, "--file", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"restored {len(gone):,} rows" in proc.stdout
    assert surviving_ids(conn) == list(range(1, 3001))
    again = run_cli("restore", "--dsn", dsn, "--file", str(path))
    assert "restored 0 rows" in again.stdout


def test_a_parquet_archive_is_a_dataset_with_the_tables_types_one_part_per_batch(conn, dsn, tmp_path):
    fill(conn, [True] * 1000)
    path = tmp_path / "gone.parquet"
    result = collect(dsn, GcOptions(strategy="key", batch_size=250, archive_to=str(path)))

    table = ds.dataset(path, format="parquet").to_table()
    assert table.num_rows == 1000
    assert str(table.schema.field("id").type) == "int64"
    assert str(table.schema.field("processed_at").type) == "timestamp[us, tz=UTC]"
    assert str(table.schema.field("direction").type) == "int16"
    assert set(table.column("run_id").to_pylist()) == {result.run_id}
    parts = sorted(p.name for p in path.iterdir())
    assert parts[0] == "part-000000.parquet"  # the schema, no rows
    assert len(parts) == 1 + result.batches
    recorded = conn.execute("SELECT archive_bytes FROM gc_runs WHERE id = %s", (result.run_id,)).fetchone()
    assert recorded[0] == len(parts)


def test_a_resumed_zstd_run_cuts_the_frame_of_a_batch_that_never_committed(conn, dsn, tmp_path):
    fill(conn, [True] * 2000)
    path = tmp_path / "gone.csv.zst"
    first = collect(dsn, GcOptions(strategy="index", batch_size=100, max_rows=500, archive_to=str(path)))
    assert first.status == "stopped"
    ghost = "\n".join(f"{i},ghost" for i in range(501, 601)) + "\n"  # a batch that rolled back
    with path.open("ab") as handle:
        handle.write(zstandard.ZstdCompressor().compress(ghost.encode()))

    second = collect(dsn, GcOptions(strategy="index", batch_size=100, archive_to=str(path)))

    assert second.status == "complete"
    assert surviving_ids(conn) == []
    assert archived_ids(path) == list(range(1, 2001))


def test_a_resumed_parquet_run_removes_the_parts_of_batches_that_never_committed(conn, dsn, tmp_path):
    fill(conn, [True] * 2000)
    path = tmp_path / "gone.parquet"
    first = collect(dsn, GcOptions(strategy="key", batch_size=100, max_rows=500, archive_to=str(path)))
    assert first.status == "stopped"
    parts = sorted(path.iterdir())
    # a crash after a part was renamed into place but before its batch committed, and one
    # while a part was still being written
    shutil.copy(parts[-1], path / f"part-{len(parts):06d}.parquet")
    (path / f"part-{len(parts) + 1:06d}.tmp").write_bytes(b"half a part")

    second = collect(dsn, GcOptions(strategy="key", batch_size=100, archive_to=str(path)))

    assert second.status == "complete"
    assert surviving_ids(conn) == []
    assert archived_ids(path) == list(range(1, 2001))
    assert not list(path.glob("*.tmp"))


@pytest.mark.parametrize(("args", "fragment"), [
    (("--archive-to", "x.csv.gz", "--archive-format", "lz4"), "archive format must be one of gzip, zstd"),
    (("--archive-to", "x.csv.gz", "--archive-format", "zstd"), "is named as gzip, not zstd"),
    (("--archive-format", "parquet"), "--archive-format needs --archive-to"),
])
def test_a_bad_archive_format_is_a_one_line_error(conn, dsn, tmp_path, args, fragment):
    fill(conn, [True] * 20)
    proc = run_cli("gc", "--dsn", dsn, *args)
    assert_one_line_error(proc, fragment)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert len(surviving_ids(conn)) == 20


@pytest.mark.parametrize("name", ["gone.csv.gz", "gone.parquet"])
def test_rows_the_application_holds_locked_stay_and_the_rest_are_archived_once(conn, dsn, tmp_path, name):
    """A lock timeout sends the batch to the skip-locked delete, streamed like the fast one; the
    attempt that timed out streamed nothing that reaches the file."""
    fill(conn, [True] * 1000)
    path = tmp_path / name
    with psycopg.connect(dsn) as app:
        app.execute("SELECT id FROM messages WHERE id IN (10, 500) FOR UPDATE")
        result = collect(dsn, GcOptions(strategy="physical", batch_size=200, lock_timeout_ms=50,
                                        archive_to=str(path)))
        app.rollback()

    assert result.status == "complete" and result.rows_skipped_locked >= 2  # the walk, and its sweep
    assert surviving_ids(conn) == [10, 500]
    assert archived_ids(path) == [i for i in range(1, 1001) if i not in (10, 500)]
