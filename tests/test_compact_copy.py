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
from engine.compact import copy
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
