"""A run says ``complete`` only when it is: usage errors leave no run, errors close it as failed,
a dead worker fails the run, a resumed run walks its own recorded plan, and every notice's
status is its run's."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from engine import collect, runs
from engine.config import GcOptions
from engine.db import one_row
from engine.errors import GcAlreadyRunning, UsageError
from engine.finish import Outcome
from engine.result import Progress
from engine.service import outbox
from engine.service.notice import NoticeFinisher
from engine.service.notify import SIGNATURE_HEADER, WebhookNotifier, sign
from engine.status import RunStatus
from tests.data import fill, run_rows, surviving_ids
from tests.faults.helpers import CallbackServer, notice
from tests.polling import wait_until
from tests.support import run_cli


def statuses(dsn: str) -> list[str]:
    return [row["status"] for row in run_rows(dsn)]


def add_garbage(conn, rows: int) -> None:
    """More garbage after the first fill (new ids and message ids, at the table's end)."""
    conn.execute(
        "INSERT INTO messages (message_id, chat_id, direction, status, payload, processed_at)"
        " SELECT 'later.' || g, 'chat', 1, 2, 'p', now() FROM generate_series(1, %s) g", (rows,))


@pytest.mark.parametrize("target", ["empty.csv.gz", "missing/dir/x.csv.gz", "missing-dir/"])
def test_a_usage_error_in_archive_to_leaves_no_run_and_the_next_gc_collects_everything(
        conn, dsn, tmp_path, target):
    (tmp_path / "empty.csv.gz").touch()
    fill(conn, [True] * 100)
    refused = run_cli("gc", "--dsn", dsn, "--archive-to", f"{tmp_path}/{target}")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert statuses(dsn) == []

    add_garbage(conn, 8000)
    result = collect(dsn, GcOptions())
    assert result.status is RunStatus.COMPLETE and result.resumed_from is None
    assert result.messages_deleted == 8100 and surviving_ids(conn) == []


def test_an_error_after_the_run_exists_closes_it_as_failed(conn, dsn, tmp_path):
    fill(conn, [True] * 3000)
    archive = tmp_path / "a.csv.gz"
    first = collect(dsn, GcOptions(archive_to=str(archive), batch_size=100, max_rows=500))
    assert first.status is RunStatus.STOPPED
    archive.unlink()  # the resumed run's own file is gone: it cannot continue it
    failed = collect(dsn, GcOptions(archive_to=str(archive)))
    assert failed.status is RunStatus.FAILED and "missing" in (failed.error or "")
    assert statuses(dsn) == ["superseded", "failed"]


def test_an_exception_in_a_helper_worker_fails_the_run_and_its_webhook_says_failed(conn, dsn):
    fill(conn, [True] * 4000)

    def crash_in_helper(progress: Progress) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise OSError(28, "No space left on device")

    with CallbackServer() as callback:
        result = collect(dsn, GcOptions(workers=2, batch_size=100),
                         NoticeFinisher(WebhookNotifier(callback.url)), on_progress=crash_in_helper)
        assert result.status is RunStatus.FAILED
        assert result.error == "internal error: OSError: [Errno 28] No space left on device"
        (body,) = callback.accepted
    gc = notice(body)
    assert gc["status"] == "failed" and gc["errors"][0]["details"] == result.error
    assert statuses(dsn) == ["failed"]
    assert gc["messages_deleted"] == 4000 - len(surviving_ids(conn))


def test_a_resumed_run_walks_its_recorded_strategy_and_says_so(conn, dsn):
    fill(conn, [True] * 3000)
    first = collect(dsn, GcOptions(strategy="index", batch_size=100, max_rows=300))
    assert first.status is RunStatus.STOPPED
    add_garbage(conn, 1000)  # ids above the recorded walk's end: the resumed walk extends to them
    resumed = collect(dsn, GcOptions())
    assert resumed.status is RunStatus.COMPLETE and resumed.strategy == "index"
    assert resumed.reason == f"resumes run {first.run_id}'s index walk from its checkpoint"
    recorded = conn.execute("SELECT strategy FROM gc_runs WHERE id = %s", (resumed.run_id,)).fetchone()
    assert recorded == ("index",)
    assert surviving_ids(conn) == []


def test_batch_size_holds_on_a_resumed_physical_walk(conn, dsn):
    # the first third of the table is dense, the rest too: after a budgeted run removed most of
    # the first part, the table-wide sample underestimates the garbage per block of what is left
    fill(conn, [True] * 40_000 + [i % 5 == 0 for i in range(40_000)] + [True] * 40_000)
    collect(dsn, GcOptions(strategy="physical", max_rows=40_000))
    resumed = collect(dsn, GcOptions(batch_size=500))
    assert resumed.status is RunStatus.COMPLETE and resumed.strategy == "physical"
    rows_per_batch = resumed.messages_deleted / resumed.batches
    assert 250 <= rows_per_batch <= 1000, rows_per_batch


def test_dry_run_on_referenced_garbage_plans_around_it_and_names_the_constraint(conn, dsn):
    fill(conn, [True] * 10)
    conn.execute("CREATE TABLE replies (id int PRIMARY KEY, message bigint REFERENCES messages (id))")
    conn.execute("INSERT INTO replies VALUES (1, 3)")
    done = run_cli("gc", "--dsn", dsn, "--dry-run", "--strategy", "index")
    assert done.returncode == 0 and done.stderr == ""
    assert "replies_message_fkey (public.replies, ON DELETE NO ACTION): ~1 rows kept" in done.stdout


def test_a_queued_notice_keeps_the_signature_of_the_process_that_queued_it(conn, httpserver):
    httpserver.expect_request("/gc", method="POST").respond_with_data("{}")
    url = httpserver.url_for("/gc")
    run = runs.start(conn, "messages", "", "index", [], {}, resumed_from=None)
    with conn.transaction():
        NoticeFinisher(WebhookNotifier(url, secret="A")).record(
            conn, Outcome(run.id, "", RunStatus.COMPLETE, 0))
    delivered, pending = outbox.deliver_due(conn, lambda target: WebhookNotifier(target, secret="B"))
    assert (delivered, pending) == (1, 0)
    ((request, _response),) = httpserver.log
    assert request.headers[SIGNATURE_HEADER] == sign(request.get_data(), "A")


def test_a_usage_error_in_options_raises_before_a_run_exists(conn, dsn, tmp_path: Path):
    existing = tmp_path / "x.csv.gz"
    existing.touch()
    with pytest.raises(UsageError):
        collect(dsn, GcOptions(archive_to=str(existing)))
    assert statuses(dsn) == []


def scans_of_messages(conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return one_row(conn.execute(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables"
        " WHERE relid = 'messages'::regclass"))[0]


def test_a_gc_meeting_a_busy_table_waits_without_sampling_it(conn, dsn):
    fill(conn, [True] * 1000)
    oid = one_row(conn.execute("SELECT 'messages'::regclass::oid"))[0]
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s::oid::int)", (runs.ADVISORY_LOCK_CLASS, oid))
        before = scans_of_messages(conn)
        with pytest.raises(GcAlreadyRunning):
            collect(dsn, GcOptions())
        wait_until(lambda: not one_row(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'msggc'"
            " AND datname = current_database()"))[0], what="the refused GC's backend to exit")
        time.sleep(0.5)  # its statistics are flushed on exit
        assert scans_of_messages(conn) == before
        # the same measure sees a GC that plans: the sample and the key bounds scan the table
        collect(dsn, GcOptions(dry_run=True))
        wait_until(lambda: scans_of_messages(conn) > before, what="the planner's scans to be counted")
