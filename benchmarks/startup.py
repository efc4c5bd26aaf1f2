"""Start-up time: ``import engine.cli`` and a ``msggc gc`` with nothing to collect, wall time as a
user sees it (process start and exit included), the median of ``--runs`` runs.

``python -m benchmarks.startup [--dsn DSN] [--runs N] [--root CHECKOUT]`` prints the figures;
``make bench`` records them in the report. The GC runs on an empty, migrated ``messages`` in a
database of its own. Bytecode is cached as in any installed package: one warm-up run first, under
a private ``PYTHONPYCACHEPREFIX`` (PYTHONDONTWRITEBYTECODE in the caller's environment would make
every run compile the engine's sources again, which no user pays).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.server import Server

ROOT = Path(__file__).resolve().parent.parent
DATABASE = f"msggc_bench_startup_{os.getpid()}"  # two runs on one server keep apart
IMPORT_TARGET_MS = 120.0
GC_TARGET_MS = 250.0
MSGGC = "from engine.cli import main; main(prog_name='msggc')"  # what the console script runs


def _env(root: Path, cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "MSGGC_DSN")}
    return {**env, "PYTHONPATH": str(root), "PYTHONPYCACHEPREFIX": cache}


def _cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _run_ms(command: list[str], root: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one process."""
    began, cpu = time.perf_counter(), _cpu_s()
    subprocess.run(command, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return (time.perf_counter() - began) * 1000, (_cpu_s() - cpu) * 1000


def timed(command: list[str], runs: int, root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Median, min and max wall milliseconds of ``runs`` runs after one warm-up run, and the
    median CPU milliseconds of the process (steadier than wall time on a busy shared machine)."""
    _run_ms(command, root, env)
    times, cpu = zip(*(_run_ms(command, root, env) for _ in range(runs)), strict=True)
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
            "max_ms": round(max(times), 1), "cpu_median_ms": round(statistics.median(cpu), 1),
            "runs": runs}


def measure(server: Server, runs: int = 21, root: Path = ROOT) -> dict[str, Any]:
    """The interpreter alone, ``import engine.cli``, the driver alone (``import psycopg``: the floor
    under any command that queries), and ``msggc gc`` on an empty table."""
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="msggc-pycache-") as cache:
        env = _env(root, cache)
        server.create_database(DATABASE)
        try:
            dsn = server.database(DATABASE)
            subprocess.run([python, "-c", MSGGC, "migrate", "--dsn", dsn], cwd=root, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            figures = {
                "python_ms": timed([python, "-c", "pass"], runs, root, env),
                "import_cli_ms": timed([python, "-c", "import engine.cli"], runs, root, env),
                "import_psycopg_ms": timed([python, "-c", "import psycopg"], runs, root, env),
                "gc_empty_ms": timed([python, "-c", MSGGC, "gc", "--dsn", dsn], runs, root, env),
            }
        finally:
            server.drop_database(DATABASE)
    figures["targets_ms"] = {"import_cli_ms": IMPORT_TARGET_MS, "gc_empty_ms": GC_TARGET_MS}
    figures["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    return figures


def line(figures: dict[str, Any]) -> str:
    """``python_ms 58, import_cli_ms 95, ...``: the medians, for the runner's log."""
    return ", ".join(f"{key} {figure['median_ms']:.0f} (cpu {figure.get('cpu_median_ms', 0):.0f})"
                     for key, figure in figures.items() if isinstance(figure, dict) and "median_ms" in figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("MSGGC_BENCH_DSN"),
                        help="server to run on (loopback only); default: the embedded server")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose engine to measure")
    args = parser.parse_args(argv)
    print(json.dumps(measure(Server.open(args.dsn), args.runs, args.root.resolve()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
