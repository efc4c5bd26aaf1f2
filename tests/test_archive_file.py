"""--archive-to streams the deleted rows with COPY into a gzip CSV file, exactly once per row,
even across a stop or a crash between a batch's fsync and its commit; restore --file undoes."""

from __future__ import annotations

import csv
import gzip
import io
import os
import stat
from pathlib import Path

import pytest

from engine import collect, runs
from engine.archive_file import check_target
from engine.archive_formats import members
from engine.archive_restore import restore
from engine.config import GcOptions, TableSpec
from engine.errors import MsggcError, UsageError
from tests.data import fill, live_ids, run_rows, surviving_ids
from tests.support import run_cli
from tests.test_cli import assert_one_line_error


def archived(path: Path) -> list[dict[str, str]]:
    """The file's rows as the CSV header names them (header member first)."""
    parts = list(members(path))
    text = "".join(part.decode() for part in parts)
    return list(csv.DictReader(io.StringIO(text)))


def archived_ids(path: Path) -> list[int]:
    return sorted(int(row["id"]) for row in archived(path))


def oid_of_messages(conn) -> int:
    return conn.execute("SELECT 'messages'::regclass::oid").fetchone()[0]


@pytest.mark.parametrize(("strategy", "workers"),
                         [("physical", 1), ("physical", 2), ("index", 1), ("key", 2)])
def test_file_holds_each_deleted_row_once_with_its_values(conn, dsn, tmp_path, strategy, workers):
    garbage = [i % 3 != 0 for i in range(3000)]
    fill(conn, garbage)
    before = {row[0]: row[1] for row in conn.execute("SELECT id, payload FROM messages")}
    path = tmp_path / "gone.csv.gz"

    result = collect(dsn, GcOptions(strategy=strategy, workers=workers, batch_size=100,
                                    archive_to=str(path)))

    gone = sorted(set(before) - set(live_ids(garbage)))
    assert surviving_ids(conn) == live_ids(garbage)
    rows = archived(path)
    assert sorted(int(row["id"]) for row in rows) == gone
    assert all(row["payload"] == before[int(row["id"])] for row in rows)
    assert {row["run_id"] for row in rows} == {str(result.run_id)}
    recorded = conn.execute("SELECT archive_bytes FROM gc_runs WHERE id = %s", (result.run_id,)).fetchone()
    assert recorded[0] == path.stat().st_size


def test_restore_from_file_puts_the_rows_back_once(conn, dsn, tmp_path):
    garbage = [i % 2 == 0 for i in range(1000)]
    fill(conn, garbage)
    path = tmp_path / "gone.csv.gz"
    collect(dsn, GcOptions(batch_size=64, archive_to=str(path)))

    assert restore(conn, TableSpec(), oid_of_messages(conn), path).restored == 500
    assert restore(conn, TableSpec(), oid_of_messages(conn), path).restored == 0  # nothing duplicated

    assert surviving_ids(conn) == list(range(1, 1001))


def test_a_resumed_run_cuts_the_uncommitted_tail_and_continues_the_same_file(conn, dsn, tmp_path):
    """The crash window: a batch's rows were fsynced to the file but its commit never happened,
    so they are still in the table; the file must not keep them twice."""
    garbage = [True] * 2000
    fill(conn, garbage)
    path = tmp_path / "gone.csv.gz"
    first = collect(dsn, GcOptions(strategy="index", batch_size=100, max_rows=500, archive_to=str(path)))
    assert first.status == "stopped"
    committed = path.stat().st_size
    ghost = "\n".join(f"{i},ghost" for i in range(501, 601)) + "\n"  # rows of a batch that rolled back
    with path.open("ab") as handle:
        handle.write(gzip.compress(ghost.encode()))

    second = collect(dsn, GcOptions(strategy="index", batch_size=100, archive_to=str(path)))

    assert second.status == "complete"
    assert surviving_ids(conn) == []
    assert archived_ids(path) == list(range(1, 2001))
    assert path.stat().st_size > committed


def test_a_run_killed_before_it_recorded_its_file_leaves_it_to_the_run_that_resumes_it(conn, dsn, tmp_path):
    """A resumption killed after it took over the walk and before it recorded the file (CI's
    random kill test found the moment): the run after it continues the same file, each row once,
    instead of refusing the file as 'already exists'."""
    fill(conn, [True] * 2000)
    path = tmp_path / "gone.parquet"
    first = collect(dsn, GcOptions(strategy="index", batch_size=100, max_rows=500, archive_to=str(path)))
    assert first.status == "stopped"
    stopped = runs.latest_resumable(conn, GcOptions().table.qualified, GcOptions().node)
    assert stopped is not None and stopped.id == first.run_id
    killed = runs.start(conn, GcOptions().table.qualified, GcOptions().node, stopped.strategy, stopped.slices,
                        {}, resumed_from=stopped.id, key=stopped.key)  # its process died here

    last = collect(dsn, GcOptions(strategy="index", batch_size=100, archive_to=str(path)))

    assert last.status == "complete"
    assert runs.archive_state(conn, killed.id) is None
    assert surviving_ids(conn) == []
    assert archived_ids(path) == list(range(1, 2001))


def test_a_directory_gets_one_file_per_run_and_every_row_once(conn, dsn, tmp_path):
    fill(conn, [True] * 1200)
    stopped = collect(dsn, GcOptions(batch_size=100, max_rows=400, archive_to=str(tmp_path)))
    finished = collect(dsn, GcOptions(batch_size=100, archive_to=str(tmp_path)))

    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [f"messages-run{stopped.run_id}.csv.gz",
                                       f"messages-run{finished.run_id}.csv.gz"]
    assert sorted(archived_ids(files[0]) + archived_ids(files[1])) == list(range(1, 1201))
    assert [r["messages_deleted"] for r in run_rows(dsn)][-2:] == [len(archived_ids(f)) for f in files]


def test_dry_run_with_a_file_deletes_nothing_and_writes_nothing(conn, dsn, tmp_path):
    fill(conn, [True] * 500)
    path = tmp_path / "gone.csv.gz"

    result = collect(dsn, GcOptions(dry_run=True, archive_to=str(path)))

    assert result.status == "dry-run"
    assert result.predicted_seconds and result.predicted_seconds > 0
    assert len(surviving_ids(conn)) == 500
    assert not path.exists()


def test_an_existing_file_is_never_overwritten(conn, dsn, tmp_path):
    fill(conn, [True] * 50)
    path = tmp_path / "precious.csv.gz"
    path.write_bytes(b"someone else's data")

    proc = run_cli("gc", "--dsn", dsn, "--archive-to", str(path))

    assert_one_line_error(proc, "already exists")
    assert path.read_bytes() == b"someone else's data"
    assert len(surviving_ids(conn)) == 50


@pytest.mark.parametrize(("args", "fragment"), [
    (("gc", "--archive", "--archive-to", "x.csv.gz"), "not both"),
    (("restore",), "either --run ID or --file PATH"),
    (("restore", "--run", "1", "--file", "x.csv.gz"), "either --run ID or --file PATH"),
    (("gc", "--archive-to", "/nonexistent-dir/x.csv.gz"), "cannot create archive file"),
])
def test_bad_archive_flags_are_one_line_errors(conn, dsn, args, fragment):
    fill(conn, [True] * 20)
    proc = run_cli(*args, "--dsn", dsn)
    assert_one_line_error(proc, fragment)
    assert len(surviving_ids(conn)) == 20


def test_restoring_a_file_that_is_not_an_archive_is_refused(conn, dsn, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_one_line_error(run_cli("restore", "--dsn", dsn, "--file", str(path)),
                          "is not an msggc archive file")


def test_archive_files_are_readable_by_their_owner_only(conn, dsn, tmp_path):
    """They hold message payloads: 0600 whatever the umask."""
    fill(conn, [True] * 50)
    path = tmp_path / "gone.csv.gz"
    previous = os.umask(0)
    try:
        collect(dsn, GcOptions(archive_to=str(path)))
    finally:
        os.umask(previous)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_target_ending_in_a_slash_names_a_directory_that_must_exist(conn, dsn, tmp_path):
    fill(conn, [True] * 20)

    proc = run_cli("gc", "--dsn", dsn, "--archive-to", f"{tmp_path}/sub/")

    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "sub").exists()
    assert len(surviving_ids(conn)) == 20


@pytest.mark.parametrize(("target", "fragment"), [
    ("missing/", "archive directory"),
    ("missing/gone.csv.gz", "does not exist"),
    ("taken.csv.gz", "already exists"),
])
def test_check_target_refuses_a_target_that_cannot_be_written(tmp_path, target, fragment):
    (tmp_path / "taken.csv.gz").write_bytes(b"someone else's data")

    with pytest.raises(UsageError, match=fragment):
        check_target(f"{tmp_path}/{target}")


def test_check_target_refuses_a_directory_it_may_not_write_into(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("this user may write into any directory (root)")

    with pytest.raises(UsageError, match="not writable"):
        check_target(locked)
    with pytest.raises(UsageError, match="not writable"):
        check_target(locked / "gone.csv.gz")


def test_check_target_accepts_a_new_file_a_directory_and_the_file_being_resumed(tmp_path):
    resumed = tmp_path / "resumed.csv.gz"
    resumed.write_bytes(b"")

    check_target(tmp_path / "new.csv.gz")
    check_target(f"{tmp_path}/")
    check_target(tmp_path)
    check_target(resumed, resuming=resumed)


def write_members(path: Path, parts: list[bytes]) -> Path:
    path.write_bytes(b"".join(gzip.compress(part) for part in parts))
    return path


def with_bad_timestamp(part: bytes) -> bytes:
    rows = list(csv.reader(io.StringIO(part.decode())))
    rows[0][6] = "not a time"  # created_at
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue().encode()


def archive_of(conn, dsn, path: Path) -> list[bytes]:
    """A good archive of 500 rows in several batches; returns its members, the header first."""
    fill(conn, [i % 2 == 0 for i in range(1000)])
    collect(dsn, GcOptions(batch_size=64, archive_to=str(path)))
    return list(members(path))


@pytest.mark.parametrize(("damage", "fragment", "code"), [
    (lambda parts, raw: gzip.compress(b"a,b,c\n1,2,3\n"), "is not an msggc archive file", 2),
    (lambda parts, raw: raw[:-10], "cannot read batch {last}", 1),
    (lambda parts, raw: raw + b"not gzip at all", "cannot read batch {after_last}", 1),
    (lambda parts, raw: b"".join(gzip.compress(p) for p in [*parts[:2], b"1,2,3\n"]), "batch 2", 1),
    (lambda parts, raw: b"".join(gzip.compress(p) for p in [*parts[:3], with_bad_timestamp(parts[3])]),
     "batch 3", 1),
], ids=["foreign csv", "truncated", "trailing garbage", "wrong columns", "bad timestamp"])
def test_restoring_a_damaged_or_foreign_file_is_a_one_line_error(conn, dsn, tmp_path, damage, fragment, code):
    good = tmp_path / "gone.csv.gz"
    parts = archive_of(conn, dsn, good)
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(damage(parts, good.read_bytes()))

    proc = run_cli("restore", "--dsn", dsn, "--file", str(bad))

    assert_one_line_error(proc, fragment.format(last=len(parts) - 1, after_last=len(parts)), code=code)
    assert str(bad) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_rerun_on_the_good_file_after_a_bad_one_restores_the_rest_once(conn, dsn, tmp_path):
    good = tmp_path / "gone.csv.gz"
    parts = archive_of(conn, dsn, good)
    bad = write_members(tmp_path / "bad.csv.gz", [*parts[:3], with_bad_timestamp(parts[3]), *parts[4:]])

    with pytest.raises(MsggcError, match="batch 3"):
        restore(conn, TableSpec(), oid_of_messages(conn), bad)
    restored_before = len(surviving_ids(conn)) - 500
    assert restored_before == sum(part.count(b"\n") for part in parts[1:3])  # batches 1 and 2

    assert restore(conn, TableSpec(), oid_of_messages(conn), good).restored == 500 - restored_before
    assert surviving_ids(conn) == list(range(1, 1001))
