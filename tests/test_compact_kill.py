"""``kill -9`` of a compaction (a real ``msggc gc --strategy compact`` process) inside each of its
phases while the application writes, then the next run, whatever its strategy: the compaction
is undone (killed before the swap) or finished (after it), nothing that is not garbage is lost,
every change of the application is there, the counts are exact, the table's catalog is as it
was and nothing of the compaction remains.

Where it is killed: the test holds the run's ``gc_runs`` row, so msggc blocks where it records
a phase, inside that phase's transaction (its work done, not committed); the test reads which
phase from the record and the locks, and kills there or lets it go on to the next.
"""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import psycopg
import pytest

from engine import collect
from engine.config import GcOptions, StrategyName, TableSpec
from tests.compact_app import CATALOG, App, leftovers, make_inbox
from tests.polling import wait_until
from tests.support import spawn_cli

Conn = psycopg.Connection[Any]
POINTS = ("start", "capture", "copy", "indexes", "foreign keys", "catch-up", "swap", "finish", "close")


def blocked_in(conn: Conn, pid: int) -> str:
    """The phase whose record msggc's backend ``pid`` waits to write ("start": its run's row)."""
    row = conn.execute(
        "SELECT cursor #>> '{compact,phase}',"
        " jsonb_array_length(coalesce(cursor #> '{compact,indexes}', '[]'))"
        " FROM gc_runs WHERE strategy = 'compact' AND status = 'running'").fetchone()
    phase, indexes = row or (None, 0)
    if phase is None:
        return "start"
    swapping = conn.execute("SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s"
                            " AND relation = 'inbox'::regclass"
                            " AND mode = 'AccessExclusiveLock' AND granted)", (pid,)).fetchone()[0]
    return {"planned": "capture", "capture": "copy", "copied": "foreign keys" if indexes else "indexes",
            "indexed": "swap" if swapping else "catch-up", "swapped": "finish", "done": "close"}[phase]


def kill_inside(conn: Conn, dsn: str, proc: subprocess.Popen[str], point: str) -> None:
    """Hold ``gc_runs`` (SHARE: every write of it waits) until msggc waits to record ``point``,
    then ``kill -9``; each release lets exactly one of its transactions commit before the
    next request of the lock is granted (it queues behind that transaction's)."""
    with psycopg.connect(dsn) as holder:
        holder_pid = holder.info.backend_pid
        while True:
            holder.execute("LOCK TABLE gc_runs IN SHARE MODE")
            pid = wait_until(lambda: (conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'msggc'"
                " AND %s = ANY(pg_blocking_pids(pid))", (holder_pid,)).fetchone() or [None])[0]
                or proc.poll() is not None, 30, "msggc to record a phase")
            assert proc.poll() is None, f"the run ended before {point}: {proc.communicate()}"
            reached = blocked_in(conn, pid)
            if reached == point:
                proc.kill()
                proc.wait()
                holder.rollback()
                return
            assert POINTS.index(reached) < POINTS.index(point), f"passed {point}"
            holder.rollback()


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
        result = collect(dsn, GcOptions(table=TableSpec(name="inbox", schema="public"), strategy=strategy))
        assert result.status.value == "complete", result.error
    finally:
        app.stop.set()
        writer.join(30)
    app.check(conn, 5000)
    assert leftovers(conn) == []
    after = conn.execute(CATALOG).fetchone()[0]
    assert {**after, "next_id": None} == {**before, "next_id": None}
    statuses = [status for (status,) in conn.execute("SELECT status FROM gc_runs ORDER BY id")]
    killed_run = [] if point == "start" else ["complete" if killed in ("swapped", "done") else "failed"]
    assert statuses == [*killed_run, "complete"]
