"""The promise, as a state machine: whatever mix of seeding, un-processing, budgets, worker
counts, strategies and failures, a run that says ``complete`` left no garbage behind, the counts
add up to the rows gone, no run stays ``running``, every webhook tells its run's status, and no
live row is ever deleted.

The compaction (``--strategy compact``) takes its turns among the runs: with no fault it must
complete; stopped by its budget, or its connections killed at any moment of it, it is undone
before its swap (or finished after it), its run closed with its notice.

One real, migrated database per test (the ``dsn`` fixture), emptied at the start of every
hypothesis example; one real HTTP callback receiver for the webhooks.

The model: the rows the test inserted (garbage or live, and the step of their last change), and
for every run the garbage of its chain's start (a chain is runs linked by ``resumed_from``): a
complete run must have deleted every row that was garbage when its chain started, was not
changed since and is still garbage.

Faults, injected from ``on_progress`` (the worker thread) after a few batches: an exception (the
run must fail with it), the ``--archive-to`` file deleted (the next append fails), the
collector's connections killed (the run must reconnect and go on); and usage errors, which must
leave no trace. ``MSGGC_PROMISE_EXAMPLES`` raises the number of examples for a longer search.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from psycopg import sql

from engine import GcOptions, GcResult, MsggcError, Progress, RunStatus, collect
from engine.service.notice import NoticeFinisher
from engine.service.notify import WebhookNotifier
from tests.data import fill, live_ids, surviving_ids
from tests.faults.helpers import (
    AUDIT_TABLE,
    CallbackServer,
    audited_deletions,
    install_delete_audit,
    notice,
)

Conn = psycopg.Connection[Any]

KILL_COLLECTOR = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE application_name = 'msggc' AND datname = current_database()"
)
LOCK_HOLDER = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
KILL_HELPERS = KILL_COLLECTOR + f" AND pid NOT IN ({LOCK_HOLDER})"
"""The helper workers' connections only: the lead's (the one holding the table lock) survives."""
FAULTS = ("raise", "kill", "archive", "none")
COMPACT_FAULTS = ("kill", "stop", "none")
"""Hypothesis starts from (and shrinks toward) the first choice: a fault, so the few examples
exercise faults from the start."""
MAX_ROWS_INSERTED = 3000
"""Per example, rows ever inserted: a precondition on the rows present would depend on timing
(what a run deleted before its budget), and hypothesis needs the same rules enabled on replay."""


@dataclass(frozen=True)
class ChainStart:
    garbage: frozenset[int]
    step: int
    """Rows changed after this step are not owed by the chain."""


class Injector:
    """``on_progress``: after ``after`` committed batches, inject one fault from the worker thread.

    ``kill`` terminates every connection of the collector, at any batch, the last included.
    """

    def __init__(self, kind: str, after: int, dsn: str, options: GcOptions,
                 archive: Path | None = None) -> None:
        self.kind = kind
        self.after = after
        self.dsn = dsn
        self.options = options
        self.archive = archive
        self.batches = 0
        self.fired = False
        self._lock = threading.Lock()

    def __call__(self, progress: Progress) -> None:
        with self._lock:
            self.batches += 1
            if self.kind == "none" or self.fired or self.batches < self.after:
                return
            self.fired = True
        if self.kind == "raise":
            raise RuntimeError("injected worker failure")
        if self.kind == "archive":
            assert self.archive is not None
            self.archive.unlink()
        elif self.kind == "kill":
            with psycopg.connect(self.dsn, autocommit=True) as admin:
                admin.execute(KILL_COLLECTOR)


class GcPromise(RuleBasedStateMachine):
    dsn: str = ""
    callback: CallbackServer
    workdir: Path

    def __init__(self) -> None:
        super().__init__()
        self.conn: Conn = psycopg.connect(self.dsn, autocommit=True)
        self.conn.execute(f"TRUNCATE messages, messages_archive, gc_sweep, gc_outbox, gc_runs, {AUDIT_TABLE}"
                          " RESTART IDENTITY")
        with self.callback._lock:
            self.callback.accepted.clear()
        self.files = Path(tempfile.mkdtemp(dir=self.workdir))
        self.step = 0
        self.inserted = 0
        self.garbage: dict[int, bool] = {}
        """Every row the model believes present: id -> garbage?"""
        self.changed_at: dict[int, int] = {}
        self.chains: dict[int, ChainStart] = {}
        self.archives = 0

    def teardown(self) -> None:
        self.conn.close()
        shutil.rmtree(self.files, ignore_errors=True)

    # -- the table -------------------------------------------------------------------------

    def _insert(self, flags: list[bool]) -> None:
        self.step += 1
        rows = self.conn.execute(
            "INSERT INTO messages (message_id, chat_id, direction, status, payload, created_at,"
            " processed_at)"
            " SELECT 'wamid.' || %(base)s::bigint + g.i, 'chat' || (g.i %% 7), 1, 2, repeat('p', 130),"
            " now() - interval '30 days', CASE WHEN g.flag THEN now() - interval '1 day' END"
            " FROM unnest(%(flags)s::bool[]) WITH ORDINALITY AS g(flag, i) ORDER BY g.i"
            " RETURNING id, processed_at IS NOT NULL",
            {"base": self.inserted, "flags": flags},
        ).fetchall()
        self.inserted += len(rows)
        for row_id, is_garbage in rows:
            self.garbage[row_id] = is_garbage
            self.changed_at[row_id] = self.step

    def _seed(self, rows: int, garbage_share: float, seed: int) -> None:
        chance = random.Random(seed)
        self._insert([chance.random() < garbage_share for _ in range(rows)])

    @initialize(rows=st.integers(300, 1500), garbage_share=st.floats(0.3, 1.0), seed=st.integers(0, 2**16))
    def first_rows(self, rows: int, garbage_share: float, seed: int) -> None:
        self._seed(rows, garbage_share, seed)

    @precondition(lambda self: self.inserted < MAX_ROWS_INSERTED)
    @rule(rows=st.integers(1, 400), garbage_share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
    def seed(self, rows: int, garbage_share: float, seed: int) -> None:
        """New rows, garbage and live, past the end of any walk planned so far."""
        self._seed(rows, garbage_share, seed)

    @rule(to_garbage=st.booleans(), fraction=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
    def flip(self, to_garbage: bool, fraction: float, seed: int) -> None:
        """The application finishes some live rows (garbage from now on), or takes some garbage
        rows back (processed_at = NULL: live again)."""
        candidates = sorted(i for i, g in self.garbage.items() if g != to_garbage)
        chosen = random.Random(seed).sample(candidates, round(len(candidates) * fraction))
        if not chosen:
            return
        self.step += 1
        processed = "now() - interval '1 day'" if to_garbage else "NULL"
        updated = self.conn.execute(
            f"UPDATE messages SET processed_at = {processed} WHERE id = ANY(%s)", (chosen,)).rowcount
        assert updated == len(chosen)
        for row_id in chosen:
            self.garbage[row_id] = to_garbage
            self.changed_at[row_id] = self.step

    # -- runs ------------------------------------------------------------------------------

    def _runs(self) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            "SELECT id, status, messages_deleted, resumed_from, error FROM gc_runs ORDER BY id").fetchall()

    def _collect(self, options: GcOptions, injector: Injector | None = None,
                 faulted: bool = False) -> GcResult:
        start = ChainStart(frozenset(i for i, g in self.garbage.items() if g), self.step)
        live_before = {i for i, g in self.garbage.items() if not g}
        finisher = NoticeFinisher(WebhookNotifier(self.callback.url))
        result = collect(self.dsn, options, finisher, on_progress=injector)
        self.step += 1
        assert result.run_id is not None, result

        present = {row[0] for row in self.conn.execute("SELECT id FROM messages")}
        gone = set(self.garbage) - present
        # (5) no live row deleted: by the model, and by the DELETE audit
        assert not (gone & live_before), f"live rows deleted: {sorted(gone & live_before)}"
        for row_id in gone:
            del self.garbage[row_id]

        row = self.conn.execute(
            "SELECT status, messages_deleted, resumed_from FROM gc_runs WHERE id = %s",
            (result.run_id,)).fetchone()
        assert row is not None, f"run {result.run_id} has no gc_runs row"
        status, deleted, resumed_from = row
        assert status == result.status, (status, result)
        assert deleted == result.messages_deleted, (deleted, result)
        assert resumed_from == result.resumed_from
        assert result.notification_error is None, result.notification_error
        self.chains[result.run_id] = self.chains[resumed_from] if resumed_from else start

        if injector is not None and injector.fired and injector.kind == "raise":
            assert result.status == RunStatus.FAILED, result
            assert "injected worker failure" in (result.error or ""), result.error
        if injector is not None and injector.kind == "archive" and result.status == RunStatus.FAILED:
            assert "cannot write archive file" in (result.error or ""), result.error
        if injector is not None and injector.kind == "kill":
            assert result.status != RunStatus.FAILED, f"a killed connection failed the run: {result.error}"
        if result.status == RunStatus.FAILED and not faulted and (injector is None or not injector.fired):
            raise AssertionError(f"run failed without a fault: {result.error}")
        self._check_complete(result.run_id, status)
        fault = (f"{injector.kind} fired" if injector is not None and injector.fired
                 else "compaction's fault" if faulted else "no fault")
        event(f"run {status} ({fault}, {'resumed' if resumed_from else 'new chain'})")
        return result

    def _check_complete(self, run_id: int, status: str) -> None:
        """(1) a complete run left none of its chain's garbage that is unchanged and still garbage."""
        if status != RunStatus.COMPLETE:
            return
        start = self.chains[run_id]
        left = sorted(i for i in start.garbage
                      if i in self.garbage and self.garbage[i] and self.changed_at[i] <= start.step)
        assert not left, f"run {run_id} says complete but left garbage of its chain's start: {left[:20]}"

    def _archive_path(self) -> Path:
        self.archives += 1
        return self.files / f"archive-{self.archives}.csv.gz"

    @rule(
        strategy=st.sampled_from(["auto", "physical", "index"]),
        batch_size=st.integers(3, 80),
        max_rows=st.one_of(st.integers(1, 150), st.none()),
        workers=st.integers(1, 3),
        fault=st.sampled_from(FAULTS),
        after=st.integers(1, 4),
        archive=st.booleans(),
    )
    def run(self, strategy: str, batch_size: int, max_rows: int | None, workers: int, fault: str,
            after: int, archive: bool) -> None:
        archive_to = self._archive_path() if archive or fault == "archive" else None
        options = GcOptions(strategy=strategy, batch_size=batch_size, max_rows=max_rows,  # type: ignore[arg-type]
                            workers=workers, archive_to=str(archive_to) if archive_to else None)
        self._collect(options, Injector(fault, after, self.dsn, options, archive_to))

    @rule(strategy=st.sampled_from(["auto", "physical", "index"]), workers=st.integers(1, 3))
    def resume(self, strategy: str, workers: int) -> None:
        """Just run again, without a budget or a fault: continues the unfinished chain."""
        result = self._collect(GcOptions(strategy=strategy, workers=workers))  # type: ignore[arg-type]
        assert result.status == RunStatus.COMPLETE, result

    @rule(fault=st.sampled_from(COMPACT_FAULTS), delay=st.floats(0.0, 0.03), archive=st.booleans())
    def compact(self, fault: str, delay: float, archive: bool) -> None:
        """``--strategy compact``: undone when stopped or when its connections are killed before
        its swap (by a thread, at any moment of it), finished when after."""
        options = GcOptions(strategy="compact", archive=archive,
                            max_seconds=0.001 if fault == "stop" else None)
        done = threading.Event()
        killer = (threading.Thread(target=self._kill_compaction, args=(delay, done))
                  if fault == "kill" else None)
        if killer is not None:
            killer.start()
        try:
            result = self._collect(options, faulted=fault != "none")
        finally:
            done.set()
            if killer is not None:
                killer.join()
        assert result.status in ((RunStatus.COMPLETE,) if fault == "none" else tuple(RunStatus)), result.error
        event(f"compaction {result.status} ({fault})")
        assert not self.conn.execute(
            "SELECT relname FROM pg_class WHERE relname ~ '^msggc_(new|log)_'").fetchall()  # undone or done
        if archive and result.status is RunStatus.COMPLETE:
            self.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                sql.Identifier(f"msggc_old_{result.run_id}")))  # the archive, kept: not the model's

    def _kill_compaction(self, delay: float, done: threading.Event) -> None:
        """Kill msggc's connections ``delay`` seconds into the compaction's run (once it exists)."""
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            while not done.is_set() and not admin.execute(
                    "SELECT 1 FROM gc_runs WHERE strategy = 'compact' AND status = 'running'").fetchone():
                time.sleep(0.002)
            if not done.wait(delay):
                admin.execute(KILL_COLLECTOR)

    @rule(kind=st.sampled_from(["existing file", "missing directory", "missing slash directory"]),
          workers=st.integers(1, 3))
    def usage_error(self, kind: str, workers: int) -> None:
        """A refused run leaves no trace: no gc_runs row, no status changed, no notice."""
        if kind == "existing file":
            target = self.files / "already-here.csv.gz"
            target.write_bytes(b"not ours")
        elif kind == "missing directory":
            target = self.files / "nowhere" / "archive.csv.gz"
        else:
            target = self.files / "nowhere-either"
        archive_to = str(target) + ("/" if kind == "missing slash directory" else "")
        runs_before = self._runs()
        outbox_before = self.conn.execute("SELECT count(*) FROM gc_outbox").fetchone()[0]
        accepted_before = len(self.callback.accepted)
        finisher = NoticeFinisher(WebhookNotifier(self.callback.url))
        with pytest.raises(MsggcError):
            collect(self.dsn, GcOptions(workers=workers, archive_to=archive_to), finisher)
        assert self._runs() == runs_before
        assert self.conn.execute("SELECT count(*) FROM gc_outbox").fetchone()[0] == outbox_before
        assert len(self.callback.accepted) == accepted_before

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def counts_add_up_to_the_rows_gone(self) -> None:
        """(2) every deleted row counted once, by exactly one run."""
        counted = self.conn.execute("SELECT coalesce(sum(messages_deleted), 0) FROM gc_runs").fetchone()[0]
        present = self.conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        assert counted == self.inserted - present, (counted, self.inserted, present)

    @invariant()
    def no_run_left_running(self) -> None:
        """(3)"""
        running = self.conn.execute("SELECT id FROM gc_runs WHERE status = 'running'").fetchall()
        assert not running, f"runs left running: {running}"

    @invariant()
    def every_notice_tells_its_runs_status(self) -> None:
        """(4) complete -> complete; stopped, failed (and a failed or stopped run later superseded)
        -> failed; delivered to the receiver exactly as queued, once."""
        rows = self.conn.execute(
            "SELECT r.id, r.status, r.messages_deleted, o.body, o.delivered_at IS NOT NULL"
            " FROM gc_runs r LEFT JOIN gc_outbox o ON o.run_id = r.id ORDER BY r.id, o.id").fetchall()
        per_run: dict[int, int] = {}
        delivered: list[bytes] = []
        for run_id, status, deleted, body, was_delivered in rows:
            assert body is not None, f"run {run_id} ({status}) has no notice"
            per_run[run_id] = per_run.get(run_id, 0) + 1
            gc = json.loads(body)["services"][0]["message"]["gc"]
            expected = "complete" if status == RunStatus.COMPLETE else "failed"
            assert gc["status"] == expected, f"run {run_id} is {status}, its notice says {gc}"
            assert gc["messages_deleted"] == deleted, (run_id, deleted, gc)
            if status in (RunStatus.STOPPED, RunStatus.FAILED, RunStatus.SUPERSEDED):
                assert gc["errors"], gc
            if was_delivered:
                delivered.append(body.encode())
        assert all(n == 1 for n in per_run.values()), per_run
        with self.callback._lock:
            accepted = list(self.callback.accepted)
        assert sorted(accepted) == sorted(delivered), "the receiver got other bodies than the outbox sent"
        assert all(notice(body)["status"] in ("complete", "failed") for body in accepted)

    @invariant()
    def no_live_row_ever_deleted(self) -> None:
        """(5) by the audit of every deleted row version (inside the deleting transaction)."""
        audit = audited_deletions(self.conn)
        assert not audit.deleted_while_live, audit.deleted_while_live
        assert audit.counted_twice == 0


@pytest.fixture
def machine(dsn: str, conn: Conn, tmp_path: Path) -> Iterator[None]:
    """One database, receiver and directory for all the examples of the test."""
    install_delete_audit(conn)
    with CallbackServer() as callback:
        GcPromise.dsn = dsn
        GcPromise.callback = callback
        GcPromise.workdir = tmp_path
        yield


TestGcPromise = pytest.mark.usefixtures("machine")(GcPromise.TestCase)
TestGcPromise.settings = settings(
    max_examples=int(os.environ.get("MSGGC_PROMISE_EXAMPLES", "15")),
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_a_connection_killed_after_the_last_batch_still_closes_the_run(conn: Conn, dsn: str) -> None:
    """The walk reached its end, then the collector's connection was killed (pg_terminate_backend,
    a failover, a pooler restart): the run must still be closed, not left ``running``."""
    fill(conn, [i % 2 == 1 for i in range(235)])
    options = GcOptions(strategy="index", batch_size=1000)
    with CallbackServer() as callback:
        finisher = NoticeFinisher(WebhookNotifier(callback.url))
        killed: list[bool] = []

        def kill(progress: Progress) -> None:  # after the one and only batch
            with psycopg.connect(dsn, autocommit=True) as admin:
                killed.extend(row[0] for row in admin.execute(KILL_COLLECTOR))

        result = collect(dsn, options, finisher, on_progress=kill)
    assert killed == [True]
    assert surviving_ids(conn) == live_ids([i % 2 == 1 for i in range(235)])
    status = conn.execute("SELECT status FROM gc_runs WHERE id = %s", (result.run_id,)).fetchone()[0]
    assert status == result.status == RunStatus.COMPLETE, (status, result.error)


def test_a_helper_killed_before_its_first_batch_reconnects(conn: Conn, dsn: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper worker's connection dropped right after it was opened (here: new connections take
    0.3 s before their first statement, and the helpers are killed meanwhile, after the lead's
    first batch) must reconnect like one dropped between batches, not fail the run."""
    import engine.walk

    real_connect = engine.walk.connect

    def slow_connect(dsn: str, **kwargs: Any) -> Any:
        opened = real_connect(dsn, **kwargs)
        time.sleep(0.3)
        return opened

    monkeypatch.setattr(engine.walk, "connect", slow_connect)
    garbage = [i % 4 != 0 for i in range(3000)]
    fill(conn, garbage)
    killed: list[int] = []

    def kill_helpers(progress: Progress) -> None:
        if not killed:
            with psycopg.connect(dsn, autocommit=True) as admin:
                killed.append(len(admin.execute(KILL_HELPERS).fetchall()))

    options = GcOptions(strategy="index", batch_size=50, workers=3,
                        archive_to=str(tmp_path / "archive.csv.gz"))
    result = collect(dsn, options, on_progress=kill_helpers)
    assert killed == [2]
    assert result.status == RunStatus.COMPLETE, result.error
    assert surviving_ids(conn) == live_ids(garbage)
