"""Issue 21, item 1: a leaf msggc began to detach is never left pending-detach or detached, and
no live row is lost with it, whatever the next run's flags.

Each test is one of the issue's reproductions, made small: (a) an application's REPEATABLE READ
snapshot open while ``msggc gc --workers 1`` runs, on a leaf whose one live row a 128-block
sample misses, and on a wholly-garbage leaf; (b) ``kill -9`` of ``msggc gc --workers 2`` between
a leaf's detach and its drop, then ``gc --no-drop``; (c) the same with a DEFAULT partition that
receives the application's rows of the detached leaf's range. After every run: the rows the
application wrote and left unprocessed are visible through the parent with their values, no
leaf is detached or pending once a run says ``complete``, and the runs' ``messages_deleted``
add up to the rows gone.
"""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import psycopg

from tests.partitioned import (
    Application,
    Ledger,
    attached_leaves,
    create_table,
    day_of,
    deleted_reported,
    detached_leaves,
    kill_between_detach_and_drop,
    leaf_name,
    missing_live_rows,
    not_attached,
    open_snapshot,
    pending_leaves,
    rows_gone,
    rows_through_parent,
    spawn_gc,
)
from tests.support import run_cli

Conn = psycopg.Connection[Any]

SAMPLE_BLOCKS = 128
"""Blocks the planner samples of each leaf today (``engine.planner.LEAF_SAMPLE_BLOCKS``)."""
LONG_LOCK_TIMEOUT = ("--lock-timeout-ms", "10000")
"""Long enough that a detach waits for the test's open transaction instead of giving up."""


def gc(dsn: str, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """``msggc gc --table public.pm --json FLAGS`` to its end, and its JSON result (None: none)."""
    done = run_cli("gc", "--dsn", dsn, "--table", "public.pm", "--json", *flags, timeout_s=120)
    assert "Traceback" not in done.stderr, done.stderr
    try:
        result = json.loads(done.stdout)
    except ValueError:
        result = None
    return done, result


def assert_promise(conn: Conn, ledger: Ledger, complete: bool) -> None:
    """Every live row the application wrote is visible through ``pm`` with its values; a run that
    says complete left no leaf detached or pending; the runs count exactly the rows gone."""
    missing = missing_live_rows(conn, ledger)
    assert not missing, f"live rows not visible through pm (ledger, seen): {dict(list(missing.items())[:5])}"
    if complete:
        assert not not_attached(conn), (
            f"the run says complete, yet leaves are detached {detached_leaves(conn)}"
            f" or pending detach {pending_leaves(conn)}")
    gone = rows_gone(conn, ledger)
    assert deleted_reported(conn) == len(gone), (
        f"the runs report {deleted_reported(conn):,} rows deleted, {len(gone):,} rows are gone"
        f" (not attached: {not_attached(conn)})")


def assert_status_shows_the_detached_leaf(dsn: str, conn: Conn) -> None:
    """``msggc status`` names every leaf a killed run left detached (the issue's rule)."""
    status = run_cli("status", "--dsn", dsn)
    assert status.returncode == 0, status.stderr
    for leaf in detached_leaves(conn):
        assert leaf in status.stdout, f"msggc status does not show {leaf}, left detached:\n{status.stdout}"


def run_status(conn: Conn) -> str:
    return conn.execute("SELECT status FROM gc_runs ORDER BY id DESC LIMIT 1").fetchone()[0]


def later_rows(app: Application, day: int, rows: int = 40) -> None:
    """A later leaf that holds rows, half of them live: the application writes there now."""
    app.insert([day] * rows, [i % 2 == 0 for i in range(rows)])


def leaf_with_a_live_row_the_sample_misses(conn: Conn, app: Application, rows: int) -> int:
    """Leaf d0: ``rows`` processed rows of one 200-byte payload each, but one live row in a block
    today's sample (``TABLESAMPLE SYSTEM`` of 128 blocks, ``REPEATABLE (7)``) does not read.
    Built twice: once to find the sampled blocks, once with the live row in a block outside them
    (a row without its processed_at is 8 bytes shorter: the blocks hold the same rows)."""
    payload = "x" * 200

    def build(live: int | None) -> None:
        conn.execute("TRUNCATE pm_d0")
        conn.execute("INSERT INTO pm SELECT g, %s, CASE WHEN g <> %s THEN %s::timestamptz END, %s"
                     " FROM generate_series(1, %s) g ORDER BY g",
                     (day_of(0), live or 0, "2026-02-01 00:00:00+00", payload, rows))

    build(None)
    blocks = conn.execute("SELECT pg_relation_size('pm_d0') / current_setting('block_size')::int"
                          ).fetchone()[0]
    percent = min(100.0, 100.0 * SAMPLE_BLOCKS / blocks)
    sampled = {r[0] for r in conn.execute(
        "SELECT DISTINCT (ctid::text::point)[0]::int FROM pm_d0 TABLESAMPLE SYSTEM (%s) REPEATABLE (7)",
        (percent,))}
    missed = next(b for b in range(blocks // 2, blocks) if b not in sampled)
    live = conn.execute("SELECT id FROM pm_d0 WHERE ctid = %s::tid", (f"({missed},3)",)).fetchone()[0]
    build(live)
    assert conn.execute(
        "SELECT count(*) FILTER (WHERE processed_at IS NULL)"
        " FROM pm_d0 TABLESAMPLE SYSTEM (%s) REPEATABLE (7)",
        (percent,)).fetchone()[0] == 0, "the sample reads the live row: the scenario is not the issue's"
    conn.execute("ANALYZE pm")
    ledger = app.ledger
    for row_id, row in rows_through_parent(conn).items():
        ledger.rows[row_id] = row
    ledger.next_id = rows + 1
    return int(live)


def test_an_open_snapshot_during_the_run_leaves_no_leaf_pending_and_the_live_row_the_sample_missed_seen(
        conn: Conn, dsn: str) -> None:
    """1a, as filed: an application's REPEATABLE READ transaction on ``pm`` is open for 4 s while
    ``gc --workers 1`` runs, on a leaf of processed rows with one live row a sample would miss.
    The leaf is not wholly garbage, so it must not be detached at all (item 2), and nothing may
    be left pending: the run completes, the live row visible through ``pm``; a ``--no-drop`` run
    after it finds the same."""
    create_table(conn, days=2)
    ledger = Ledger()
    app = Application(conn, ledger)
    live = leaf_with_a_live_row_the_sample_misses(conn, app, rows=8000)
    later_rows(app, day=1)
    reader = open_snapshot(dsn)
    closer = threading.Timer(4.0, reader.rollback)
    closer.start()
    try:
        done, result = gc(dsn, "--workers", "1")
    finally:
        closer.join()
        reader.close()
    assert done.returncode == 0 and result is not None and result["status"] == "complete", (
        done.returncode, done.stderr, pending_leaves(conn))
    assert rows_through_parent(conn)[live].processed_at is None
    assert_promise(conn, ledger, complete=True)

    again, result = gc(dsn, "--no-drop")
    assert again.returncode == 0 and result is not None and result["status"] == "complete", again.stderr
    assert_promise(conn, ledger, complete=True)
    assert sorted(ledger.garbage() - rows_gone(conn, ledger)) == []


def garbage_day_zero(conn: Conn, rows: int, default: bool = False) -> tuple[Ledger, Application]:
    """Days 0-2 (with a DEFAULT partition if asked): day 0 ``rows`` rows, all processed; days 1
    and 2 the application's later rows; analyzed."""
    create_table(conn, days=3, default=default)
    ledger = Ledger()
    app = Application(conn, ledger)
    app.insert([0] * rows, [True] * rows)
    later_rows(app, day=1)
    later_rows(app, day=2)
    conn.execute("ANALYZE pm")
    return ledger, app


def test_a_detach_that_meets_an_open_snapshot_is_finished_by_the_next_run_whatever_its_flags(
        conn: Conn, dsn: str) -> None:
    """1a, the pending detach itself: a wholly-garbage leaf whose detach meets an application's
    REPEATABLE READ snapshot held for the whole run. The run may not detach it; whatever it
    did, it never issues a second ``DETACH CONCURRENTLY`` of a pending leaf (``already pending
    detach``), and says complete only with no leaf pending; once the snapshot is gone, the next
    run, even with ``--no-drop``, finishes or undoes what is left and says complete."""
    ledger, _ = garbage_day_zero(conn, rows=500)
    reader = open_snapshot(dsn)
    try:
        first, result = gc(dsn, "--workers", "1")
        assert "already pending detach" not in first.stderr, first.stderr
        assert first.returncode in (0, 3), (first.returncode, first.stderr)
        assert_promise_while_reading = run_status(conn) == "complete"
    finally:
        reader.rollback()
        reader.close()
    assert_promise(conn, ledger, complete=assert_promise_while_reading)

    again, result = gc(dsn, "--no-drop")
    assert again.returncode == 0 and result is not None and result["status"] == "complete", (
        again.stderr, pending_leaves(conn), detached_leaves(conn))
    assert_promise(conn, ledger, complete=True)
    assert sorted(ledger.garbage() - rows_gone(conn, ledger)) == []


def killed_between_detach_and_drop(conn: Conn, dsn: str, default: bool) -> tuple[Ledger, Application]:
    """Days 0-2 (with a DEFAULT partition if asked), day 0 wholly garbage; ``gc --workers 2``
    killed (``kill -9``) after day 0's leaf is detached and before its drop commits."""
    ledger, app = garbage_day_zero(conn, rows=1000, default=default)
    reader = open_snapshot(dsn)
    proc = spawn_gc(dsn, "--workers", "2", *LONG_LOCK_TIMEOUT)
    point = kill_between_detach_and_drop(conn, dsn, reader, proc)
    assert point != "ended", f"the run ended before it detached a leaf: {proc.communicate()}"
    reader.close()
    if point == "between":
        assert_status_shows_the_detached_leaf(dsn, conn)
    return ledger, app


def test_a_run_killed_between_detach_and_drop_is_finished_by_a_no_drop_run(conn: Conn, dsn: str) -> None:
    """1b: ``kill -9`` of ``gc --workers 2`` after a wholly-garbage leaf is detached and before its
    drop commits; meanwhile the application's insert into that day fails (no partition: it is
    told, nothing is lost). The next run is ``gc --no-drop``: it must finish or undo the detach
    before it says complete (today it returns early when drops are off, says complete, and the
    leaf's rows are gone uncounted); then the day accepts rows again, or its leaf is gone with
    every one of its rows counted."""
    ledger, app = killed_between_detach_and_drop(conn, dsn, default=False)
    app.insert([0, 0], [False, False])  # fails while d0 is detached; recorded only if it committed

    done, result = gc(dsn, "--no-drop", "--workers", "2")
    assert done.returncode == 0 and result is not None and result["status"] == "complete", done.stderr
    assert_promise(conn, ledger, complete=True)
    if leaf_name(0) in attached_leaves(conn):
        assert app.insert([0, 0], [False, False]), "day 0 has its leaf back, yet refuses rows"
    assert_promise(conn, ledger, complete=True)

    final, result = gc(dsn)
    assert final.returncode == 0 and result is not None and result["status"] == "complete", final.stderr
    assert_promise(conn, ledger, complete=True)
    assert sorted(ledger.garbage() - rows_gone(conn, ledger)) == []


def test_rows_the_default_partition_took_while_a_leaf_was_detached_stay_visible_and_the_leaf_comes_back(
        conn: Conn, dsn: str) -> None:
    """1c: with a DEFAULT partition, ``kill -9`` between a leaf's detach and its drop; the
    application inserts live rows into that day meanwhile, and the default partition takes
    them. ``gc --no-drop`` must then give the day its leaf back (moving those rows into it in
    the same transaction: else the attach fails with ``updated partition constraint for
    default partition would be violated``) or drop the leaf after its full check, and say
    complete only then; the application's rows stay visible through ``pm`` all along."""
    ledger, app = killed_between_detach_and_drop(conn, dsn, default=True)
    written = app.insert([0, 0], [False, False])
    assert written, "with a default partition, a day's rows always have a partition"
    assert_promise(conn, ledger, complete=False)

    done, result = gc(dsn, "--no-drop", "--workers", "2")
    assert done.returncode == 0 and result is not None and result["status"] == "complete", (
        done.stderr, detached_leaves(conn))
    assert_promise(conn, ledger, complete=True)

    for flags in ((), ("--no-drop",)):
        again, result = gc(dsn, *flags)
        assert again.returncode == 0 and result is not None and result["status"] == "complete", again.stderr
        assert_promise(conn, ledger, complete=True)
    assert app.insert([0], [False]), "day 0 refuses rows"
    assert_promise(conn, ledger, complete=True)
    assert sorted(ledger.garbage() - rows_gone(conn, ledger)) == []
