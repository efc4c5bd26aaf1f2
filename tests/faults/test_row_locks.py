"""Row locks both ways, measured with timestamps: GC waits at most lock_timeout on a row the
application holds (then leaves it for the next run), and the application waits on GC at most for
the batch in flight."""

from __future__ import annotations

import json
import random
import statistics
import time

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from tests.data import fill, live_ids, surviving_ids
from tests.faults.helpers import Conn, Ledger, table_fate
from tests.support import run_cli, spawn_cli

LOCK_TIMEOUT_MS = 50
WORK_SLACK_MS = 250
"""A batch that met a lock also redoes its work with SKIP LOCKED; generous for a busy CI box."""


@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_gc_waits_at_most_lock_timeout_on_rows_the_app_holds_and_skips_them(
    conn: Conn, dsn: str, strategy: str, ledger: Ledger
) -> None:
    garbage = [i % 3 != 0 for i in range(20_000)]
    fill(conn, garbage)
    held = [i for i in range(50, len(garbage), 700) if garbage[i - 1]]
    with psycopg.connect(dsn) as app:
        app.execute("SELECT id FROM messages WHERE id = ANY(%s) FOR UPDATE", (held,))
        began = time.monotonic()
        proc = run_cli("gc", "--dsn", dsn, "--json", "--strategy", strategy, "--batch-size", "500",
                       "--lock-timeout-ms", str(LOCK_TIMEOUT_MS))
        gc_seconds = time.monotonic() - began
        still_holding = app.info.transaction_status == TransactionStatus.INTRANS
        app.rollback()

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    fate = table_fate(conn, garbage)
    ledger.add(rows_checked=fate.checked, rows_deleted_while_live=fate.deleted_while_live,
               rows_counted_twice=fate.counted_twice)
    print(f"\nrow locks ({strategy}): {len(held)} rows held by the app; GC {gc_seconds:.2f}s,"
          f" {result['batches']} batches, batch p50 {result['batch_ms_p50']:.1f} ms,"
          f" max {result['batch_ms_max']:.1f} ms (lock_timeout {LOCK_TIMEOUT_MS} ms)")

    assert still_holding  # GC finished while the app still held its locks: it never waited for them
    assert result["status"] == "complete"
    assert result["rows_skipped_locked"] == len(held)
    assert result["batch_ms_max"] < LOCK_TIMEOUT_MS + WORK_SLACK_MS
    assert surviving_ids(conn) == sorted(live_ids(garbage) + held)
    assert fate.counted_twice == 0


GARBAGE_ROWS = 150_000
TARGET_BATCH_MS = 50
MAX_APP_UPDATES = 20_000


def next_garbage_ids(app: Conn) -> list[int]:
    """The garbage rows GC is about to delete: it walks this table in id order."""
    return [row[0] for row in app.execute(
        "SELECT id FROM messages WHERE processed_at IS NOT NULL ORDER BY id LIMIT 20")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["physical", "index"])
def test_the_app_waits_on_gc_for_at_most_the_batch_in_flight(
    conn: Conn, dsn: str, strategy: str, ledger: Ledger
) -> None:
    fill(conn, [True] * GARBAGE_ROWS)
    rng = random.Random(strategy)
    latencies_ms: list[float] = []
    gc = spawn_cli("gc", "--dsn", dsn, "--json", "--strategy", strategy,
                   "--target-batch-ms", str(TARGET_BATCH_MS))
    deadline = time.monotonic() + 120
    with psycopg.connect(dsn, autocommit=True) as app:
        while gc.poll() is None and len(latencies_ms) < MAX_APP_UPDATES and time.monotonic() < deadline:
            ahead = next_garbage_ids(app)
            if not ahead:
                break
            began = time.monotonic()
            app.execute("UPDATE messages SET status = status + 1 WHERE id = %s", (rng.choice(ahead),))
            latencies_ms.append((time.monotonic() - began) * 1000)
    out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, err
    result = json.loads(out)

    waited = [ms for ms in latencies_ms if ms > 5]
    ledger.add(app_lock_waits_measured=len(latencies_ms))
    print(f"\napp vs GC ({strategy}): {len(latencies_ms)} app UPDATEs on rows GC was deleting,"
          f" {len(waited)} waited >5 ms; app p50 {statistics.median(latencies_ms):.1f} ms,"
          f" max {max(latencies_ms):.1f} ms; GC {result['batches']} batches,"
          f" p50 {result['batch_ms_p50']:.1f} ms, max {result['batch_ms_max']:.1f} ms")

    assert result["status"] == "complete"
    assert len(latencies_ms) >= 20
    # never more than the batch in flight (plus the app's own round trip)
    assert max(latencies_ms) <= result["batch_ms_max"] + 75
