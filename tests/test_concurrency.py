"""GC beside a live application: it never waits on the app's locks and never deletes a row
that stopped being garbage."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from engine import collect
from engine.config import GcOptions
from engine.db import APPLICATION_NAME
from engine.errors import GcAlreadyRunning
from engine.runs import ADVISORY_LOCK_CLASS
from tests.data import fill, live_ids, surviving_ids
from tests.polling import wait_until


@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_rows_locked_by_the_app_are_skipped_not_waited_on(conn, dsn, strategy):
    garbage = [i % 2 == 0 for i in range(2000)]
    fill(conn, garbage)
    locked = [11, 13, 15, 1001]
    with psycopg.connect(dsn) as app:
        app.execute("SELECT id FROM messages WHERE id = ANY(%s) FOR UPDATE", (locked,))
        began = time.monotonic()
        result = collect(dsn, GcOptions(strategy=strategy, batch_size=100, lock_timeout_ms=50))
        took = time.monotonic() - began
        app.rollback()

    assert result.status == "complete"
    assert result.rows_skipped_locked == len(locked)
    assert surviving_ids(conn) == sorted(live_ids(garbage) + locked)
    assert took < 3.0  # a few lock timeouts of 50 ms, never the app's transaction length


def waits_on(conn: psycopg.Connection[Any], app_pid: int) -> bool:
    """Whether a session of the GC (application_name msggc) waits on a lock the app holds."""
    return conn.execute(
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND %s = ANY(pg_blocking_pids(pid))", (APPLICATION_NAME, app_pid)
    ).fetchone()[0]


@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_a_row_unprocessed_concurrently_is_not_deleted(conn, dsn, strategy):
    garbage = [True] * 500
    fill(conn, garbage)
    with psycopg.connect(dsn) as app:
        app.execute("UPDATE messages SET processed_at = NULL WHERE id = 250")
        outcome: dict[str, object] = {}
        gc = threading.Thread(target=lambda: outcome.update(result=collect(
            dsn, GcOptions(strategy=strategy, lock_timeout_ms=5000))))
        gc.start()
        wait_until(lambda: waits_on(conn, app.info.backend_pid) or not gc.is_alive(), 15,
                   "the GC to reach row 250 and wait on the app's row lock")
        app.commit()
        gc.join(30)

    assert outcome["result"].status == "complete"
    assert surviving_ids(conn) == [250]
    assert outcome["result"].messages_deleted == 499


def test_a_second_gc_on_the_same_table_refuses_clearly(conn, dsn):
    fill(conn, [True] * 10)
    oid = conn.execute("SELECT 'messages'::regclass::oid::int").fetchone()[0]
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (ADVISORY_LOCK_CLASS, oid))
        pid = other.info.backend_pid
        with pytest.raises(GcAlreadyRunning, match=f"already running on messages .backend pid {pid}"):
            collect(dsn, GcOptions())
    assert len(surviving_ids(conn)) == 10


def test_statement_timeout_splits_the_batch_instead_of_skipping_it(conn, dsn):
    """A batch that exceeds statement_timeout is retried at half the size, never skipped."""
    garbage = [True] * 3000
    fill(conn, garbage)
    conn.execute(
        "CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_sleep(0.0005); RETURN OLD; END $$"
    )
    conn.execute("CREATE TRIGGER slow BEFORE DELETE ON messages FOR EACH ROW EXECUTE FUNCTION slow_delete()")

    result = collect(dsn, GcOptions(strategy="index", batch_size=1000, statement_timeout_ms=150))

    assert result.status == "complete"
    assert surviving_ids(conn) == []
    assert result.messages_deleted == 3000
    assert result.batches > 3  # the 1000-row batches (~0.5 s each) were split
