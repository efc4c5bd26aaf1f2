"""``kill -9`` of a compaction (a real ``msggc gc --strategy compact`` process) inside each of its
phases while the application writes, then the next run, whatever its strategy: the compaction
is undone (killed before the swap) or finished (after it), nothing that is not garbage is lost,
every change of the application is there, the counts are exact, the table's catalog is as it
was and nothing of the compaction remains.

Where it is killed: :func:`tests.compact_app.pause_at` holds msggc where it records a phase,
inside that phase's transaction (its work done, not committed).
"""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import psycopg
import pytest

from engine import collect
from engine.archive import create_archive
from engine.config import GcOptions, StrategyName, TableSpec
from engine.service.notice import NoticeFinisher
from engine.service.notify import WebhookNotifier
from tests.compact_app import CATALOG, LEAF_CATALOG, LEAVES, POINTS, App, Turnstile, leftovers, make_inbox
from tests.faults.helpers import CallbackServer, notice
from tests.support import run_cli, spawn_cli

Conn = psycopg.Connection[Any]


def kill_inside(conn: Conn, dsn: str, proc: subprocess.Popen[str], point: str) -> None:
    with Turnstile(conn, dsn, proc) as gate:
        gate.pause_at(point)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("point", POINTS)
def test_a_compaction_killed_inside_any_phase_is_undone_or_finished_by_the_next_run_losing_nothing(
        conn: Conn, dsn: str, point: str) -> None:
    make_inbox(conn, 5000, 10)
    before = conn.execute(CATALOG).fetchone()[0]
    app = App.on(conn, dsn, seed=POINTS.index(point))
    writer = threading.Thread(target=app.run)
    writer.start()
    try:
        proc = spawn_cli("gc", "--dsn", dsn, "--table", "public.inbox", "--strategy", "compact")
        kill_inside(conn, dsn, proc, point)
        killed = (conn.execute("SELECT cursor #>> '{compact,phase}' FROM gc_runs WHERE strategy = 'compact'"
                               ).fetchone() or [None])[0]
        strategy: StrategyName = "compact" if POINTS.index(point) % 2 else "auto"
        with CallbackServer() as callback:
            options = GcOptions(table=TableSpec(name="inbox", schema="public"), strategy=strategy)
            result = collect(dsn, options, NoticeFinisher(WebhookNotifier(callback.url)))
            notices = [notice(body) for body in callback.accepted]
        assert result.status.value == "complete", result.error
    finally:
        app.stop.set()
        writer.join(30)
    app.check(conn, 5000)
    assert leftovers(conn) == []
    after = conn.execute(CATALOG).fetchone()[0]
    assert {**after, "next_id": None} == {**before, "next_id": None}
    runs = conn.execute("SELECT status, messages_deleted FROM gc_runs ORDER BY id").fetchall()
    killed_run = [] if point == "start" else ["complete" if killed in ("swapped", "done") else "failed"]
    assert [status for status, _deleted in runs] == [*killed_run, "complete"]
    # the killed run's notice too, told by the run that closed it, with its exact count
    assert [(n["status"], n["messages_deleted"]) for n in notices] == runs


@pytest.mark.parametrize("point", ["copy", "finish"])
def test_a_leaf_compaction_killed_before_or_after_its_swap_is_undone_or_finished(
        conn: Conn, dsn: str, point: str) -> None:
    conn.execute(LEAVES)
    live = conn.execute("SELECT id FROM events WHERE processed_at IS NULL ORDER BY id").fetchall()
    before = conn.execute(LEAF_CATALOG).fetchone()
    proc = spawn_cli("gc", "--dsn", dsn, "--table", "public.events_1", "--strategy", "compact")
    kill_inside(conn, dsn, proc, point)
    result = collect(dsn, GcOptions(table=TableSpec(name="events_1", schema="public")))
    assert result.status.value == "complete", result.error
    assert conn.execute("SELECT id FROM events WHERE processed_at IS NULL ORDER BY id").fetchall() == live
    assert conn.execute(LEAF_CATALOG).fetchone() == before
    assert conn.execute("SELECT sum(messages_deleted) FROM gc_runs").fetchone()[0] == 1600
    assert leftovers(conn) == []


@pytest.mark.parametrize("point", ["copy", "finish"])
def test_a_killed_compaction_claimed_again_by_a_worker_goes_on_in_its_row_and_tells_its_end_once(
        conn: Conn, dsn: str, point: str) -> None:
    make_inbox(conn, 3000, 10)
    proc = spawn_cli("gc", "--dsn", dsn, "--table", "public.inbox", "--strategy", "compact")
    kill_inside(conn, dsn, proc, point)
    run_id = conn.execute("SELECT id FROM gc_runs WHERE status = 'running'").fetchone()[0]
    with CallbackServer() as callback:  # as the service's worker executes a run it claimed
        options = GcOptions(table=TableSpec(name="inbox", schema="public"), strategy="compact")
        result = collect(dsn, options, NoticeFinisher(WebhookNotifier(callback.url)), run_id=run_id)
        notices = [notice(body) for body in callback.accepted]
    assert result.run_id == run_id and result.status.value == "complete", result.error
    assert conn.execute("SELECT id, status, messages_deleted FROM gc_runs").fetchall() == [
        (run_id, "complete", 2700)]
    assert notices == [{"messages_deleted": 2700, "status": "complete"}]
    assert leftovers(conn) == []


@pytest.mark.parametrize("point", ["copy", "finish"])
@pytest.mark.parametrize("killed_archive", [False, True])
@pytest.mark.parametrize("rerun_archive", [False, True])
def test_a_compaction_killed_then_a_run_with_or_without_archive_finishes_or_undoes_it_leaving_nothing(
        conn: Conn, dsn: str, point: str, killed_archive: bool, rerun_archive: bool) -> None:
    make_inbox(conn, 4000, 10)
    live = conn.execute("SELECT * FROM inbox WHERE processed_at IS NULL ORDER BY id").fetchall()
    garbage = conn.execute("SELECT * FROM inbox WHERE processed_at IS NOT NULL ORDER BY id").fetchall()
    create_archive(conn, TableSpec(name="inbox", schema="public"))
    archive = ["--archive"] if killed_archive else []
    proc = spawn_cli("gc", "--dsn", dsn, "--table", "public.inbox", "--strategy", "compact", *archive)
    kill_inside(conn, dsn, proc, point)
    rerun = run_cli("gc", "--dsn", dsn, "--table", "public.inbox", *(["--archive"] if rerun_archive else []))
    assert rerun.returncode == 0, rerun.stderr
    assert conn.execute("SELECT * FROM inbox ORDER BY id").fetchall() == live
    runs = conn.execute("SELECT status, messages_deleted FROM gc_runs ORDER BY id").fetchall()
    swapped = point == "finish"
    assert runs == [("complete", 3600), ("complete", 0)] if swapped else [("failed", 0), ("complete", 3600)]
    first = conn.execute("SELECT min(id) FROM gc_runs").fetchone()[0]
    kept = f"msggc_old_{first}"  # with its indexes and identity sequence, renamed msggc_<run>_old_*
    if swapped and killed_archive:  # the killed run's archive: exactly its garbage, restorable
        assert conn.execute(f"SELECT * FROM {kept} ORDER BY id").fetchall() == garbage
    archived = conn.execute("SELECT count(*) FROM inbox_archive").fetchone()[0]
    assert archived == (3600 if rerun_archive and not swapped else 0)
    left = leftovers(conn)
    assert (kept in left) == (swapped and killed_archive)
    assert [name for name in left if name != kept and not name.startswith(f"msggc_{first}_old_")] == []
