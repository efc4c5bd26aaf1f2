"""--archive moves rows in the deleting statement; restore and purge-archive undo and empty it."""

from __future__ import annotations

import pytest

from engine import collect
from engine.archive import purge, restore
from engine.config import GcOptions, TableSpec
from tests.data import fill, live_ids, surviving_ids


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

    assert restore(conn, TableSpec(), oid, result.run_id) == 200

    assert surviving_ids(conn) == list(range(1, 401))
    assert archived_ids(conn) == []


def test_purge_archive_removes_only_old_archived_rows(conn, dsn):
    fill(conn, [True] * 300)
    collect(dsn, GcOptions(archive=True))
    conn.execute("UPDATE messages_archive SET archived_at = now() - interval '40 days' WHERE id <= 100")

    from datetime import timedelta

    assert purge(conn, TableSpec(), timedelta(days=30)) == 100
    assert archived_ids(conn) == list(range(101, 301))
