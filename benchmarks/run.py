"""The runner: ``python -m benchmarks [--rows N] [--shapes ...] [--contenders ...] [--dsn DSN]``.

For each shape: seed a template database once; then, in each round, measure the application
load alone on a fresh copy, and for each contender make a fresh copy, CHECKPOINT, start the
load, run the contender in a child process, stop the load, read the WAL counters and check the
count of deleted rows against the exact expected count (a wrong count aborts the run). Results
go to ``<out>/<date>-<shape>.json`` with a plot, and the whole run to the markdown report.

With ``--seed-per-contender`` (tables too big for a template and a copy) every contender's
database is seeded itself instead, and the run first checks the server's disk has room.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import dataset, report, space, startup
from benchmarks.contenders import DEFAULT_CONTENDERS, ContenderSpec, inapplicable, parse_contender
from benchmarks.metrics import LatencySummary, ratio
from benchmarks.pgbench_app import PgbenchProcess
from benchmarks.server import (
    BenchmarkError,
    HarnessError,
    Server,
    WaitSampler,
    busy_share,
    cpu_times,
    machine,
)

ROOT = Path(__file__).resolve().parent.parent
COPY_NAME = f"msggc_bench_run_{os.getpid()}"  # two runs on one server keep apart
SCALE_CONTENDERS = ("single", "msggc_auto", "msggc_auto_w2", "msggc_default")
CROSSOVER_CONTENDERS = ("single", "msggc_physical", "msggc_index")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run; recorded in every result file."""

    rows: int
    shapes: tuple[str, ...]
    contenders: tuple[str, ...]
    naive_budget_s: float
    load_rate: float
    baseline_s: float
    load_max_s: float
    scale: tuple[int, ...]
    crossover: tuple[float, ...]
    crossover_rows: int
    crossover_contenders: tuple[str, ...]
    proposal: tuple[str, ...]
    repeats: int
    contender_timeout_s: float
    out: str
    markdown: str | None
    reuse_templates: bool
    keep_templates: bool
    app: str = "load"
    """The application beside each contender: the runner's own load, or pgbench."""
    seed_per_contender: bool = False

    @property
    def scale_shape(self) -> str:
        """The shape of the scale curve (``--scale``): the first of ``--shapes``."""
        return self.shapes[0] if self.shapes else "dense"


@dataclass(frozen=True)
class Entry:
    """A contender as it appears in the report: a label (unique in the run) and its spec."""

    label: str
    spec: ContenderSpec


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(part)) for part in _csv(text))


def parse_args(argv: list[str] | None) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("MSGGC_BENCH_DSN"),
                        help="server to run on (loopback only); default: the embedded server")
    parser.add_argument("--rows", type=lambda s: int(float(s)), default=10_000_000)
    parser.add_argument("--shapes", type=_csv, default=("dense", "sparse", "aged"),
                        help="among " + ", ".join(dataset.LAYOUTS) + " (uuid-*, cascade: an"
                             " application's tables in schema app; part-*: a table partitioned by"
                             " day; see benchmarks/dataset.py)")
    parser.add_argument("--contenders", type=_csv, default=DEFAULT_CONTENDERS)
    parser.add_argument("--naive-budget", type=float, default=None,
                        help="seconds the naive loop may run (default scales with --rows)")
    parser.add_argument("--load-rate", type=float, default=200.0,
                        help="application operations per second beside each contender; 0 = no load")
    parser.add_argument("--baseline-seconds", type=float, default=None,
                        help="how long to measure the load without GC (default scales with --rows)")
    parser.add_argument("--load-max-seconds", type=float, default=900.0)
    parser.add_argument("--app", choices=("load", "pgbench"), default="load",
                        help="the application beside each contender: benchmarks/load.py, or pgbench"
                             " (TPC-B-like, rate-limited to --load-rate, its own per-transaction log)")
    parser.add_argument("--scale", type=_ints, default=(),
                        help="extra row counts for the scale curve of the first of --shapes,"
                             " e.g. 1000000,3000000")
    parser.add_argument("--crossover", type=lambda t: tuple(float(x) for x in _csv(t)), default=(),
                        help="garbage fractions for the physical-vs-index planner experiment")
    parser.add_argument("--crossover-rows", type=lambda s: int(float(s)), default=None)
    parser.add_argument("--crossover-contenders", type=_csv, default=CROSSOVER_CONTENDERS)
    parser.add_argument("--proposal", type=_csv, default=(),
                        help="LABEL[,PARALLEL_LABEL]: contenders standing for a proposed engine change;"
                             " the targets table shows them beside msggc as it is")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all contenders; each figure is taken from the median run")
    parser.add_argument("--contender-timeout", type=float, default=1800.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"),
                        help="markdown report to write ('' for none)")
    parser.add_argument("--reuse-templates", action="store_true",
                        help="reuse seeded templates left by an earlier run with --keep-templates")
    parser.add_argument("--keep-templates", action="store_true")
    parser.add_argument("--seed-per-contender", action="store_true",
                        help="no template: seed each contender's database itself (the same rows), drop"
                             " it after; for tables with no room for a template and a copy")
    args = parser.parse_args(argv)
    if args.seed_per_contender and (args.reuse_templates or args.keep_templates):
        parser.error("--seed-per-contender keeps no template: drop --reuse-templates/--keep-templates")
    for name in (*args.contenders, *args.crossover_contenders):
        parse_contender(name)
    if unknown := [shape for shape in args.shapes if shape not in dataset.LAYOUTS]:
        parser.error(f"unknown shape {unknown[0]!r}: choose among {', '.join(dataset.LAYOUTS)}")
    scale_factor = args.rows / 10_000_000
    settings = Settings(
        app=args.app,
        rows=args.rows,
        shapes=args.shapes,
        contenders=args.contenders,
        naive_budget_s=args.naive_budget or min(120.0, max(5.0, 60.0 * scale_factor)),
        load_rate=args.load_rate,
        baseline_s=args.baseline_seconds or min(20.0, max(5.0, 20.0 * scale_factor)),
        load_max_s=args.load_max_seconds,
        scale=tuple(n for n in args.scale if n != args.rows),
        crossover=args.crossover,
        crossover_rows=args.crossover_rows or args.rows,
        crossover_contenders=args.crossover_contenders,
        proposal=args.proposal,
        repeats=max(1, args.repeats),
        contender_timeout_s=args.contender_timeout,
        out=args.out,
        markdown=args.markdown or None,
        reuse_templates=args.reuse_templates,
        keep_templates=args.keep_templates or args.reuse_templates,
        seed_per_contender=args.seed_per_contender,
    )
    return settings, args.dsn


def entries(names: tuple[str, ...]) -> list[Entry]:
    """The contenders in run order."""
    return [Entry(name, parse_contender(name)) for name in names]


# --- child processes -----------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """Children import ``benchmarks`` and ``engine`` from this checkout."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


class LoadProcess:
    """The application load in its own process; started before a contender, stopped after."""

    def __init__(self, dsn: str, settings: Settings, workdir: Path, tag: str, table: str) -> None:
        self.out = workdir / f"load-{tag}.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.load", "--dsn", dsn, "--rate", str(settings.load_rate),
             "--max-seconds", str(settings.load_max_s), "--out", str(self.out), "--table", table],
            cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, text=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], READY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.proc.kill()
            raise HarnessError(f"the load process did not start (said {line!r})")

    def stop(self) -> dict[str, Any]:
        """SIGTERM: the load finishes its operation in flight and writes its summary."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise HarnessError("the load process did not stop") from None
        if self.proc.returncode != 0 or not self.out.exists():
            raise HarnessError(f"the load process failed (exit {self.proc.returncode},"
                               f" summary {'present' if self.out.exists() else 'missing'})")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def application(dsn: str, settings: Settings, workdir: Path, tag: str,
                table: str) -> LoadProcess | PgbenchProcess:
    """The application beside a contender (``--app``)."""
    if settings.app == "pgbench":
        return PgbenchProcess(dsn, settings.load_rate, settings.load_max_s, workdir, tag)
    return LoadProcess(dsn, settings, workdir, tag, table)


def run_child(entry: Entry, dsn: str, settings: Settings, workdir: Path, table: str,
              retention_days: int | None = None, predicted: bool = True,
              app_p99_ms: float | None = None) -> dict[str, Any]:
    """One contender in a child process, on the shape's table; its JSON document.

    ``predicted`` False: msggc runs without the ``--dry-run`` before it. On a partitioned shape
    its sample batches write WAL (full-page images, delete records) into leaves the run then
    drops: WAL the run itself would never write, which the contender's WAL would count."""
    out = workdir / f"{entry.label}.json"
    command = [sys.executable, "-m", "benchmarks.child", "--contender", entry.spec.name,
               "--dsn", dsn, "--out", str(out), "--table", table]
    if entry.spec.bounded_by_time:
        command += ["--budget", str(settings.naive_budget_s)]
    if retention_days is not None:
        command += ["--older-than-days", str(retention_days)]
    if not predicted:
        command += ["--no-prediction"]
    if app_p99_ms is not None:
        command += ["--app-p99-ms", str(app_p99_ms)]
    try:
        done = subprocess.run(command, cwd=ROOT, env=_child_env(), timeout=settings.contender_timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{entry.label} exceeded {settings.contender_timeout_s:g}s") from None
    if done.returncode != 0 or not out.exists():
        raise BenchmarkError(f"{entry.label} failed (exit {done.returncode}); see its stderr above")
    document: dict[str, Any] = json.loads(out.read_text())
    document["label"] = entry.label
    return document


# --- one measurement -------------------------------------------------------------------------


@dataclass
class Databases:
    """Where each measurement's database comes from: a byte-for-byte copy of the template, or
    with ``seed_each`` (no room for a template and a copy) a seed of its own.

    Seeding each, ``template`` names the first seed (made by :func:`run_shape`, not yet used);
    every later one is the same deterministic seed, its garbage count checked equal. The load
    alone runs on the next contender's unused seed, before that contender: cheaper than one
    more seed, and its operations neither make nor touch garbage (a few thousand rows among
    millions; CHECKPOINT again before the contender)."""

    server: Server
    template: dataset.Template
    seed_each: bool = False
    unused: bool = False
    """COPY_NAME holds a seed no contender ran on yet."""
    seed_s: list[float] = field(default_factory=list)
    """Seconds of each seed after the first (seeding each)."""

    def make(self) -> tuple[str, float, dict[str, Any]]:
        """The database, checkpointed; its DSN, seconds to make it (copy or seed), conditions."""
        began = time.monotonic()
        if not self.seed_each:
            self.server.create_database(COPY_NAME, template=self.template.name)
        elif not self.unused:
            t = self.template
            again = dataset.build(self.server, t.shape, t.rows, False, t.fraction, name=COPY_NAME)
            if again.expected_garbage != t.expected_garbage:
                raise BenchmarkError(f"seed of {t.shape} {t.rows:,} found {again.expected_garbage:,}"
                                     f" garbage rows, the first {t.expected_garbage:,}")
            self.seed_s.append(round(time.monotonic() - began, 1))
        self.unused = False
        made_s = time.monotonic() - began
        dsn = self.server.database(COPY_NAME)
        self.server.checkpoint()
        return dsn, made_s, dataset.conditions(dsn, self.template.table)

    def release(self, reuse: bool = False) -> None:
        """Drop the database, or keep an own seed for the next contender (``reuse``)."""
        if reuse and self.seed_each:
            self.unused = True
        else:
            self.server.drop_database(COPY_NAME)


def baseline_load(server: Server, databases: Databases, settings: Settings,
                  workdir: Path) -> dict[str, Any] | None:
    """The load alone on a fresh database: its latency without GC, and its own WAL per operation."""
    if settings.load_rate <= 0:
        return None
    print(f"baseline: load alone for {settings.baseline_s:g}s", file=sys.stderr)
    dsn, _, _ = databases.make()
    os.sync()  # the seed's and the copy's pages written out first: the server alone, not its disk's backlog
    template = databases.template
    before = server.wal_snapshot()
    load = application(dsn, settings, workdir, "baseline", template.table)
    try:
        time.sleep(settings.baseline_s)
        summary = load.stop()
    finally:
        load.kill()
    summary.pop("ops_log", None)
    after = server.wal_snapshot()
    wal = server.wal_bytes(before, after)
    databases.release(reuse=True)
    summary["wal_bytes"] = wal
    summary["wal_bytes_per_op"] = wal / summary["ops"] if summary["ops"] else 0.0
    return summary


def verify(label: str, document: dict[str, Any], expected: int, remaining: int,
           children: dict[str, int] | None = None, seeded_rows: int = 0) -> None:
    """The count must be exact: a contender that deletes too much or too little is a bug. Each
    child table (one row per seeded parent, ON DELETE CASCADE) must have lost as many rows."""
    deleted = document["deleted"]
    if deleted + remaining != expected:
        raise BenchmarkError(
            f"{label}: deleted {deleted:,} + remaining {remaining:,} != expected {expected:,} garbage rows"
        )
    if not document["partial"] and remaining != 0:
        raise BenchmarkError(f"{label}: reported complete but {remaining:,} garbage rows remain")
    for child, left in (children or {}).items():
        if left != seeded_rows - deleted:
            raise BenchmarkError(f"{label}: {child} holds {left:,} rows, expected {seeded_rows - deleted:,}"
                                 f" ({seeded_rows:,} seeded, {deleted:,} parents deleted)")


def measure(server: Server, databases: Databases, entry: Entry, settings: Settings,
            baseline: dict[str, Any] | None, workdir: Path) -> dict[str, Any]:
    """One contender on a fresh database, with the load beside it; every figure of the report."""
    template = databases.template
    print(f"contender {entry.label} on {template.shape} {template.rows:,}", file=sys.stderr)
    dsn, copy_s, conditions = databases.make()
    before = server.wal_snapshot()
    load = (application(dsn, settings, workdir, entry.label, template.table) if settings.load_rate > 0
            else None)
    sampler = WaitSampler(server, COPY_NAME)
    sampler.start()
    cpu_before, loadavg = cpu_times(), os.getloadavg()[0]
    try:
        document = run_child(entry, dsn, settings, workdir, template.table, template.layout.retention_days,
                             predicted=not template.layout.partitions, app_p99_ms=_p99(baseline))
        host_busy = busy_share(cpu_before, cpu_times())
        load_summary = load.stop() if load else None
    finally:
        profile = sampler.stop()
        if load:
            load.kill()
    if load_summary is not None:
        scored_over_run(load_summary, document)
    time.sleep(0.5)  # backends flush their WAL statistics as they exit
    after = server.wal_snapshot()
    remaining = dataset.remaining_garbage(dsn, template.table, template.layout.predicate)
    children = dataset.remaining_children(dsn, template.layout)
    verify(entry.label, document, template.expected_garbage, remaining, children, template.rows)
    databases.release()
    wal = server.wal_bytes(before, after)
    load_wal = (load_summary["ops"] * baseline["wal_bytes_per_op"]) if load_summary and baseline else 0.0
    document.update(
        expected=template.expected_garbage,
        remaining=remaining,
        children_remaining=children or None,
        copy_s=copy_s,
        conditions=conditions,
        wal_bytes=wal,
        wal_bytes_load_estimate=round(load_wal),
        wal_bytes_gc=gc_wal(wal, load_wal),
        wal_fpi=after.fpi - before.fpi,
        wal_records=after.records - before.records,
        checkpoints_during=after.checkpoints - before.checkpoints,
        backend_block_writes=(after.backend_writes - before.backend_writes
                              if after.backend_writes is not None and before.backend_writes is not None
                              else None),
        load=load_summary,
        profile=profile,
        host_cpu_busy=host_busy,
        loadavg_at_start=round(loadavg, 2),
    )
    deleted = document["deleted"]
    document["wal_bytes_per_row"] = (document["wal_bytes_gc"] / deleted
                                     if deleted and document["wal_bytes_gc"] is not None else None)
    _print_line(document)
    return document


def _per_row(wal_bytes_per_row: float | None) -> str:
    return "n/a (the load's own unknown)" if wal_bytes_per_row is None else f"{wal_bytes_per_row:.0f} B/row"


def gc_wal(wal: int, load_wal: float) -> int | None:
    """The contender's WAL: the server's over its run less the load's estimate (the load's WAL
    per operation in the baseline, timed right after a checkpoint as each contender's is). None
    where the estimate is half of the server's WAL or more: over a run of minutes the load writes
    its pages' full-page images once per checkpoint, not once per 10 s, and the estimate came to
    more than everything written (a guarded 10M run read as 0 bytes)."""
    return round(wal - load_wal) if load_wal < wal / 2 else None


def scored_over_run(load: dict[str, Any], document: dict[str, Any]) -> None:
    """The load's latency over the contender's run alone (from its start to its end, the
    dry run before it left out): what the application felt during the GC. The whole load's
    figures stay as ``latency_ms_whole``; the per-operation log is dropped from the report."""
    log = load.pop("ops_log", None)
    began = document.get("started_unix")
    if not log or began is None:
        return
    ended = began + document["elapsed_s"]
    during = [(at, ms) for at, ms in log if began <= at <= ended]
    load["latency_ms_whole"] = load["latency_ms"]
    load["latency_ms"] = asdict(LatencySummary.of([ms for _, ms in during]))
    load["scored_over"] = "the contender's run"
    load["p99_by_window"] = p99_by_window(during, began)


P99_WINDOW_S = 30.0


def p99_by_window(log: list[tuple[float, float]], began: float) -> list[dict[str, float | None]]:
    """The load's p99 per ``P99_WINDOW_S`` of the run (seconds from its start): where in a long
    run the application felt it (a timed checkpoint, the run's first minutes), beside the
    guard's own series."""
    windows: dict[int, list[float]] = {}
    for at, ms in log:
        windows.setdefault(int((at - began) // P99_WINDOW_S), []).append(ms)
    return [{"from_s": n * P99_WINDOW_S, "ops": len(values), "p99_ms": LatencySummary.of(values).p99}
            for n, values in sorted(windows.items())]


def measure_once_more(server: Server, databases: Databases, entry: Entry, settings: Settings,
                      baseline: dict[str, Any] | None, workdir: Path) -> dict[str, Any]:
    """:func:`measure`, retried once when the harness (not the contender) failed."""
    try:
        return measure(server, databases, entry, settings, baseline, workdir)
    except HarnessError as exc:
        print(f"  harness failure ({exc}); measuring {entry.label} again", file=sys.stderr)
        return measure(server, databases, entry, settings, baseline, workdir)


def _print_line(doc: dict[str, Any]) -> None:
    load = (doc.get("load") or {}).get("latency_ms") or {}
    print(
        f"  -> {doc['label']}: {doc['deleted']:,} rows, {doc['elapsed_s']:.2f}s,"
        f" {doc['rows_per_s'] or 0:,.0f} rows/s, p99 batch {doc['batch_ms']['p99'] or 0:.1f} ms,"
        f" WAL {_per_row(doc['wal_bytes_per_row'])}, RSS {doc['rss_mb']:.0f} MB,"
        f" app p99 {load.get('p99') or 0:.1f} ms" + _guard_note(doc.get("engine") or {})
        + (" (partial)" if doc["partial"] else ""),
        file=sys.stderr,
    )


def _guard_note(engine: dict[str, Any]) -> str:
    """A latency-guarded msggc run: its budget, what its probe felt, the time it held back."""
    if engine.get("app_latency_budget_ms") is None:
        return ""
    return (f" [guard {engine['app_latency_budget_ms']:.1f} ms: probe p99"
            f" {engine.get('app_latency_p99_ms') or 0:.1f} ms, held back {engine.get('held_back_s', 0):.1f}s,"
            f" min share {engine.get('rate_share_min') or 1:.2f}]")


# --- shapes and scale ---------------------------------------------------------------------


RUN_FIELDS = ("elapsed_s", "rows_per_s", "wal_bytes_per_row", "tenth_ratio", "longest_txn_s", "rss_mb",
              "host_cpu_busy", "loadavg_at_start")


def _run_summary(document: dict[str, Any]) -> dict[str, Any]:
    """The few figures kept from every run, for the spread."""
    summary = {key: document.get(key) for key in RUN_FIELDS}
    summary["batch_ms_p99"] = document["batch_ms"]["p99"]
    summary["app_p99_ms"] = ((document.get("load") or {}).get("latency_ms") or {}).get("p99")
    return summary


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _p99(document: dict[str, Any] | None) -> float | None:
    return (((document or {}).get("load") or document or {}).get("latency_ms") or {}).get("p99")


def paired(runs: list[dict[str, Any]], reference: list[dict[str, Any]] | None,
           baselines: list[dict[str, Any] | None]) -> dict[str, list[float | None]]:
    """Ratios taken within each round: the contender against ``single`` and against the load
    alone *of the same round*.

    Why: on a shared machine the background changes over minutes; a ratio of two runs a few
    seconds apart cancels most of it, a ratio of two medians taken over the whole run does not.
    """
    refs = reference or [None] * len(runs)
    return {
        "x_single": [ratio(run["rows_per_s"], (ref or {}).get("rows_per_s"))
                     for run, ref in zip(runs, refs, strict=True)],
        "x_single_wal": [ratio(run["wal_bytes_per_row"], (ref or {}).get("wal_bytes_per_row"))
                         for run, ref in zip(runs, refs, strict=True)],
        "x_app_p99": [ratio(_p99(run), _p99(base)) for run, base in zip(runs, baselines, strict=True)],
    }


def aggregate(runs: list[dict[str, Any]], reference: list[dict[str, Any]] | None,
              baselines: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One contender over its runs: the run of median rows/s, with every run's key figures.

    Why the median run rather than averages: all figures of a row then come from one real run
    (a p99 and a WAL count of the same execution), while the spread is shown beside them. The
    ratios are medians of the per-round ratios (:func:`paired`), and the application's p99 is
    the median of the runs' p99s: it is the noisiest figure of all.
    """
    ordered = sorted(runs, key=lambda doc: doc["rows_per_s"] or 0.0)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs"] = [_run_summary(doc) for doc in runs]
    chosen["app_p99_ms_median"] = _median([r["app_p99_ms"] for r in chosen["runs"]])
    chosen["paired"] = paired(runs, reference, baselines)
    chosen["paired_median"] = {key: _median(values) for key, values in chosen["paired"].items()}
    return chosen


def _rotated(names: tuple[str, ...], round_: int) -> tuple[str, ...]:
    """Each round starts one contender later, so no contender always runs right after a copy
    of the same neighbour or always first."""
    shift = round_ % len(names) if names else 0
    return names[shift:] + names[:shift]


def run_shape(server: Server, shape: str, rows: int, names: tuple[str, ...], settings: Settings,
              workdir: Path, fraction: float | None = None) -> dict[str, Any]:
    """Seed (or reuse) the template, or seeding each the first contender's database; then per
    round the load alone, then every contender.

    With ``--repeats N`` the contenders run round-robin N times (not N times in a row), so a
    noisy minute on a shared machine spreads over all of them instead of hitting one; the load
    alone is measured in every round, as the reference of that round's contenders.
    """
    layout = dataset.layout(shape)
    skipped = {name: reason for name in names if (reason := inapplicable(parse_contender(name), layout))}
    for name, reason in skipped.items():
        print(f"skipping {name} on {shape}: {reason}", file=sys.stderr)
    names = tuple(name for name in names if name not in skipped)
    seed_each = settings.seed_per_contender
    template = dataset.build(server, shape, rows, settings.reuse_templates, fraction,
                             name=COPY_NAME if seed_each else None)
    databases = Databases(server, template, seed_each, unused=seed_each)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    baselines: list[dict[str, Any] | None] = []
    try:
        for round_ in range(settings.repeats):
            if settings.repeats > 1:
                print(f"round {round_ + 1}/{settings.repeats}", file=sys.stderr)
            baselines.append(baseline_load(server, databases, settings, workdir))
            for entry in entries(_rotated(names, round_)):
                runs[entry.label].append(
                    measure_once_more(server, databases, entry, settings, baselines[-1], workdir))
    finally:
        server.drop_database(COPY_NAME)
        if not settings.keep_templates:
            server.drop_database(template.name)
    measured = [b for b in baselines if b is not None]
    typical = sorted(measured, key=lambda b: _p99(b) or 0.0)[(len(measured) - 1) // 2] if measured else None
    return {
        "shape": shape,
        "table": layout.table,
        "children": list(layout.children),
        "layout": layout.description or None,
        "skipped": skipped,
        "rows": rows,
        "fraction": fraction,
        "expected_garbage": template.expected_garbage,
        "seed": template.seed,
        "seed_reused": template.reused,
        "seed_per_contender": seed_each,
        "reseed_s": databases.seed_s,
        "baseline_load": typical,
        "baseline_p99_by_round": [_p99(b) for b in baselines],
        "contenders": [aggregate(runs[name], runs.get("single"), baselines) for name in names],
    }


def planned(settings: Settings) -> list[tuple[str, int, float | None]]:
    """Every dataset the run seeds, in order: (shape, rows, garbage fraction)."""
    return list(dict.fromkeys([*((shape, settings.rows, None) for shape in settings.shapes),
                               *((settings.scale_shape, rows, None) for rows in settings.scale),
                               *(("dense", settings.crossover_rows, f) for f in settings.crossover)]))


def check_space(server: Server, settings: Settings) -> None:
    """Refuse, before any seed, a run the disk of the server's data directory has no room for
    (:mod:`benchmarks.space`); say so when the directory cannot be read (not checked then)."""
    datasets = planned(settings)
    sizes = [rows * dataset.layout(shape).bytes_per_row for shape, rows, _ in datasets]
    kept = None
    if settings.keep_templates:
        kept = [size for (shape, rows, fraction), size in zip(datasets, sizes, strict=True)
                if not (settings.reuse_templates
                        and server.database_exists(dataset.template_name(shape, rows, fraction)))]
    try:
        with server.connect() as conn:
            directory, max_wal = conn.execute(
                "SELECT current_setting('data_directory'), pg_size_bytes(current_setting('max_wal_size'))"
            ).fetchone() or ("", 0)
        free = shutil.disk_usage(directory).free
    except (psycopg.Error, OSError) as exc:
        print(f"disk: room not checked, the server's data directory is not readable here ({exc})",
              file=sys.stderr)
        return
    required = space.need(sizes, max_wal, seed_each=settings.seed_per_contender, kept=kept)
    if refusal := space.shortfall(required, free, directory):
        raise BenchmarkError(refusal)
    print(f"disk: needs {required.describe()}, {space.gib(free)} free in {directory}", file=sys.stderr)


def git_state() -> dict[str, Any]:
    """The commit measured, and the engine files that differed from it (work in progress)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=False, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "engine_changes": git("status", "--porcelain", "--", "engine").splitlines()}


def main(argv: list[str] | None = None) -> int:
    settings, dsn = parse_args(argv)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        server = Server.open(dsn)
        check_space(server, settings)
        context = {
            "date": date.today().isoformat(),
            "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(),
            "git": git_state(),
            "server": server.settings(),
            "settings": asdict(settings),
        }
        print(f"server: {context['server']['version']}", file=sys.stderr)
        context["startup"] = startup.measure(server)
        print(f"startup: {startup.line(context['startup'])}", file=sys.stderr)
        shapes: dict[str, Any] = {}
        scale: list[dict[str, Any]] = []
        crossover: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="bench-work-") as tmp:
            workdir = Path(tmp)
            for shape in settings.shapes:
                doc = run_shape(server, shape, settings.rows, settings.contenders, settings, workdir)
                shapes[shape] = doc
                report.write_shape(out, context, doc)
            for rows in settings.scale:
                names = tuple(dict.fromkeys(n for n in (*SCALE_CONTENDERS, *settings.proposal)
                                            if n in settings.contenders))
                scale.append(run_shape(server, settings.scale_shape, rows, names, settings, workdir))
            if settings.scale:
                report.write_scale(out, context, scale, shapes.get(settings.scale_shape))
            for fraction in settings.crossover:
                crossover.append(run_shape(server, "dense", settings.crossover_rows,
                                           settings.crossover_contenders, settings, workdir, fraction))
                report.write_crossover(out, context, crossover)
    except BenchmarkError as exc:
        print(f"benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    context["duration_s"] = round(time.monotonic() - started, 1)
    if settings.markdown:
        report.write_markdown(Path(settings.markdown), out, context, shapes, scale, crossover)
    print(f"done in {context['duration_s']:.0f}s; results in {out}", file=sys.stderr)
    return 0
