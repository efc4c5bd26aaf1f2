"""After GC on a 1M-row table (and after the VACUUM that follows it), amcheck finds no corruption
in any index of the table nor in its heap."""

from __future__ import annotations

import pytest

from engine import collect
from engine.config import GcOptions
from engine.tools import synth
from tests.faults.helpers import Conn, Ledger

ROWS = 1_000_000


def require_amcheck(conn: Conn) -> None:
    available = conn.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'amcheck'").fetchone()
    if available is None:
        pytest.skip("the server has no amcheck extension (contrib not installed)")
    conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")


def check_indexes(conn: Conn, table: str) -> list[str]:
    """bt_index_parent_check with heapallindexed on every btree index: raises on corruption."""
    indexes = [row[0] for row in conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = %s::regclass AND am.amname = 'btree'"
        " ORDER BY 1", (table,))]
    for index in indexes:
        conn.execute("SELECT bt_index_parent_check(%s::regclass, heapallindexed => true)", (index,))
    return indexes


def heap_corruption(conn: Conn, table: str) -> list[tuple[object, ...]]:
    if conn.execute("SELECT to_regproc('verify_heapam') IS NULL").fetchone()[0]:
        return []  # amcheck before 1.3 (PostgreSQL 13): indexes only
    return conn.execute("SELECT * FROM verify_heapam(%s::regclass, check_toast => true)", (table,)).fetchall()


@pytest.mark.slow
def test_amcheck_finds_no_corruption_after_gc_of_a_million_rows(conn: Conn, dsn: str, ledger: Ledger) -> None:
    require_amcheck(conn)
    report = synth.seed(dsn, ROWS, "dense")
    result = collect(dsn, GcOptions(workers=2))
    assert result.status == "complete"
    assert result.messages_deleted == report.garbage_rows
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == ROWS - report.garbage_rows

    checked = check_indexes(conn, "messages")
    after_gc = heap_corruption(conn, "messages")
    conn.execute("VACUUM messages")
    check_indexes(conn, "messages")
    after_vacuum = heap_corruption(conn, "messages")
    ledger.add(indexes_checked=2 * len(checked))
    print(f"\namcheck: {ROWS:,} rows, {result.messages_deleted:,} deleted; indexes {', '.join(checked)};"
          f" heap problems {len(after_gc)} after GC, {len(after_vacuum)} after VACUUM")

    assert len(checked) >= 3  # primary key, message_id unique, the partial garbage index
    assert after_gc == [] and after_vacuum == []
