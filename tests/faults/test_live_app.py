"""GC beside a live application that inserts messages, marks them processed and un-processes some:
afterwards no row that was live when it was deleted is gone, and every row that was garbage
throughout the run is gone. The application logs each change in its own transaction, and a
DELETE trigger records the version GC removed inside GC's transaction."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from tests.data import fill
from tests.faults.helpers import Conn, Ledger, audited_deletions, counted_deletions, install_delete_audit
from tests.support import spawn_cli

ROWS = 30_000
APP_THREADS = 2
MAX_OPS_PER_THREAD = 4_000
MAX_APP_SECONDS = 30.0


FRONTIER = (
    "SELECT CASE r.strategy WHEN 'physical' THEN (SELECT min(m.id) FROM messages m WHERE m.ctid >="
    " format('(%s,0)', (s->>'position'))::tid AND m.ctid < format('(%s,0)', (s->>'position')::int + 1)::tid)"
    " ELSE (s->>'position')::bigint END"
    " FROM gc_runs r, jsonb_array_elements(r.cursor->'slices') s WHERE r.status = 'running'"
)
"""Where each GC worker is deleting now: the first id of its next block, or its last key."""


def create_transition_log(conn: Conn) -> None:
    """The application's own record of every state change, written in the changing transaction;
    per row, its order (seq) is commit order, as the row lock serialises the writers."""
    conn.execute("CREATE TABLE app_transitions (seq bigserial PRIMARY KEY, id bigint NOT NULL,"
                 " processed boolean NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")


@dataclass
class App:
    """One application connection doing random short transactions until told to stop."""

    dsn: str
    seed: int
    stop: threading.Event
    touched: set[int] = field(default_factory=set)
    committed: int = 0
    rolled_back: int = 0
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def transactions(self) -> int:
        return self.committed + self.rolled_back

    def run(self) -> None:
        rng = random.Random(self.seed)
        deadline = time.monotonic() + MAX_APP_SECONDS
        try:
            with psycopg.connect(self.dsn) as conn:
                for _ in range(MAX_OPS_PER_THREAD):
                    if self.stop.is_set() or time.monotonic() > deadline:
                        return
                    self.one_transaction(conn, rng)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def pick_target(self, conn: Conn, rng: random.Random) -> int:
        """Half the time a row just ahead of where GC is deleting now, else anywhere."""
        if rng.random() < 0.5:
            # a block the walk is at may hold no row any more: no frontier id there
            ahead = [row[0] for row in conn.execute(FRONTIER) if row[0] is not None]
            if ahead:
                return rng.choice(ahead) + rng.randint(1, 300)
        return rng.randint(1, ROWS)

    def one_transaction(self, conn: Conn, rng: random.Random) -> None:
        roll = rng.random()
        if roll < 0.3:
            processed = rng.random() < 0.5
            row = conn.execute(
                "INSERT INTO messages (message_id, chat_id, direction, status, payload, processed_at)"
                " VALUES ('app.' || gen_random_uuid(), 'chat', 0, 1, 'new',"
                " CASE WHEN %s THEN now() END) RETURNING id, %s",
                (processed, processed),
            ).fetchone()
        else:
            target = self.pick_target(conn, rng)
            self.touched.add(target)
            if roll < 0.65:
                change = "processed_at = now() WHERE id = %s AND processed_at IS NULL RETURNING id, true"
            else:
                change = "processed_at = NULL WHERE id = %s AND processed_at IS NOT NULL RETURNING id, false"
            row = conn.execute("UPDATE messages SET " + change, (target,)).fetchone()
        if row is not None:
            self.touched.add(row[0])
            conn.execute("INSERT INTO app_transitions (id, processed) VALUES (%s, %s)", row)
        # hold the row lock a moment, as real transactions do; now and then beyond GC's lock_timeout
        time.sleep(rng.uniform(0.03, 0.06) if rng.random() < 0.05 else rng.uniform(0, 0.003))
        if rng.random() < 0.1:
            conn.rollback()
            self.rolled_back += 1
        else:
            conn.commit()
            self.committed += 1


@pytest.fixture
def apps(dsn: str) -> Iterator[list[App]]:
    """Application connections, started by the test, always stopped and joined afterwards."""
    stop = threading.Event()
    workers = [App(dsn, seed, stop) for seed in range(APP_THREADS)]
    yield workers
    stop.set()
    for app in workers:
        if app.thread is not None:
            app.thread.join(30)


def final_states(conn: Conn, initial: list[bool]) -> dict[int, bool]:
    """Each row's last committed processed-state: the fill, then the app's logged transitions."""
    states = {i: flag for i, flag in enumerate(initial, start=1)}
    for row_id, processed in conn.execute("SELECT id, processed FROM app_transitions ORDER BY seq"):
        states[row_id] = processed
    return states


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["physical", "index", "key"])
def test_gc_beside_a_live_app_deletes_only_garbage_and_all_that_stayed_garbage(
    conn: Conn, dsn: str, apps: list[App], strategy: str, ledger: Ledger
) -> None:
    rng = random.Random(strategy)
    initial = [rng.random() < 0.6 for _ in range(ROWS)]
    fill(conn, initial)
    install_delete_audit(conn)
    create_transition_log(conn)

    for app in apps:
        app.start()
    time.sleep(0.2)
    gc = spawn_cli("gc", "--dsn", dsn, "--json", "--strategy", strategy, "--workers", "2",
                   "--batch-size", "200", "--sleep", "0.02", "--lock-timeout-ms", "20")
    out, err = gc.communicate(timeout=120)
    ops_during_gc = sum(app.transactions() for app in apps)
    apps[0].stop.set()
    for app in apps:
        assert app.thread is not None
        app.thread.join(30)
    assert gc.returncode == 0, err
    result = json.loads(out)
    assert all(app.error is None for app in apps), [app.error for app in apps]

    audit = audited_deletions(conn)
    states = final_states(conn, initial)
    survivors = {row[0] for row in conn.execute("SELECT id FROM messages")}
    touched = set().union(*(app.touched for app in apps))
    deleted = set(audit.ids)
    wrongly_deleted = sorted(i for i in deleted if not states[i]) + audit.deleted_while_live
    vanished = sorted(set(states) - survivors - deleted)  # gone without a DELETE by GC
    stayed_garbage = {i for i, flag in enumerate(initial, start=1) if flag and i not in touched}
    left_behind = sorted(stayed_garbage & survivors)
    counted_twice = counted_deletions(conn) - len(audit.ids) + audit.counted_twice
    transactions = sum(app.transactions() for app in apps)
    ledger.add(app_transactions=transactions, rows_checked=len(states),
               rows_deleted_while_live=len(wrongly_deleted) + len(vanished),
               garbage_left=len(left_behind), rows_counted_twice=counted_twice)
    unprocessed = {row[0] for row in conn.execute("SELECT id FROM app_transitions WHERE NOT processed")}
    rescued = len({i for i, flag in enumerate(initial, start=1) if flag} & unprocessed & survivors)
    print(f"\nlive app ({strategy}): {transactions} app transactions ({ops_during_gc} during GC),"
          f" {len(touched)} rows touched, {rescued} garbage rows un-processed and kept,"
          f" {len(deleted & touched)} touched rows deleted, {len(deleted)} deleted in all,"
          f" {result['rows_skipped_locked']} skipped locked")

    assert ops_during_gc >= 100, "the application must run while GC runs"
    assert wrongly_deleted == [] and vanished == []
    assert left_behind == []
    assert counted_twice == 0
