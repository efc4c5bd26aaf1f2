"""The promise on a partitioned table, as a state machine: whatever the application does to a
table partitioned by day (new days, rows into old and new ranges, rows processed and taken back
in the leaves about to be dropped, a DEFAULT partition, a foreign key onto it, a snapshot held
open across a run), whatever flags each run draws (``--no-drop``, ``--archive``, ``--archive-to``
in gzip, zstd and parquet, ``--workers`` 1-3, budgets) and wherever it is interrupted (an
exception or its connections killed in-process; ``kill -9`` of a real ``msggc gc`` at a random
moment, while a detach waits, or between a leaf's detach and its drop), after every step:

1. every row the application wrote and left unprocessed (the ledger holds only the rows whose
   INSERT committed) is visible through ``pm`` with its exact values;
2. once a run says ``complete``, no leaf is detached (a table named like a leaf outside
   ``pg_inherits``) or pending detach, and the garbage its chain owed is gone;
3. the runs' ``messages_deleted`` add up to the ledger's rows gone (rows of a leaf left detached
   by a killed run are not gone yet: the next run must drop and count them, or attach them);
4. each row an archive holds (``pm_archive``, the committed part of each file, read without
   msggc) was deleted, is there once, with its exact values, and each archiving run archived
   every row it deleted.

A run that fails without a fault is a failure of the promise too. One real, migrated database
for all examples, emptied at the start of each; ``MSGGC_PROMISE_EXAMPLES`` raises the number of
examples for a longer search (default 8 of at most 10 steps: 20-30 s here; 100 take about 5 min
and kill a run between a detach and its drop in one example in seven).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine import GcOptions, MsggcError, RunStatus, TableSpec, collect
from tests.partitioned import (
    FIRST_DAY,
    Application,
    Ledger,
    add_leaf,
    archive_files,
    create_table,
    deleted_reported,
    detached_leaves,
    drop_everything,
    end_backends,
    everything_archived,
    kill_between_detach_and_drop,
    missing_live_rows,
    not_attached,
    open_snapshot,
    pending_leaves,
    rows_gone,
    sigkill,
    spawn_gc,
    waits_for,
)
from tests.polling import wait_until
from tests.support import run_cli
from tests.test_promise import ChainStart, Injector

Conn = psycopg.Connection[Any]

ARCHIVES = ("none", "table", "gzip", "zstd", "parquet")
SUFFIXES = {"gzip": ".csv.gz", "zstd": ".csv.zst", "parquet": ".parquet"}
IN_PROCESS_FAULTS = ("none", "none", "raise", "kill")
"""From ``on_progress`` (see :class:`tests.test_promise.Injector`): an exception in a worker, or
every connection of the collector terminated. Half the runs have none: a run after a fault
resumes its walk, and a resumed walk drops no leaf, so faults on every run would hide the drops."""
KILL_POINTS = ("timing", "detach", "drop")
"""Where ``kill -9`` hits the process: after a random delay; while its detach waits for an
application's snapshot (a concurrent detach is then pending); between a detach and its drop."""
APP_LOCK_TIMEOUT_MS = 2000
"""The application's statements wait this long for a lock (a new leaf waits for the open
snapshot's lock on ``pm``): then it is told, and goes on."""
MAX_ROWS_INSERTED = 2500
MAX_DAYS = 9
LONG_LOCK_TIMEOUT_MS = 10_000
"""For the detach kill points: the detach waits for the test's reader rather than giving up."""


@dataclass(frozen=True)
class Flags:
    """A run's flags, as drawn."""

    workers: int
    no_drop: bool
    archive: str
    batch_size: int
    max_rows: int | None

    def cli(self, path: Path | None) -> list[str]:
        args = ["--workers", str(self.workers), "--batch-size", str(self.batch_size)]
        if self.no_drop:
            args.append("--no-drop")
        if self.max_rows is not None:
            args += ["--max-rows", str(self.max_rows)]
        if self.archive == "table":
            args.append("--archive")
        elif path is not None:
            args += ["--archive-to", str(path), "--archive-format", self.archive]
        return args

    def options(self, path: Path | None) -> GcOptions:
        return GcOptions(table=TableSpec(name="pm", schema="public"), workers=self.workers,
                         batch_size=self.batch_size, no_drop=self.no_drop, max_rows=self.max_rows,
                         archive=self.archive == "table", archive_to=str(path) if path else None,
                         archive_format=self.archive if path else None)


def drawn_flags(no_drop: st.SearchStrategy[bool],
                archive: st.SearchStrategy[str]) -> st.SearchStrategy[Flags]:
    return st.builds(
        Flags,
        workers=st.integers(1, 3),
        no_drop=no_drop,
        archive=archive,
        batch_size=st.integers(10, 120),
        max_rows=st.one_of(st.none(), st.none(), st.none(), st.integers(20, 400)),
    )


any_flags = drawn_flags(st.sampled_from([False, False, True]),
                        st.sampled_from(("none", "none", "none", *ARCHIVES)))
"""A third of the runs may drop leaves (no ``--no-drop``, no archive): drawn uniformly, one in ten
would, and the drops would hardly be tried."""


def dropped(stdout: str) -> str:
    """What a run that ended by itself says it dropped (for the statistics)."""
    try:
        leaves = json.loads(stdout).get("partitions", {})
    except ValueError:
        return "no result"
    return f"{sum(bool(leaf.get('dropped')) for leaf in leaves.values())} of {len(leaves)} leaves dropped"


class PartitionPromise(RuleBasedStateMachine):
    dsn: str = ""
    workdir: Path

    def __init__(self) -> None:
        super().__init__()
        self.conn: Conn = psycopg.connect(self.dsn, autocommit=True)
        end_backends(self.conn)
        drop_everything(self.conn)
        self.conn.execute("TRUNCATE gc_sweep, gc_outbox, gc_runs RESTART IDENTITY")
        self.conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{APP_LOCK_TIMEOUT_MS}ms",))
        self.files = Path(tempfile.mkdtemp(dir=self.workdir))
        self.ledger = Ledger()
        self.app = Application(self.conn, self.ledger)
        self.step = 0
        self.days = 0
        self.default = False
        self.fk = False
        self.reader: Conn | None = None
        self.archive_ready: bool | None = None
        """``migrate --archive-for public.pm``: not tried yet (None), done, or refused."""
        self.chains: dict[int, ChainStart] = {}
        self.archived_by: dict[int, str] = {}
        """Runs that archived, and how (``table`` or a file format)."""
        self.archives = 0

    def teardown(self) -> None:
        self._close_reader()
        self.conn.close()
        shutil.rmtree(self.files, ignore_errors=True)

    # -- the application ---------------------------------------------------------------------

    @initialize(days=st.integers(2, 4), rows=st.integers(40, 200), old_garbage=st.booleans(),
                default=st.sampled_from([False, False, True]), fk=st.sampled_from([False, False, True]),
                seed=st.integers(0, 2**16))
    def table(self, days: int, rows: int, old_garbage: bool, default: bool, fk: bool, seed: int) -> None:
        """Days 0..days-1, ``rows`` a day: the oldest days wholly processed (or, without
        ``old_garbage``, mostly), the newest a third processed."""
        create_table(self.conn, days, default=default, fk=fk)
        self.days, self.default, self.fk = days, default, fk
        chance = random.Random(seed)
        for day in range(days):
            share = (1.0 if old_garbage else 0.9) if day < days - 1 else 0.33
            self.app.insert([day] * rows, [chance.random() < share for _ in range(rows)], self.step)
        self.conn.execute("ANALYZE pm")

    @precondition(lambda self: self.days < MAX_DAYS)
    @rule()
    def new_day(self) -> None:
        """The application's next day gets its leaf (refused while the default partition holds
        rows of that day: the application is told)."""
        self.step += 1
        try:
            add_leaf(self.conn, self.days)
        except psycopg.errors.CheckViolation:
            event("new leaf refused: the default partition holds rows of its day")
            return
        except psycopg.errors.LockNotAvailable:
            event("new leaf refused: the open snapshot holds pm")
            return
        self.days += 1

    @precondition(lambda self: self.ledger.next_id < MAX_ROWS_INSERTED)
    @rule(rows=st.integers(1, 150), where=st.sampled_from(["old", "newest", "future"]),
          share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
    def insert(self, rows: int, where: str, share: float, seed: int) -> None:
        """Rows into an old day (its leaf may be about to be dropped, detached, or gone), the
        newest, or a day without a leaf yet (only the default partition takes those)."""
        self.step += 1
        chance = random.Random(seed)
        if where == "old":
            days = [chance.randrange(max(1, self.days - 1)) for _ in range(rows)]
        else:
            days = [self.days - 1 if where == "newest" else self.days + 4] * rows
        written = self.app.insert(days, [chance.random() < share for _ in range(rows)], self.step)
        event(f"insert into {where} day: {'committed' if written else 'refused'}")

    def _finish_oldest_day(self) -> None:
        """The application processes every live row of its oldest day (not its newest): the
        day's leaf is wholly garbage, about to be dropped."""
        gone = rows_gone(self.conn, self.ledger)
        present = {i: r for i, r in self.ledger.rows.items() if i not in gone}
        days = sorted({r.day for r in present.values()})
        if len(days) < 2:
            return
        self.step += 1
        live = sorted(i for i, r in present.items() if r.day == days[0] and r.processed_at is None)
        self.app.set_processed(live, True, self.step)

    @rule()
    def finish_day(self) -> None:
        """The application is done with its oldest day."""
        self._finish_oldest_day()

    @rule(processed=st.booleans(), old=st.booleans(), fraction=st.floats(0.0, 0.3),
          seed=st.integers(0, 2**16))
    def change(self, processed: bool, old: bool, fraction: float, seed: int) -> None:
        """The application processes live rows (garbage from now on) or takes garbage rows back
        (live again), in the oldest days (the leaves about to be dropped) or anywhere."""
        self.step += 1
        gone = rows_gone(self.conn, self.ledger)
        present = {i: r for i, r in self.ledger.rows.items() if i not in gone}
        oldest = min((r.day for r in present.values()), default=None)
        candidates = sorted(i for i, r in present.items()
                            if (r.processed_at is None) == processed and (not old or r.day == oldest))
        chosen = random.Random(seed).sample(candidates, round(len(candidates) * fraction))
        if chosen:
            self.app.set_processed(chosen, processed, self.step)

    @precondition(lambda self: self.fk)
    @rule(count=st.integers(1, 5), seed=st.integers(0, 2**16))
    def reply(self, count: int, seed: int) -> None:
        """Child rows that point at garbage rows: the foreign key keeps those rows."""
        self.step += 1
        garbage = sorted(self.ledger.garbage() - rows_gone(self.conn, self.ledger))
        self.app.reply_to(random.Random(seed).sample(garbage, min(count, len(garbage))))

    @precondition(lambda self: not self.default)
    @rule()
    def default_partition(self) -> None:
        """A DEFAULT partition from now on: it takes the rows of a day without a leaf (a future
        day, a dropped day's, or a leaf's that a killed run left detached)."""
        self.step += 1
        try:
            self.conn.execute("CREATE TABLE pm_default PARTITION OF pm DEFAULT")
        except psycopg.errors.LockNotAvailable:
            event("default partition refused: the open snapshot holds pm")
            return
        self.default = True

    @precondition(lambda self: self.reader is None)
    @rule()
    def snapshot(self) -> None:
        """An application's long read: REPEATABLE READ on ``pm``, held across the next runs."""
        self.reader = open_snapshot(self.dsn)

    @precondition(lambda self: self.reader is not None)
    @rule()
    def snapshot_ends(self) -> None:
        """The long read ends (rolled back)."""
        self._close_reader()

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.reader.rollback()
            self.reader.close()
            self.reader = None

    # -- runs ----------------------------------------------------------------------------------

    def _archive_path(self, flags: Flags) -> Path | None:
        if flags.archive in ("none", "table"):
            return None
        self.archives += 1
        return self.files / f"archive-{self.archives}{SUFFIXES[flags.archive]}"

    def _archive_refused(self, flags: Flags) -> bool:
        """``--archive`` needs ``msggc migrate --archive-for public.pm`` first: tried once; a
        refusal (partitioned tables may not be supported) is recorded, and such runs skipped."""
        if flags.archive != "table":
            return False
        if self.archive_ready is None:
            done = run_cli("migrate", "--dsn", self.dsn, "--archive-for", "public.pm")
            assert "Traceback" not in done.stderr, done.stderr
            self.archive_ready = done.returncode == 0
            event(f"migrate --archive-for public.pm: {'done' if self.archive_ready else 'refused'}")
        return not self.archive_ready

    def _start(self) -> tuple[ChainStart, int]:
        self.step += 1
        start = ChainStart(frozenset(self.ledger.garbage() - self.ledger.referenced), self.step)
        last = self.conn.execute("SELECT coalesce(max(id), 0) FROM gc_runs").fetchone()[0]
        return start, last

    def _record(self, start: ChainStart, last: int, flags: Flags) -> list[tuple[int, str]]:
        """The runs this step made: their chains, and how they archived."""
        made = self.conn.execute("SELECT id, status, resumed_from FROM gc_runs WHERE id > %s ORDER BY id",
                                 (last,)).fetchall()
        for run_id, _, resumed_from in made:
            self.chains[run_id] = self.chains.get(resumed_from, start) if resumed_from else start
            if flags.archive != "none":
                self.archived_by[run_id] = flags.archive
        self.step += 1
        return [(run_id, status) for run_id, status, _ in made]

    def _check_complete(self, run_id: int) -> None:
        """A complete run left no leaf detached or pending, and none of its chain's garbage that
        is unchanged since the chain began, still garbage, and no child row points at."""
        assert not not_attached(self.conn), (
            f"run {run_id} says complete, yet leaves are detached {detached_leaves(self.conn)}"
            f" or pending detach {pending_leaves(self.conn)}")
        start = self.chains[run_id]
        gone = rows_gone(self.conn, self.ledger)
        left = sorted(i for i in start.garbage
                      if i not in gone and i not in self.ledger.referenced
                      and self.ledger.rows[i].processed_at is not None
                      and self.ledger.changed_at[i] <= start.step)
        assert not left, f"run {run_id} says complete but left garbage of its chain's start: {left[:20]}"

    @rule(flags=any_flags, fault=st.sampled_from(IN_PROCESS_FAULTS), after=st.integers(1, 4),
          writes=st.sampled_from([False, True, True]), seed=st.integers(0, 2**16))
    def run(self, flags: Flags, fault: str, after: int, writes: bool, seed: int) -> None:
        """``collect`` in this process, a fault injected from ``on_progress`` after a few batches;
        with ``writes``, the application writes all along (see :meth:`_writing`)."""
        if self._archive_refused(flags):
            return
        path = self._archive_path(flags)
        options = flags.options(path)
        injector = Injector(fault, after, self.dsn, options)
        start, last = self._start()
        stop = threading.Event()
        writer = threading.Thread(target=self._writing, args=(stop, start.step + 1, seed)) if writes else None
        if writer is not None:
            writer.start()
        try:
            result = collect(self.dsn, options, on_progress=injector)
        except MsggcError as exc:
            if flags.archive == "table":
                event("--archive refused")
                self.archive_ready = False
                return
            if self._held_by_the_snapshot(str(exc)):
                return
            raise AssertionError(f"a run refused {flags}: {exc}") from exc
        finally:
            stop.set()
            if writer is not None:
                writer.join(60)
        made = self._record(start, last, flags)
        assert [run_id for run_id, _ in made] == [result.run_id], (made, result)
        fired = injector.fired
        if fired and fault == "raise":
            assert result.status == RunStatus.FAILED, result
        if result.status == RunStatus.FAILED and not (fired and fault == "raise"):
            raise AssertionError(f"run failed without an injected failure ({fault} fired: {fired},"
                                 f" snapshot open: {self.reader is not None}): {result.error}")
        if result.status == RunStatus.COMPLETE:
            self._check_complete(result.run_id)
        drops = sum(bool(leaf.get("dropped")) for leaf in result.partitions.values())
        event(f"in-process run {result.status} ({fault} {'fired' if fired else 'not fired'})")
        event(f"in-process run dropped {'some' if drops else 'no'} leaves"
              f"{' with the application writing' if writes else ''}")

    @precondition(lambda self: not self.fk)
    @rule(workers=st.integers(1, 3), writes=st.booleans(), seed=st.integers(0, 2**16))
    def dropping_run(self, workers: int, writes: bool, seed: int) -> None:
        """The application finishes its oldest day, then a run that may drop its leaf (no budget,
        no fault, no archive), the application writing into that day all along or not."""
        self._finish_oldest_day()
        self.run(Flags(workers, no_drop=False, archive="none", batch_size=50, max_rows=None), "none", 1,
                 writes, seed)

    def _writing(self, stop: threading.Event, step: int, seed: int) -> None:
        """The application while a run goes on, on its own connection: rows into its oldest day
        (its leaf about to be dropped) and its newest, and rows of the oldest day taken back
        (live again); a statement that meets a lock past its lock_timeout, or a day without a
        partition, is refused and the application goes on. Only committed writes reach the
        ledger (the main thread waits in ``collect`` meanwhile)."""
        chance = random.Random(seed)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{APP_LOCK_TIMEOUT_MS}ms",))
            app = Application(conn, self.ledger)
            app.version = self.app.version + 1_000
            days = sorted(row[0] for row in conn.execute("SELECT DISTINCT day FROM pm"))
            if not days:
                return
            first, last = (days[0] - FIRST_DAY).days, (days[-1] - FIRST_DAY).days
            while not stop.is_set() and self.ledger.next_id < MAX_ROWS_INSERTED + 500:
                rows = chance.randint(1, 4)
                app.insert([chance.choice([first, first, last])] * rows,
                           [chance.random() < 0.5 for _ in range(rows)], step)
                oldest = [i for i, r in self.ledger.rows.items()
                          if r.day == days[0] and r.processed_at is not None]
                with contextlib.suppress(psycopg.errors.LockNotAvailable):
                    app.set_processed(chance.sample(oldest, min(2, len(oldest))), False, step)
                time.sleep(0.003)
        self.app.version = app.version

    @rule(flags=any_flags, point=st.sampled_from(KILL_POINTS), delay=st.floats(0.3, 1.2))
    def killed_run(self, flags: Flags, point: str, delay: float) -> None:
        """``kill -9`` of a real ``msggc gc``: after ``delay`` seconds, while its detach waits for an
        application's snapshot, or between a detach and its drop (see
        :func:`tests.partitioned.kill_between_detach_and_drop`). When the process ends first,
        it is checked as any run."""
        if self._archive_refused(flags):
            return
        path = self._archive_path(flags)
        args = flags.cli(path)
        start, last = self._start()
        reader = None
        if point != "timing":
            args += ["--lock-timeout-ms", str(LONG_LOCK_TIMEOUT_MS)]
            reader = self.reader or open_snapshot(self.dsn)
            self.reader = None  # the kill point ends it
        proc = spawn_gc(self.dsn, *args)
        try:
            killed = self._kill(proc, point, delay, reader)
        finally:
            if reader is not None:
                reader.rollback()
                reader.close()
            sigkill(proc)
        stdout, stderr = proc.communicate()
        made = self._record(start, last, flags)
        event(f"kill -9 at {point}: {'killed' if killed else 'ended first, ' + dropped(stdout)}")
        if not killed:
            self._check_finished(proc.returncode, stderr, made, flags)

    @precondition(lambda self: not self.fk)
    @rule(flags=drawn_flags(st.just(False), st.just("none")), point=st.sampled_from(("detach", "drop")))
    def killed_while_dropping(self, flags: Flags, point: str) -> None:
        """The application finishes its oldest day, and the run that drops its leaf is killed
        while the drop waits for an application's snapshot, or between its detach and its drop."""
        self._finish_oldest_day()
        self.killed_run(flags, point, 0.0)

    def _kill(self, proc: subprocess.Popen[str], point: str, delay: float, reader: Conn | None) -> bool:
        if point == "timing":
            try:
                proc.wait(delay)
                return False
            except subprocess.TimeoutExpired:
                sigkill(proc)
                end_backends(self.conn)
                return True
        assert reader is not None
        if point == "drop":
            where = kill_between_detach_and_drop(self.conn, self.dsn, reader, proc)
            event(f"kill -9 at drop: {where}")
            return where != "ended"
        pid = reader.info.backend_pid
        wait_until(lambda: waits_for(self.conn, pid) or proc.poll() is not None, 60,
                   "a detach to wait for the open transaction")
        if proc.poll() is not None:
            return False
        sigkill(proc)
        end_backends(self.conn)
        return True

    def _held_by_the_snapshot(self, error: str) -> bool:
        """A run refused because a leaf an earlier (killed) run left detached cannot be attached
        again while the application's snapshot holds the table: by design it starts nothing, and
        the next run attaches the leaf first (the invariants check nothing was lost meanwhile)."""
        if self.reader is None or "left detached by an earlier run, could not attach it again" not in error:
            return False
        event("a run waits for the snapshot to attach a leaf again")
        return True

    def _check_finished(self, returncode: int, stderr: str, made: list[tuple[int, str]],
                        flags: Flags) -> None:
        """A process that ended by itself did not fail, and when it says complete, it is."""
        assert "Traceback" not in stderr, stderr
        if returncode == 2 and flags.archive == "table":
            event("--archive refused")
            self.archive_ready = False
            return
        if returncode != 0 and self._held_by_the_snapshot(stderr):
            return
        assert made, f"msggc gc exited {returncode} without a run: {stderr}"
        run_id, status = made[-1]
        assert status != RunStatus.FAILED, (
            f"run {run_id} failed without a fault (exit {returncode}): {stderr}")
        if status == RunStatus.COMPLETE:
            self._check_complete(run_id)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_live_row_is_visible_with_its_values(self) -> None:
        """(1)"""
        missing = missing_live_rows(self.conn, self.ledger)
        assert not missing, (
            f"{len(missing)} live rows not visible through pm (ledger, seen):"
            f" {dict(list(missing.items())[:3])};"
            f" detached {detached_leaves(self.conn)}, pending {pending_leaves(self.conn)}")

    @invariant()
    def no_leaf_left_aside_once_a_run_says_complete(self) -> None:
        """(2) for the latest run."""
        latest = self.conn.execute("SELECT id, status FROM gc_runs ORDER BY id DESC LIMIT 1").fetchone()
        if latest is not None and latest[1] == RunStatus.COMPLETE:
            assert not not_attached(self.conn), (
                f"run {latest[0]} says complete, yet leaves are detached {detached_leaves(self.conn)}"
                f" or pending detach {pending_leaves(self.conn)}")

    @invariant()
    def deleted_reported_is_the_rows_gone(self) -> None:
        """(3)"""
        gone = rows_gone(self.conn, self.ledger)
        reported = deleted_reported(self.conn)
        assert reported == len(gone), (
            f"the runs report {reported:,} rows deleted, {len(gone):,} rows of the ledger are gone;"
            f" not attached: {not_attached(self.conn)}")
        kept = gone & self.ledger.referenced
        assert not kept, f"rows a child row points at are gone: {sorted(kept)[:20]}"
        live = {i for i in gone if self.ledger.rows[i].processed_at is None}
        assert not live, f"live rows deleted: {sorted(live)[:20]}"

    @invariant()
    def archives_hold_each_deleted_row_once_with_its_values(self) -> None:
        """(4)"""
        if not self.archived_by:
            return
        archived = everything_archived(self.conn)
        gone = rows_gone(self.conn, self.ledger)
        ids = [a.id for a in archived]
        twice = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) != len(set(ids)) else []
        assert not twice, f"rows archived more than once: {twice[:20]}"
        not_deleted = sorted(set(ids) - gone)
        assert not not_deleted, f"archived rows that were not deleted: {not_deleted[:20]}"
        changed = [(a.id, a.row, self.ledger.rows[a.id]) for a in archived if a.row != self.ledger.rows[a.id]]
        assert not changed, f"archived values differ from what was deleted (archived, ledger): {changed[:3]}"
        per_run: dict[int, int] = {}
        for a in archived:
            per_run[a.run_id] = per_run.get(a.run_id, 0) + 1
        deleted = dict(self.conn.execute("SELECT id, messages_deleted FROM gc_runs").fetchall())
        for run_id in self.archived_by:
            assert per_run.get(run_id, 0) == deleted[run_id], (
                f"run {run_id} ({self.archived_by[run_id]}) deleted {deleted[run_id]:,} rows and archived"
                f" {per_run.get(run_id, 0):,}; files {archive_files(self.conn)}")


@pytest.fixture
def machine(dsn: str, tmp_path: Path) -> Iterator[None]:
    """One database and directory for all the examples of the test."""
    PartitionPromise.dsn = dsn
    PartitionPromise.workdir = tmp_path
    yield


TestPartitionPromise = pytest.mark.usefixtures("machine")(PartitionPromise.TestCase)
TestPartitionPromise.settings = settings(
    max_examples=int(os.environ.get("MSGGC_PROMISE_EXAMPLES", "8")),
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    # no explain phase: it replays each step of a failing case many times (minutes, here)
)

