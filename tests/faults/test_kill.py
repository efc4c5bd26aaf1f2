"""The collector killed with SIGKILL at random moments of one run, resumed each time: the resumed
chain ends with the table an uninterrupted run leaves, each row counted once, one notification."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from engine.service import outbox
from engine.service.notify import WebhookNotifier
from tests.data import fill, live_ids, surviving_ids
from tests.faults.helpers import (
    CallbackServer,
    Conn,
    Ledger,
    audited_deletions,
    batches_committed,
    content_digest,
    counted_deletions,
    install_delete_audit,
    notice,
    outbox_rows,
    run_statuses,
    table_fate,
    wait_for_gc_backends_gone,
)
from tests.polling import wait_until
from tests.support import run_cli, spawn_cli
from tests.test_archive_file import archived_ids

KILLS = 20
ARCHIVE_KILLS = 8
SEED = int(os.environ.get("MSGGC_FAULT_SEED", "6"))
"""Seed of the kill moments; set MSGGC_FAULT_SEED to replay or vary them."""


def kill_at_a_random_moment(conn: Conn, process: subprocess.Popen[str], rng: random.Random) -> bool:
    """SIGKILL the collector during start-up (a quarter of the time) or mid-walk; True if it had
    committed at least one batch when it died."""
    before = batches_committed(conn)
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.0, 0.5))  # connecting, planning, opening or resuming the run
    else:
        wait_until(lambda: batches_committed(conn) > before or process.poll() is not None,
                   30, "the collector's first batch")
        time.sleep(rng.uniform(0.0, 0.4))
    assert process.poll() is None, f"the collector ended before it was killed: {process.communicate()}"
    process.kill()
    process.communicate(timeout=10)
    return batches_committed(conn) > before


@pytest.mark.slow
def test_sigkill_at_20_random_moments_then_resume_leaves_the_table_of_an_uninterrupted_run(
    conn: Conn, dsn: str, callback: CallbackServer, ledger: Ledger
) -> None:
    rng = random.Random(SEED)
    garbage = [i % 5 != 0 for i in range(50_000)]
    fill(conn, garbage)
    install_delete_audit(conn)
    expected_digest = content_digest(conn, live_ids(garbage))
    gc = ("gc", "--dsn", dsn, "--webhook", callback.url, "--json")

    mid_walk = 0
    for _ in range(KILLS):
        process = spawn_cli(*gc, "--batch-size", "50", "--sleep", "0.01")
        mid_walk += kill_at_a_random_moment(conn, process, rng)
        wait_for_gc_backends_gone(conn)
    killed_runs_deleted = counted_deletions(conn)
    assert 0 < killed_runs_deleted < sum(garbage), "the kills must land before the end of the walk"

    final = run_cli(*gc)
    assert final.returncode == 0, final.stderr
    result = json.loads(final.stdout)

    fate = table_fate(conn, garbage)
    audit = audited_deletions(conn)
    notices = [notice(body) for body in callback.accepted]
    ledger.add(sigkills=KILLS, **fate.figures(),
               notifications_duplicated=max(0, len(notices) - 1), notifications_lost=1 - min(1, len(notices)))
    print(f"\nsigkill: seed {SEED}, {KILLS} kills ({mid_walk} mid-walk), {killed_runs_deleted} rows deleted"
          f" by killed runs, {result['messages_deleted']} by the final run; {fate}")

    assert mid_walk >= KILLS // 2
    assert surviving_ids(conn) == live_ids(garbage)
    assert content_digest(conn) == expected_digest
    assert fate.counted_twice == 0
    assert audit.deleted_while_live == [] and audit.counted_twice == 0 and len(audit.ids) == sum(garbage)
    statuses = run_statuses(conn)
    assert statuses[-1] == "complete" and set(statuses[:-1]) <= {"superseded"}
    # the killed runs never reached their last transaction: they queued nothing and sent nothing
    assert notices == [{"messages_deleted": result["messages_deleted"], "status": "complete"}]
    assert [(row["run_id"], row["delivered_at"] is not None) for row in outbox_rows(conn)] == [
        (result["run_id"], True)]
    assert callback.attempts == 1


def test_a_notice_whose_delivery_was_killed_is_delivered_by_the_next_run(
    conn: Conn, dsn: str, callback: CallbackServer, ledger: Ledger
) -> None:
    fill(conn, [True] * 300)
    callback.mode = "slow"
    process = spawn_cli("gc", "--dsn", dsn, "--webhook", callback.url)
    wait_until(lambda: callback.attempts >= 1, 30, "the collector to POST its notice")
    process.kill()  # the run's last transaction committed; its POST is in flight
    process.communicate(timeout=10)
    assert run_statuses(conn) == ["complete"]
    assert [row["delivered_at"] for row in outbox_rows(conn)] == [None]

    callback.mode = "ok"
    callback.release()
    wait_for_gc_backends_gone(conn)
    proc = run_cli("gc", "--dsn", dsn, "--webhook", callback.url)
    assert proc.returncode == 0, proc.stderr
    delivered_by_the_next_run = [notice(body) for body in callback.accepted]
    again = outbox.deliver_due(conn, WebhookNotifier)

    ledger.add(sigkills=1, notifications_lost=max(0, 2 - len(callback.accepted)),
               notifications_duplicated=max(0, len(callback.accepted) - 2))
    # the next run delivers its own notice, then the one left due by the killed run
    assert delivered_by_the_next_run == [{"messages_deleted": 0, "status": "complete"},
                                         {"messages_deleted": 300, "status": "complete"}]
    assert all(row["delivered_at"] is not None for row in outbox_rows(conn))
    assert again == (0, 0)
    assert len(callback.accepted) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gone.csv.gz", "gone.csv.zst", "gone.parquet"])
def test_sigkill_during_an_archive_to_file_run_leaves_each_deleted_row_in_the_file_once(
    conn: Conn, dsn: str, tmp_path: Path, ledger: Ledger, name: str
) -> None:
    rng = random.Random(SEED + 1)
    garbage = [i % 4 != 0 for i in range(20_000)]
    fill(conn, garbage)
    path = tmp_path / name
    gc = ("gc", "--dsn", dsn, "--archive-to", str(path), "--json")

    for _ in range(ARCHIVE_KILLS):
        process = spawn_cli(*gc, "--batch-size", "50", "--sleep", "0.01")
        kill_at_a_random_moment(conn, process, rng)
        wait_for_gc_backends_gone(conn)
    final = run_cli(*gc)
    assert final.returncode == 0, final.stderr

    fate = table_fate(conn, garbage)
    ledger.add(sigkills=ARCHIVE_KILLS, **fate.figures())
    in_file = archived_ids(path)
    assert surviving_ids(conn) == live_ids(garbage)
    assert in_file == sorted(set(range(1, len(garbage) + 1)) - set(live_ids(garbage)))
    assert len(in_file) == len(set(in_file)) == counted_deletions(conn)
