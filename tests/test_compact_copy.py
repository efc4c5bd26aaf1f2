"""The compaction's copy split over several connections in one exported snapshot: exactly the
live rows while the application writes; a connection of the copy that fails, before or after
the helpers committed their parts, leaves nothing behind and the next run collects exactly;
the split is not used where an index finds the live rows."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from engine import collect
from engine.compact import copy
from engine.compact.state import Compaction
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus
from tests.compact_app import CATALOG, App, leftovers, make_inbox
from tests.polling import wait_until

Conn = psycopg.Connection[Any]
ROWS = 40_000
GATE = 4242
"""The advisory lock a row's CHECK takes: held by the test, it stops the copy of those rows."""


def options(**settings: Any) -> GcOptions:
    return GcOptions(table=TableSpec(name="inbox", schema="public"), strategy="compact", **settings)


def recorded(conn: Conn, run_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT cursor -> 'compact' FROM gc_runs WHERE id = %s", (run_id,)).fetchone()
    return dict(row[0])


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any table big enough to split (the tests' tables are a few hundred pages)."""
    monkeypatch.setattr(copy, "SPLIT_MIN_PAGES", 1)


@pytest.mark.usefixtures("split")
def test_a_copy_split_over_three_connections_keeps_exactly_the_live_rows_while_the_application_writes(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, ROWS, 10)
    before = conn.execute(CATALOG).fetchone()[0]
    app = App.on(conn, dsn, seed=7)
    writer = threading.Thread(target=app.run)
    writer.start()
    try:
        result = collect(dsn, options(workers=3))
    finally:
        app.stop.set()
        writer.join(30)
    assert result.status is RunStatus.COMPLETE, result.error
    assert "copied by 3 connections in one snapshot" in result.reason
    parts = recorded(conn, result.run_id)["copied"]
    assert len(parts) == 3 and all(part > 0 for part in parts)
    app.check(conn, ROWS)
    assert leftovers(conn) == []
    assert {**conn.execute(CATALOG).fetchone()[0], "next_id": None} == {**before, "next_id": None}


@pytest.mark.usefixtures("split")
@pytest.mark.parametrize(("failing", "gated"), [("helper", f"id > {ROWS * 9 // 10}"),
                                                 ("run's own", f"id < {ROWS // 10}")])
def test_a_copy_connection_that_fails_leaves_nothing_behind_and_the_next_run_collects_exactly(
        conn: Conn, dsn: str, failing: str, gated: str) -> None:
    """``helper``: the helper copying the last blocks dies before its commit. ``run's own``: the
    run's transaction dies after the helper committed its rows into the new table."""
    live = make_inbox(conn, ROWS, 10)
    conn.execute(f"CREATE FUNCTION gate(id bigint) RETURNS boolean LANGUAGE plpgsql AS"
                 f" $$BEGIN IF {gated} THEN PERFORM pg_advisory_xact_lock_shared({GATE}); END IF;"
                 f" RETURN true; END$$")
    conn.execute("ALTER TABLE inbox ADD CONSTRAINT gated CHECK (gate(id))")
    before = conn.execute(CATALOG).fetchone()[0]
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (GATE,))
        ran: list[Any] = []
        run = threading.Thread(target=lambda: ran.append(collect(dsn, options(workers=2))))
        run.start()
        try:
            pid = wait_until(lambda: (conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'msggc'"
                " AND wait_event = 'advisory'").fetchone() or [None])[0], 30, "the copy to reach the gate")
            run_id, record = conn.execute("SELECT id, cursor -> 'compact' FROM gc_runs").fetchone()
            assert record["phase"] == "capture"
            if failing == "run's own":  # the helper's rows are committed, the record still says capture
                new = Compaction(**record).new.name
                wait_until(lambda: conn.execute(f"SELECT count(*) FROM {new}").fetchone()[0], 30,
                           "the helper's part committed")
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            run.join(60)
    assert ran and ran[0].status is RunStatus.FAILED
    assert recorded(conn, run_id)["phase"] == "undone"
    assert leftovers(conn) == []
    assert {row[0] for row in conn.execute("SELECT id FROM inbox WHERE processed_at IS NULL")} == live
    assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == ROWS
    again = collect(dsn, options(workers=2))
    assert again.status is RunStatus.COMPLETE, again.error
    assert again.messages_deleted == ROWS - len(live)
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == live
    assert conn.execute(CATALOG).fetchone()[0] == before
    assert leftovers(conn) == []


@pytest.mark.usefixtures("split")
def test_the_copy_is_not_split_where_an_index_finds_the_live_rows(conn: Conn, dsn: str) -> None:
    live = make_inbox(conn, ROWS, 1000)
    conn.execute("CREATE INDEX inbox_processed ON inbox (processed_at)")
    conn.execute("ANALYZE inbox")
    result = collect(dsn, options(workers=2))
    assert result.status is RunStatus.COMPLETE, result.error
    assert recorded(conn, result.run_id)["copied"] == [len(live)]
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == live


@pytest.mark.usefixtures("split")
def test_a_split_copy_keeps_the_rows_a_where_filter_leaves_null_and_those_newer_than_the_cutoff(
        conn: Conn, dsn: str) -> None:
    make_inbox(conn, ROWS, 10)
    conn.execute("UPDATE inbox SET processed_at = now() - interval '2 days' WHERE id % 3 = 0")
    conn.execute("UPDATE inbox SET code = NULL WHERE id % 7 = 0")  # `code <> 'b'` is NULL: not garbage
    garbage = "processed_at < now() - interval '1 day' AND (code <> 'b') IS TRUE"
    kept = {row[0] for row in conn.execute(f"SELECT id FROM inbox WHERE ({garbage}) IS NOT TRUE")}
    spec = TableSpec(name="inbox", schema="public", where="code <> 'b'")
    result = collect(dsn, GcOptions(table=spec, strategy="compact", older_than=timedelta(days=1), workers=2))
    assert result.status is RunStatus.COMPLETE, result.error
    assert "copied by 2 connections in one snapshot" in result.reason
    assert result.messages_deleted == ROWS - len(kept)
    assert {row[0] for row in conn.execute("SELECT id FROM inbox")} == kept
