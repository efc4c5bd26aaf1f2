"""The contenders: msggc and the ways people delete old rows today, written as they write them.

Each contender runs in its own child process (:mod:`benchmarks.child`) so its peak RSS is its
own, and records a timeline of committed rows so every contender is judged by the same
arithmetic (:mod:`benchmarks.metrics`).

The baselines are literal SQL on purpose: they stand for application code as commonly written
(one ``DELETE``, a ``LIMIT`` loop, Rails/GitLab ``each_batch``), not for msggc's query builder.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from benchmarks.dataset import GARBAGE_SQL, Layout, garbage_sql, ident
from benchmarks.metrics import Point

Kind = Literal["single", "naive", "each_batch", "msggc"]

NAIVE_BATCH = 5000
EACH_BATCH_OF = 5000

# {t}: the shape's table (``messages`` unless a real-table shape names another), {g}: the garbage
# predicate (``processed_at IS NOT NULL``, and ``AND processed_at < now() - interval 'N days'`` on a
# shape with a retention), see on_table
SINGLE_SQL = "DELETE FROM {t} WHERE {g}"
NAIVE_SQL = (
    "DELETE FROM {t} WHERE id IN"
    " (SELECT id FROM {t} WHERE {g} LIMIT %(n)s)"
)
EACH_BATCH_FIRST = "SELECT id FROM {t} WHERE {g} ORDER BY id LIMIT 1"
EACH_BATCH_NEXT = (
    "SELECT id FROM {t} WHERE {g} AND id >= %(lower)s"
    " ORDER BY id OFFSET %(of)s LIMIT 1"
)
EACH_BATCH_DELETE = (
    "DELETE FROM {t} WHERE {g} AND id >= %(lower)s AND id < %(upper)s"
)
EACH_BATCH_DELETE_TAIL = "DELETE FROM {t} WHERE {g} AND id >= %(lower)s"


def on_table(template: str, table: str, garbage: str = GARBAGE_SQL) -> sql.Composed:
    """A baseline's literal SQL on the shape's table, with the shape's garbage predicate."""
    return sql.SQL(template).format(t=ident(table), g=sql.SQL(garbage))  # type: ignore[arg-type]

ARCHIVE_FORMATS = (None, "gzip", "zstd", "parquet")
"""``_f<n>``: the format of ``--archive-to``."""
MSGGC_NAME = re.compile(
    r"msggc_(auto|physical|index|key|compact)((?:_(?:w\d+|t\d+|s\d+|r\d+|a\d|f\d|c\d|n\d))*)((?:\+[a-z]+)*)")
GUARD_NAME = re.compile(r"msggc_guard_(\d+(?:\.\d+)?)(x|ms)")
"""``msggc_guard_2x``: msggc auto with ``--max-app-latency`` at twice the load's p99 measured alone
in the same round (``_3x``: three times, the service's ``auto``); ``msggc_guard_20ms``: at a fixed
budget."""
WALCOMP = "_walcomp"
DEFAULT_CONTENDERS = (
    "single", "naive", "each_batch", "msggc_default",
    "msggc_auto", "msggc_physical", "msggc_index", "msggc_key", "msggc_auto_w2", "msggc_auto_w2_t10_c1",
    "msggc_auto_a1", "msggc_auto_f1", "msggc_auto_f2", "msggc_auto_f3", "msggc_guard_2x", "msggc_guard_3x",
)


@dataclass(frozen=True)
class ContenderSpec:
    """What a contender name means: its kind and, for msggc, the options it runs with.

    Grammar: ``single|naive|each_batch``, ``msggc_default`` (no flag at all) or
    ``msggc_<strategy>[_w<workers>][_t<target ms>][_s<sleep ms>][_r<max WAL MB/s>][_a1 (--archive)]
    [_f1|_f2|_f3 (--archive-to a gzip CSV, zstd CSV, parquet)][_c1 (--async-commit)]
    [_n1 (--no-drop)][+<prototype>...]`` or ``msggc_guard_<N>x|<N>ms`` (auto with
    ``--max-app-latency`` at N times the load's p99 alone, or at N ms),
    any of them with a
    ``_walcomp`` suffix (session
    ``wal_compression = on`` through PGOPTIONS, the server's default method, pglz unless built
    with lz4/zstd; needs a superuser). A ``+prototype`` is a proposed engine change patched in
    at run time (:mod:`benchmarks.prototypes`).
    """

    name: str
    kind: Kind
    strategy: str | None = None
    workers: int | None = 1
    """None: ``--workers auto``."""
    target_batch_ms: float | None = None
    sleep_ms: float = 0.0
    max_wal_mb_s: float | None = None
    archive: bool = False
    archive_file: int = 0
    """0: none; --archive-to in ARCHIVE_FORMATS[archive_file]: 1 gzip, 2 zstd, 3 parquet."""
    async_commit: bool = False
    no_drop: bool = False
    prototypes: tuple[str, ...] = ()
    walcomp: bool = False
    guard_ms: float | None = None
    """``--max-app-latency`` in ms (``msggc_guard_<N>ms``)."""
    guard_x: float | None = None
    """``--max-app-latency`` as a multiple of the load's p99 alone (``msggc_guard_<N>x``)."""

    def app_latency_budget_ms(self, app_p99_ms: float | None) -> float | None:
        """The guard's budget for this round, from the load's p99 alone when it is relative."""
        if self.guard_x is None:
            return self.guard_ms
        if not app_p99_ms:
            raise ValueError(f"{self.name} needs the load's p99 alone (run with --load-rate > 0)")
        return self.guard_x * app_p99_ms

    @property
    def bounded_by_time(self) -> bool:
        """Only the naive loop may stop on its time budget (reported as partial)."""
        return self.kind == "naive"

    @property
    def pgoptions(self) -> str | None:
        return "-c wal_compression=on" if self.walcomp else None


def inapplicable(spec: ContenderSpec, layout: Layout) -> str | None:
    """Why a contender cannot run on a shape's table (msggc would refuse it up front), or None."""
    if spec.kind == "msggc" and spec.strategy == "key" and not layout.integer_key:
        return "the key-range walk needs one integer key; the key is a uuid"
    return None


def parse_contender(name: str) -> ContenderSpec:
    """The spec of a contender name (see :class:`ContenderSpec` for the grammar)."""
    base, walcomp = (name[: -len(WALCOMP)], True) if name.endswith(WALCOMP) else (name, False)
    if base in ("single", "naive", "each_batch"):
        return ContenderSpec(name=name, kind=base, walcomp=walcomp)  # type: ignore[arg-type]
    if base == "msggc_default":  # `msggc gc` with no flag: the planner's workers, async commits
        return ContenderSpec(name=name, kind="msggc", strategy="auto", workers=None, async_commit=True,
                             walcomp=walcomp)
    if guard := GUARD_NAME.fullmatch(base):
        budget = float(guard[1])
        return ContenderSpec(name=name, kind="msggc", strategy="auto", walcomp=walcomp,
                             guard_x=budget if guard[2] == "x" else None,
                             guard_ms=budget if guard[2] == "ms" else None)
    match = MSGGC_NAME.fullmatch(base)
    if not match:
        raise ValueError(
            f"unknown contender {name!r}: use single, naive, each_batch or"
            " msggc_<auto|physical|index|key|compact>[_w<workers>][_t<ms>][_s<ms>][_r<MB/s>][_a1][_f1][_c1]"
            "[_n1][+prototype...][_walcomp]"
        )
    mods = {part[0]: int(part[1:]) for part in match[2].split("_") if part}
    return ContenderSpec(
        name=name, kind="msggc", strategy=match[1], workers=mods.get("w", 1),
        target_batch_ms=float(mods["t"]) if "t" in mods else None,
        sleep_ms=float(mods.get("s", 0)),
        max_wal_mb_s=float(mods["r"]) if "r" in mods else None,
        archive=bool(mods.get("a")),
        archive_file=mods.get("f", 0),
        async_commit=bool(mods.get("c")),
        no_drop=bool(mods.get("n")),
        prototypes=tuple(p for p in match[3].split("+") if p),
        walcomp=walcomp,
    )


@dataclass
class Recorder:
    """Committed rows over time and per-batch latencies, shared by all contenders.

    Thread-safe because msggc calls ``on_progress`` from each of its worker threads.
    """

    started: float = field(default_factory=time.monotonic)
    points: list[Point] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    longest_txn_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.started

    def walk_started(self, at: float | None = None) -> None:
        """The (t, 0) point that tenths are measured from: after connect and planning."""
        with self.lock:
            self.points.append((self.now() if at is None else at, 0))

    def committed(self, total: int, batch_s: float | None = None, txn_s: float | None = None) -> None:
        with self.lock:
            self.points.append((self.now(), total))
            if batch_s is not None:
                self.batch_ms.append(batch_s * 1000)
            if txn_s is not None:
                self.longest_txn_s = max(self.longest_txn_s, txn_s)

    def ordered_points(self) -> list[Point]:
        """Points by count with non-decreasing time (worker callbacks may interleave)."""
        with self.lock:
            ordered = sorted(self.points, key=lambda p: (p[1], p[0]))
        latest = float("-inf")
        result: list[Point] = []
        for t, count in ordered:
            latest = max(latest, t)
            result.append((latest, count))
        return result


@dataclass
class Outcome:
    """What a contender reports besides its timeline."""

    deleted: int
    partial: bool = False
    strategy: str | None = None
    note: str = ""
    engine: dict[str, Any] | None = None


def connect(dsn: str, name: str) -> psycopg.Connection[Any]:
    """Autocommit, like an application's connection: each statement is its own transaction."""
    conn = psycopg.connect(dsn, autocommit=True, application_name=f"bench-{name}")
    conn.execute("SET statement_timeout = 0")
    return conn


def run_single(dsn: str, rec: Recorder, table: str, garbage: str = GARBAGE_SQL) -> Outcome:
    """One unbounded DELETE: the throughput reference, and one transaction for the whole table."""
    with connect(dsn, "single") as conn:
        rec.walk_started()
        began = time.monotonic()
        deleted = conn.execute(on_table(SINGLE_SQL, table, garbage)).rowcount
        seconds = time.monotonic() - began
        rec.committed(deleted, seconds, seconds)
    return Outcome(deleted=deleted, note="one statement, one transaction")


def run_naive(dsn: str, rec: Recorder, budget_s: float | None, table: str,
              garbage: str = GARBAGE_SQL) -> Outcome:
    """``DELETE ... WHERE id IN (SELECT id ... LIMIT n)`` until nothing is left or time is up.

    Each batch rescans from the start of the table (or index) past the dead rows of the
    previous batches: the reason it slows down as it goes.
    """
    total = 0
    naive = on_table(NAIVE_SQL, table, garbage)
    with connect(dsn, "naive") as conn:
        rec.walk_started()
        while True:
            if budget_s is not None and rec.now() >= budget_s:
                return Outcome(deleted=total, partial=True,
                               note=f"stopped by its {budget_s:g}s time budget")
            began = time.monotonic()
            deleted = conn.execute(naive, {"n": NAIVE_BATCH}).rowcount
            seconds = time.monotonic() - began
            if deleted == 0:
                return Outcome(deleted=total, note=f"LIMIT {NAIVE_BATCH} loop")
            total += deleted
            rec.committed(total, seconds, seconds)


def run_each_batch(dsn: str, rec: Recorder, table: str, garbage: str = GARBAGE_SQL) -> Outcome:
    """GitLab's ``Model.where(garbage).each_batch(of: n) { |b| b.delete_all }``, statement for statement.

    The bound probe ``id >= lower ORDER BY id OFFSET n LIMIT 1`` is an index-only scan; the
    DELETE then covers the half-open key range. Probe and DELETE are separate transactions.
    """
    total = 0
    first, probe, delete, tail = (on_table(template, table, garbage) for template in (
        EACH_BATCH_FIRST, EACH_BATCH_NEXT, EACH_BATCH_DELETE, EACH_BATCH_DELETE_TAIL))
    with connect(dsn, "each_batch") as conn:
        rec.walk_started()
        row = conn.execute(first).fetchone()
        lower = row[0] if row else None
        while lower is not None:
            began = time.monotonic()
            row = conn.execute(probe, {"lower": lower, "of": EACH_BATCH_OF}).fetchone()
            upper = row[0] if row else None
            probed = time.monotonic()
            if upper is None:
                deleted = conn.execute(tail, {"lower": lower}).rowcount
            else:
                deleted = conn.execute(delete, {"lower": lower, "upper": upper}).rowcount
            done = time.monotonic()
            total += deleted
            rec.committed(total, done - began, max(done - probed, probed - began))
            lower = upper
    return Outcome(deleted=total, note=f"each_batch(of: {EACH_BATCH_OF}) scoped to garbage")


def msggc_options(spec: ContenderSpec, dry_run: bool = False, archive_dir: str | None = None,
                  table: str = "messages", retention_days: int | None = None,
                  app_p99_ms: float | None = None) -> Any:
    """What ``msggc gc --table TABLE [--older-than Nd] ...`` would run with for this contender."""
    from engine.config import GcOptions, TableSpec

    return GcOptions(
        table=TableSpec.parse(table),
        strategy=spec.strategy or "auto",  # type: ignore[arg-type]
        workers=spec.workers,
        target_batch_ms=spec.target_batch_ms or GcOptions.target_batch_ms,
        sleep=spec.sleep_ms / 1000,
        max_wal_rate=spec.max_wal_mb_s * 2**20 if spec.max_wal_mb_s else None,
        archive=spec.archive,
        archive_to=archive_dir if spec.archive_file else None,
        archive_format=ARCHIVE_FORMATS[spec.archive_file] if spec.archive_file else None,
        async_commit=spec.async_commit,
        no_drop=spec.no_drop,
        older_than=timedelta(days=retention_days) if retention_days is not None else None,
        dry_run=dry_run,
        max_app_latency_ms=None if dry_run and app_p99_ms is None else spec.app_latency_budget_ms(app_p99_ms),
    )


def predict(dsn: str, spec: ContenderSpec, table: str = "messages",
            retention_days: int | None = None, app_p99_ms: float | None = None) -> dict[str, Any]:
    """``--dry-run``'s prediction, made before the timed run. Its sample batches roll back; the
    full-page images they wrote are then not written again by the run, so the contender's WAL
    (samples included) stays what the run alone would have written, within their few delete
    records (``sample_wal_bytes`` reports them all). A guard contender's dry run takes its
    budget: its ``seconds`` are then the duration predicted under it (``unguarded_seconds``
    the full-speed one), with the dry run's verdict on the budget."""
    import psycopg

    from engine.collector import collect

    lsn = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
    from benchmarks.server import RUNNER_APPLICATION_NAME

    with psycopg.connect(dsn, autocommit=True, application_name=RUNNER_APPLICATION_NAME) as conn:
        before = conn.execute(lsn).fetchone()[0]
        options = msggc_options(spec, dry_run=True, archive_dir=tempfile.gettempdir(), table=table,
                                retention_days=retention_days,
                                app_p99_ms=app_p99_ms if spec.guard_x or spec.guard_ms else None)
        result = collect(dsn, options)
        sample_wal = conn.execute(lsn).fetchone()[0] - before
    guarded = result.budget_verdict is not None
    return {"seconds": result.predicted_guarded_seconds if guarded else result.predicted_seconds,
            "unguarded_seconds": result.predicted_seconds, "wal_bytes": result.predicted_wal_bytes,
            "garbage_estimate": result.garbage_estimate, "sample_wal_bytes": sample_wal,
            "budget_verdict": result.budget_verdict, "guarded_wal_rate": result.predicted_guarded_wal_rate,
            "alone_p99_ms": result.app_latency_before_p99_ms}


def run_msggc(dsn: str, rec: Recorder, spec: ContenderSpec, table: str,
              retention_days: int | None = None, app_p99_ms: float | None = None) -> Outcome:
    """``engine.collect`` as a caller embeds it; its timeline comes from ``on_progress``."""
    from engine.collector import collect
    from engine.result import Progress

    first = threading.Event()

    def on_progress(progress: Progress) -> None:
        if not first.is_set():
            first.set()
            rec.walk_started(rec.now() - progress.elapsed_s)
        rec.committed(progress.deleted)

    with tempfile.TemporaryDirectory(prefix="msggc-bench-") as archive_dir:
        options = msggc_options(spec, archive_dir=archive_dir, table=table, retention_days=retention_days,
                                app_p99_ms=app_p99_ms)
        began = rec.now()
        result = collect(dsn, options, on_progress=on_progress)
        archived = sum(f.stat().st_size for f in Path(archive_dir).rglob("*") if f.is_file())
    if not first.is_set():  # a compaction: no batches, its count is committed once, at its end
        rec.walk_started(began)
        rec.committed(result.messages_deleted, result.elapsed_s)
    if result.status != "complete":
        raise RuntimeError(f"msggc ended {result.status}: {result.error or result.stop_reason}")
    engine = {**result.as_json(), "archive_file_bytes": archived}
    rec.longest_txn_s = (result.batch_ms_max or 0.0) / 1000
    return Outcome(deleted=result.messages_deleted, strategy=result.strategy,
                   note=result.reason, engine=engine)


def run(spec: ContenderSpec, dsn: str, rec: Recorder, budget_s: float | None,
        table: str = "messages", retention_days: int | None = None,
        app_p99_ms: float | None = None) -> Outcome:
    """Dispatch by kind; every contender deletes the same garbage (older than the retention
    when the shape has one: the baselines in their SQL, msggc with ``--older-than``)."""
    garbage = garbage_sql(retention_days)
    if spec.kind == "single":
        return run_single(dsn, rec, table, garbage)
    if spec.kind == "naive":
        return run_naive(dsn, rec, budget_s, table, garbage)
    if spec.kind == "each_batch":
        return run_each_batch(dsn, rec, table, garbage)
    return run_msggc(dsn, rec, spec, table, retention_days, app_p99_ms)
