"""The database restarted or down mid-run: the collector reconnects with backoff and completes, or,
when the outage outlasts its reconnect window, fails cleanly (exit 1, a 1014 notice) and the next
run resumes from the checkpoint with exact totals."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from engine import migrate
from engine.tools.embedded import dsn_for_database
from tests.data import fill
from tests.faults.helpers import (
    CallbackServer,
    Ledger,
    PrivateServer,
    batches_committed,
    notice,
    run_statuses,
    table_fate,
)
from tests.polling import wait_until
from tests.support import run_cli, spawn_cli
from tests.test_archive_file import archived_ids

GARBAGE = [i % 4 != 0 for i in range(20_000)]
SLOW_GC = ("--batch-size", "50", "--sleep", "0.01", "--json")
PASSWORD = "Restart-S3cret"
"""Trust authentication ignores it; it is there to prove the error messages mask it."""


@pytest.fixture
def private_dsn(private_server: PrivateServer) -> Iterator[str]:
    """A fresh migrated database on the private server, filled with GARBAGE."""
    admin_dsn = private_server.start()
    name = f"faults_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = dsn_for_database(admin_dsn, name).replace("postgres@", f"postgres:{PASSWORD}@", 1)
    migrate.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        fill(conn, GARBAGE)
    yield dsn
    with psycopg.connect(private_server.start(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def start_slow_gc(dsn: str, webhook: str, *extra: str,
                  reconnect_window_s: float | None = None) -> subprocess.Popen[str]:
    """A collector paced so the outage lands mid-walk; returns once it has committed 5 batches."""
    process = spawn_cli("gc", "--dsn", dsn, "--webhook", webhook, *SLOW_GC, *extra,
                        reconnect_window_s=reconnect_window_s)
    with psycopg.connect(dsn, autocommit=True) as watch:
        wait_until(lambda: batches_committed(watch) >= 5 or process.poll() is not None, 30,
                   "the collector's first batches")
    assert process.poll() is None, process.communicate()
    return process


def assert_exact_totals(dsn: str, ledger: Ledger) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fate = table_fate(conn, GARBAGE)
        statuses = run_statuses(conn)
    ledger.add(**fate.figures())
    assert (fate.deleted_while_live, fate.garbage_left, fate.counted_twice) == (0, 0, 0), fate
    return statuses


@pytest.mark.slow
def test_a_database_restart_mid_run_is_survived_by_reconnecting(
    private_server: PrivateServer, private_dsn: str, callback: CallbackServer, ledger: Ledger
) -> None:
    process = start_slow_gc(private_dsn, callback.url)
    private_server.stop()  # fast shutdown: the collector's session is terminated
    time.sleep(1.0)
    private_server.start()
    out, err = process.communicate(timeout=120)
    ledger.add(db_outages=1)

    assert process.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "complete" and result["messages_deleted"] == sum(GARBAGE)
    assert assert_exact_totals(private_dsn, ledger) == ["complete"]  # the same run, continued
    assert [notice(body) for body in callback.accepted] == [
        {"messages_deleted": sum(GARBAGE), "status": "complete"}]


@pytest.mark.slow
def test_a_database_down_beyond_the_reconnect_window_fails_cleanly_and_the_next_run_resumes(
    private_server: PrivateServer, private_dsn: str, callback: CallbackServer, ledger: Ledger
) -> None:
    process = start_slow_gc(private_dsn, callback.url, reconnect_window_s=1.5)
    private_server.stop()
    try:
        out, err = process.communicate(timeout=60)
    finally:
        private_server.start()
    ledger.add(db_outages=1)

    assert process.returncode == 1, err
    assert "Traceback" not in err and PASSWORD not in out + err
    failed = json.loads(out)
    assert failed["status"] == "failed" and "cannot connect to" in failed["error"]
    [first] = [notice(body) for body in callback.accepted]  # sent directly: the outbox was down
    assert first["status"] == "failed" and first["errors"][0]["code"] == 1014
    assert PASSWORD not in first["errors"][0]["details"]

    second = run_cli("gc", "--dsn", private_dsn, "--webhook", callback.url, "--json")
    assert second.returncode == 0, second.stderr
    resumed = json.loads(second.stdout)
    assert resumed["status"] == "complete"
    assert assert_exact_totals(private_dsn, ledger) == ["superseded", "complete"]
    notices = [notice(body) for body in callback.accepted]
    assert notices[1] == {"messages_deleted": resumed["messages_deleted"], "status": "complete"}
    assert len(notices) == 2
    # a batch whose commit was in flight when the server went may be counted by the database only
    assert first["messages_deleted"] + resumed["messages_deleted"] <= sum(GARBAGE)


@pytest.mark.slow
def test_a_server_crash_under_async_commit_rewinds_to_what_the_server_kept(
    private_server: PrivateServer, private_dsn: str, callback: CallbackServer, ledger: Ledger, tmp_path: Path
) -> None:
    """Immediate shutdown = a crash: async batch commits not yet flushed are lost, rows and
    checkpoint together. The collector must not trust its own memory of them: it walks those
    rows again, and the archive file drops the copies it wrote for them."""
    path = tmp_path / "gone.csv.gz"
    process = start_slow_gc(private_dsn, callback.url, "--async-commit", "--archive-to", str(path))
    private_server.stop("immediate")
    time.sleep(1.0)
    private_server.start()
    out, err = process.communicate(timeout=120)
    ledger.add(db_outages=1)

    assert process.returncode == 0, err
    assert json.loads(out)["messages_deleted"] == sum(GARBAGE)
    assert assert_exact_totals(private_dsn, ledger) == ["complete"]
    assert archived_ids(path) == [i for i, flag in enumerate(GARBAGE, start=1) if flag]
