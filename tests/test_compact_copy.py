"""The compaction's copy selects the live rows so that an index on the processed column finds
them (``NOT (garbage)``), and keeps a row a ``--where`` filter leaves NULL (``IS NOT TRUE``);
each phase's seconds are recorded."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from engine import collect
from engine.compact import copy, tally
from engine.compact.state import Compaction
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus
from tests.compact_app import leftovers, make_inbox

Conn = psycopg.Connection[Any]
ROWS = 20_000


def options(**settings: Any) -> GcOptions:
    return GcOptions(table=TableSpec(name="inbox", schema="public"), strategy="compact", **settings)


@pytest.mark.parametrize(("never_null", "scan"), [(True, "Index"), (False, "Seq Scan")])
def test_the_live_rows_are_found_by_an_index_on_processed_at_unless_the_predicate_may_be_null(
        conn: Conn, never_null: bool, scan: str) -> None:
    make_inbox(conn, ROWS, 1000)
    conn.execute("CREATE INDEX inbox_processed ON inbox (processed_at)")
    conn.execute("ANALYZE inbox")
    c = Compaction(1, "public", "inbox", ["id"], "processed_at IS NOT NULL", None)
    plan = json.dumps(conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) SELECT * FROM inbox WHERE {}").format(
        copy.live_rows(c.predicate, never_null))).fetchone()[0])
    assert f'"Node Type": "{scan}' in plan


def test_a_compaction_with_an_index_finding_the_live_rows_keeps_exactly_them_and_times_its_phases(
        conn: Conn, dsn: str) -> None:
    live = make_inbox(conn, ROWS, 1000)
    conn.execute("CREATE INDEX inbox_processed ON inbox (processed_at)")
    conn.execute("ANALYZE inbox")
    result = collect(dsn, options())
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.messages_deleted == ROWS - len(live)
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == live
    assert leftovers(conn) == []
    seconds = conn.execute("SELECT cursor #> '{compact,seconds}' FROM gc_runs WHERE id = %s",
                           (result.run_id,)).fetchone()[0]
    assert set(seconds) == {"capture", "copy", "indexes", "foreign keys", "analyze", "catch-up", "swap",
                            "verify", "count", "drop"}


def test_a_compaction_keeps_the_rows_a_where_filter_leaves_null_and_those_newer_than_the_cutoff(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, ROWS, 10)
    conn.execute("UPDATE inbox SET processed_at = now() - interval '2 days' WHERE id % 3 = 0")
    conn.execute("UPDATE inbox SET code = NULL WHERE id % 7 = 0")  # `code <> 'b'` is NULL: not garbage
    garbage = "processed_at < now() - interval '1 day' AND (code <> 'b') IS TRUE"
    kept = {row[0] for row in conn.execute(f"SELECT id FROM inbox WHERE ({garbage}) IS NOT TRUE")}
    spec = TableSpec(name="inbox", schema="public", where="code <> 'b'")
    result = collect(dsn, GcOptions(table=spec, strategy="compact", older_than=timedelta(days=1)))
    assert result.status is RunStatus.COMPLETE, result.error
    assert result.messages_deleted == ROWS - len(kept)
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == kept
    assert leftovers(conn) == []


@pytest.mark.parametrize("live_index", [True, False])
def test_the_verify_counts_the_live_rows_through_an_index_that_finds_them_to_the_same_total(
        conn: Conn, live_index: bool) -> None:
    make_inbox(conn, ROWS, 100)
    if live_index:
        conn.execute("CREATE INDEX inbox_processed ON inbox (processed_at)")
    conn.execute("VACUUM ANALYZE inbox")
    c = Compaction(1, "public", "inbox", ["id"], "processed_at IS NOT NULL", None, never_null=True)
    live = copy.live_rows(c.predicate, c.never_null)
    table = sql.Identifier("public", "inbox")
    if live_index:  # else the planner's choice (a seq scan either way at this size)
        assert tally.live_is_cheaper(conn, table, live, c.params)
    assert tally.counts(conn, table, c.predicate, live, c.params) == (ROWS, ROWS - ROWS // 100)


def test_the_dry_run_predicts_the_search_of_an_aged_tables_live_rows_as_one_read_of_its_heap(
        conn: Conn, dsn: str) -> None:
    """The live rows all at the table's end (the oldest processed): a sequential search reads the
    heap once, however few it finds in its first blocks (timing its first rows and scaling read
    the table twenty times over at 10M rows, 99% garbage: 13.4 s predicted, 0.8 s measured)."""
    make_inbox(conn, ROWS, 1)
    conn.execute("UPDATE inbox SET processed_at = now() WHERE id <= %s", (ROWS * 19 // 20,))
    conn.execute("VACUUM ANALYZE inbox")
    result = collect(dsn, options(dry_run=True))
    figures = result.compaction
    assert figures is not None and figures["refused"] == []
    assert figures["predicted_find_seconds"] == figures["predicted_verify_seconds"]  # a heap read each
