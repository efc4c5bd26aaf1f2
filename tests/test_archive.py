"""--archive moves rows in the deleting statement; restore and purge-archive undo and empty it."""

from __future__ import annotations

import pytest

from engine import collect
from engine.archive import Restored, purge, restore
from engine.config import GcOptions, TableSpec
from tests.data import fill, live_ids, surviving_ids
from tests.support import run_cli
from tests.test_cli import assert_one_line_error


def archived_ids(conn, run_id=None) -> list[int]:
    rows = conn.execute("SELECT id FROM messages_archive WHERE %(run)s::bigint IS NULL OR run_id = %(run)s"
                        " ORDER BY id", {"run": run_id})
    return [row[0] for row in rows]


@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_archive_moves_exactly_the_deleted_rows_with_their_run(conn, dsn, strategy):
    garbage = [i % 3 == 0 for i in range(900)]
    fill(conn, garbage)
    before = {row[0]: row[1:] for row in conn.execute("SELECT id, message_id, payload FROM messages")}

    result = collect(dsn, GcOptions(strategy=strategy, archive=True, batch_size=50))

    assert surviving_ids(conn) == live_ids(garbage)
    gone = sorted(set(before) - set(live_ids(garbage)))
    assert archived_ids(conn, result.run_id) == gone
    copied = conn.execute("SELECT id, message_id, payload FROM messages_archive").fetchall()
    assert all(before[row[0]] == row[1:] for row in copied)
    assert result.messages_deleted == len(gone)


def test_restore_puts_a_runs_rows_back(conn, dsn):
    garbage = [i % 2 == 0 for i in range(400)]
    fill(conn, garbage)
    result = collect(dsn, GcOptions(archive=True))
    oid = conn.execute("SELECT 'messages'::regclass::oid").fetchone()[0]

    assert restore(conn, TableSpec(), oid, result.run_id, ("id",)) == Restored(restored=200, conflicting=0)

    assert surviving_ids(conn) == list(range(1, 401))
    assert archived_ids(conn) == []


def test_purge_archive_removes_only_old_archived_rows(conn, dsn):
    fill(conn, [True] * 300)
    collect(dsn, GcOptions(archive=True))
    conn.execute("UPDATE messages_archive SET archived_at = now() - interval '40 days' WHERE id <= 100")

    from datetime import timedelta

    assert purge(conn, TableSpec(), timedelta(days=30)) == 100
    assert archived_ids(conn) == list(range(101, 301))


def reinsert_message_ids(conn, ids: list[int]) -> None:
    """New rows (new ids) that take the message_id of archived rows, as a producer resending them."""
    conn.execute("INSERT INTO messages (message_id, chat_id, direction, status, payload)"
                 " SELECT message_id, chat_id, direction, status, 'resent' FROM messages_archive"
                 " WHERE id = ANY(%s)", (ids,))


def test_restore_keeps_conflicting_rows_archived_and_a_rerun_finishes_the_rest(conn, dsn):
    fill(conn, [True] * 12_000)  # more than one restore batch
    result = collect(dsn, GcOptions(archive=True))
    conflicting = [7, 4_999, 5_001, 11_999]
    reinsert_message_ids(conn, conflicting)
    oid = conn.execute("SELECT 'messages'::regclass::oid").fetchone()[0]

    first = restore(conn, TableSpec(), oid, result.run_id, ("id",))

    assert first == Restored(restored=12_000 - len(conflicting), conflicting=len(conflicting))
    assert archived_ids(conn, result.run_id) == conflicting
    conn.execute("DELETE FROM messages WHERE payload = 'resent'")

    assert restore(conn, TableSpec(), oid, result.run_id, ("id",)) == Restored(restored=len(conflicting),
                                                                      conflicting=0)
    assert surviving_ids(conn) == list(range(1, 12_001))
    assert archived_ids(conn) == []


def test_restore_command_reports_conflicts_on_one_line_and_exits_1(conn, dsn):
    fill(conn, [True] * 300)
    run_id = collect(dsn, GcOptions(archive=True)).run_id
    reinsert_message_ids(conn, [10, 20])

    proc = run_cli("restore", "--dsn", dsn, "--run", str(run_id))

    assert_one_line_error(proc, "restored 298 rows", code=1)
    assert "2 rows kept in the archive" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    conn.execute("DELETE FROM messages WHERE payload = 'resent'")
    rerun = run_cli("restore", "--dsn", dsn, "--run", str(run_id))
    assert rerun.returncode == 0, rerun.stderr
    assert "restored 2 rows" in rerun.stdout
    assert surviving_ids(conn) == list(range(1, 301))
