"""A compaction whose verification fails after its swap (``rows(old) != rows(new) +
garbage(old)``) undoes the swap: the old table is back in place, holding every row it held
(garbage included) and every change the application made to the new table after the swap, and
the run fails. Killed inside the undo, the next run undoes it again.

The mismatch is a real SQL change, made by a trigger on ``gc_runs`` in the swap's own
transaction: a row that is not garbage appears in the old table (as if the copy had missed it).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest

from engine import collect
from engine.config import GcOptions, TableSpec
from engine.status import RunStatus
from tests.compact_app import CATALOG, LEAF_CATALOG, LEAVES, App, Turnstile, leftovers, make_inbox
from tests.polling import wait_until
from tests.support import spawn_cli

Conn = psycopg.Connection[Any]

MISSED = 1_000_000
TAMPER = """
CREATE FUNCTION tamper() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('INSERT INTO %I {row}', 'msggc_old_' || NEW.id);
  RETURN NEW;
END$$;
CREATE TRIGGER tamper BEFORE UPDATE ON gc_runs FOR EACH ROW
  WHEN (NEW.cursor #>> '{compact,phase}' = 'swapped'
        AND OLD.cursor #>> '{compact,phase}' IS DISTINCT FROM 'swapped')
  EXECUTE FUNCTION tamper();
"""


def tamper(row: str) -> str:
    """The trigger that puts ``row`` (an INSERT's tail) into the old table in the swap's commit."""
    return TAMPER.replace("{row}", row.replace("'", "''"))


@pytest.mark.parametrize("killed", [False, True])
def test_a_swap_whose_count_does_not_add_up_is_undone_with_the_applications_later_changes(
        conn: Conn, dsn: str, killed: bool) -> None:
    make_inbox(conn, 5000, 10)
    before = conn.execute(CATALOG).fetchone()[0]
    oid = conn.execute("SELECT 'inbox'::regclass::oid").fetchone()[0]
    conn.execute(tamper("(id, msg, code) OVERRIDING SYSTEM VALUE VALUES (1000000, 'missed', 'a')"))
    app = App.on(conn, dsn, seed=11)
    writer = threading.Thread(target=app.run)
    writer.start()
    try:
        proc = spawn_cli("gc", "--dsn", dsn, "--table", "public.inbox", "--strategy", "compact", "--json")
        with Turnstile(conn, dsn, proc) as gate:
            gate.pause_at("finish")  # swapped, about to record "undoing"
            written = app.inserted + app.deleted
            wait_until(lambda: app.inserted + app.deleted >= written + 20, 30, "the application to write")
            if killed:
                gate.pause_at("undo")  # inside the undo's transaction, under the lock
                proc.kill()
                proc.wait()
        if killed:
            conn.execute("DROP TRIGGER tamper ON gc_runs")
            result = collect(dsn, GcOptions(table=TableSpec(name="inbox", schema="public")))
            assert result.status is RunStatus.COMPLETE, result.error
            error = conn.execute("SELECT error FROM gc_runs ORDER BY id LIMIT 1").fetchone()[0]
        else:
            out, _err = proc.communicate(timeout=60)
            assert proc.returncode == 1
            error = json.loads(out)["error"]
        wait_until(lambda: app.inserted + app.deleted >= written + 40, 30, "the application to write on")
    finally:
        app.stop.set()
        writer.join(30)
    assert "did not add up" in error and "the swap was undone" in error, error
    assert conn.execute("SELECT 'inbox'::regclass::oid").fetchone()[0] == oid  # the old table itself
    app.live[MISSED] = "missed"
    app.check(conn, 5001)  # every live row with its latest values; nothing counted that is not gone
    runs = conn.execute("SELECT status, messages_deleted FROM gc_runs ORDER BY id").fetchall()
    assert runs[0] == ("failed", 0)
    if not killed:  # nothing collected: every garbage row is there, the application's deletes gone
        assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 5001 + app.inserted - app.deleted
        gone = conn.execute("SELECT count(*) FROM inbox WHERE id = ANY(%s)", (list(app.gone),)).fetchone()
        assert gone == (0,)
    # the old table's triggers did not fire for the changes taken back: each insert audited once
    twice = conn.execute("SELECT id FROM inbox_audit WHERE op = 'INSERT' GROUP BY id HAVING count(*) > 1")
    assert twice.fetchall() == []
    after = conn.execute(CATALOG).fetchone()[0]
    assert {**after, "next_id": None} == {**before, "next_id": None}
    assert after["next_id"] >= before["next_id"] + app.inserted  # the identity went on past the new table's
    assert leftovers(conn) == []


def test_a_leaf_whose_count_does_not_add_up_is_attached_again_with_every_row(conn: Conn, dsn: str) -> None:
    conn.execute(LEAVES)
    # foreign keys of the parent's (a detached leaf holds them as its own) and of the leaf's own
    conn.execute("CREATE TABLE app_ref (code text PRIMARY KEY); INSERT INTO app_ref VALUES ('a')")
    conn.execute("ALTER TABLE events ADD COLUMN code text DEFAULT 'a' REFERENCES app_ref (code)")
    conn.execute("ALTER TABLE events_1 ADD CONSTRAINT own_code FOREIGN KEY (code) REFERENCES app_ref (code)")
    rows = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    before = conn.execute(LEAF_CATALOG).fetchone()
    oid = conn.execute("SELECT 'events_1'::regclass::oid").fetchone()[0]
    conn.execute(tamper("VALUES (1000000, '2026-01-01', 'missed', NULL, 'a')"))
    result = collect(dsn, GcOptions(table=TableSpec(name="events_1", schema="public"), strategy="compact"))
    assert result.status is RunStatus.FAILED and "the swap was undone" in str(result.error), result.error
    assert conn.execute("SELECT 'events_1'::regclass::oid").fetchone()[0] == oid
    assert conn.execute("SELECT * FROM events WHERE id <> 1000000 ORDER BY id").fetchall() == rows
    assert conn.execute("SELECT tableoid::regclass::text FROM events WHERE id = 1000000").fetchone() == (
        "events_1",)
    assert conn.execute(LEAF_CATALOG).fetchone() == before
    assert leftovers(conn) == []


@pytest.mark.parametrize(("change", "why"), [
    # the application takes the old table's unique value: that row cannot go back beside it
    ("INSERT INTO inbox (msg) VALUES ('missed')", "takes a unique value the old table holds"),
    # a column the old table lacks: its values would be lost
    ("ALTER TABLE inbox ADD COLUMN extra int; INSERT INTO inbox (msg, extra) VALUES ('x', 1)",
     "changed its columns, constraints or indexes since the swap"),
])
def test_a_swap_that_cannot_be_undone_keeps_the_old_table_beside_and_says_so(
        conn: Conn, dsn: str, change: str, why: str) -> None:
    make_inbox(conn, 2000, 10)
    oid = conn.execute("SELECT 'inbox'::regclass::oid").fetchone()[0]
    conn.execute(tamper("(id, msg, code) OVERRIDING SYSTEM VALUE VALUES (1000000, 'missed', 'a')"))
    proc = spawn_cli("gc", "--dsn", dsn, "--table", "public.inbox", "--strategy", "compact", "--json")
    with Turnstile(conn, dsn, proc) as gate:
        gate.pause_at("finish")
        conn.execute(change)
    out, _err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    error = json.loads(out)["error"]
    assert "did not add up" in error and "the swap could not be undone (" in error and why in error, error
    run_id = conn.execute("SELECT id FROM gc_runs").fetchone()[0]
    assert f"kept beside it as public.msggc_old_{run_id}" in error
    assert conn.execute("SELECT 'inbox'::regclass::oid").fetchone()[0] != oid  # the new table stays
    assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 201  # its live rows and the new one
    assert conn.execute(f"SELECT count(*) FROM msggc_old_{run_id}").fetchone()[0] == 2001
    held = conn.execute(f"SELECT count(*) FROM pg_constraint WHERE conrelid = 'msggc_old_{run_id}'::regclass"
                        " AND contype = 'f'").fetchone()
    assert held == (0,)  # nothing of the kept table acts on the application's other tables
    assert conn.execute("SELECT status, cursor #>> '{compact,phase}' FROM gc_runs").fetchone() == (
        "failed", "kept")
    kept = (f"msggc_old_{run_id}", f"msggc_{run_id}_old")  # the table, its indexes and sequence
    left = [name for name in leftovers(conn) if not name.startswith(kept)]
    assert left == []  # no trigger, function or log: the application pays nothing more
