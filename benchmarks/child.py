"""One contender in its own process: ``python -m benchmarks.child --contender NAME --dsn DSN --out F``
(``--table SCHEMA.TABLE`` on a real-table shape, ``--older-than-days N`` on a shape with a retention).

Why a process of its own: the peak RSS it reports (``VmHWM``) is then the contender's alone,
and a contender that misbehaves can be killed without taking the runner down.
Writes one JSON document to ``--out``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.contenders import Recorder, parse_contender, predict, run
from benchmarks.metrics import LatencySummary, tenths, thin


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.child")
    parser.add_argument("--contender", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--table", default="messages", help="the table to collect (SCHEMA.TABLE)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budget", type=float, default=None, help="seconds (naive only)")
    parser.add_argument("--no-prediction", action="store_true",
                        help="no --dry-run before the run (its sample WAL would be counted in the run's)")
    parser.add_argument("--older-than-days", type=int, default=None,
                        help="garbage is also processed more than N days ago (msggc --older-than Nd)")
    parser.add_argument("--app-p99-ms", type=float, default=None,
                        help="the load's p99 alone this round (a relative latency guard's budget)")
    return parser.parse_args(argv)


def _batch_latency(rec: Recorder, engine: dict[str, Any] | None) -> dict[str, float | None]:
    """msggc measures its batches itself (around each transaction); the baselines here."""
    if engine is not None:
        return {"p50": engine["batch_ms_p50"], "p99": engine["batch_ms_p99"],
                "max": engine["batch_ms_max"], "count": engine["batches"]}
    summary = LatencySummary.of(rec.batch_ms)
    return {"p50": summary.p50, "p99": summary.p99, "max": summary.max, "count": summary.count}


def _peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's peak over fork + exec into it, so a
    child of a 300 MB parent would report 300 MB. ``getrusage`` is the fallback off Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _usage() -> dict[str, float]:
    """Peak RSS and CPU seconds of this process, threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"rss_mb": _peak_rss_mb(), "cpu_s": usage.ru_utime + usage.ru_stime}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    spec = parse_contender(args.contender)
    if spec.pgoptions:
        os.environ["PGOPTIONS"] = f"{os.environ.get('PGOPTIONS', '')} {spec.pgoptions}".strip()
    if spec.kind == "msggc":
        import engine.collector  # noqa: F401  (import time is not the contender's run time)
    if spec.prototypes:
        from benchmarks.prototypes import apply

        for name in spec.prototypes:
            apply(name)
    prediction = (predict(args.dsn, spec, args.table, args.older_than_days, args.app_p99_ms)
                  if spec.kind == "msggc" and not args.no_prediction else None)
    rec = Recorder()
    began = time.time()
    outcome = run(spec, args.dsn, rec, args.budget, args.table, args.older_than_days, args.app_p99_ms)
    elapsed = rec.now()
    points = rec.ordered_points()
    split = tenths(points)
    document = {
        "name": spec.name,
        "kind": spec.kind,
        "table": args.table,
        "strategy": outcome.strategy or spec.kind,
        "workers": (outcome.engine or {}).get("workers") or spec.workers or 1,
        "deleted": outcome.deleted,
        "partial": outcome.partial,
        "note": outcome.note,
        "elapsed_s": elapsed,
        "rows_per_s": outcome.deleted / elapsed if elapsed > 0 else None,
        "batch_ms": _batch_latency(rec, outcome.engine),
        "longest_txn_s": rec.longest_txn_s,
        "first_tenth_rows_s": split.first_rows_s,
        "last_tenth_rows_s": split.last_rows_s,
        "tenth_ratio": split.ratio,
        "timeline": thin(points),
        "engine": outcome.engine,
        "prediction": prediction,
        "started_unix": began,
        **_usage(),
    }
    args.out.write_text(json.dumps(document))
    print(f"  {spec.name}: {outcome.deleted:,} rows in {elapsed:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
