"""``msggc`` under tracemalloc: ``python -m benchmarks.soak_trace REPORT [msggc arguments...]``.

Why: RSS that grows during a soak is either warm-up (caches, arenas, imports done late) or a leak.
tracemalloc tells which Python allocations grow between two moments: a snapshot once the service
has warmed up (``MSGGC_TRACE_WARMUP`` seconds, default 120) is the baseline, and every
``MSGGC_TRACE_EVERY`` seconds (default 60) the report gets the traced total and the allocation
sites that grew most since the baseline. Lines that keep growing at every step are a leak; sizes
that stop growing were warm-up. The traced total at each step also goes, one JSON line each, to
REPORT with the suffix ``.jsonl`` (the soak's check of the Python heap). Kept out of the service
itself: tracing costs CPU and memory, and this way the service's code stays as it runs in
production.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 6
TOP = 25
BUSY = threading.Lock()
"""Held while the report builds a snapshot and its diff: the series never samples those."""


def snapshot() -> tracemalloc.Snapshot:
    """The service's allocations, without the watcher's own (its snapshots and their diffs)."""
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)])


def traced_mb(snap: tracemalloc.Snapshot) -> float:
    return sum(stat.size for stat in snap.statistics("filename")) / 2**20


def watch(report: Path, warmup_s: float, every_s: float) -> None:
    """Baseline after the warm-up, then a diff to it every ``every_s`` seconds (or as often as a
    busy machine lets it), appended to ``report``."""
    start = time.monotonic()
    time.sleep(warmup_s)
    with BUSY:
        base = snapshot()
        with report.open("a") as out:
            out.write(f"baseline at {time.monotonic() - start:.0f} s: traced {traced_mb(base):.2f} MB\n")
    threading.Thread(target=series, name="tracemalloc-series", daemon=True,
                     args=(report.with_suffix(".jsonl"), start, every_s)).start()
    pause = every_s
    while True:
        time.sleep(pause)
        with BUSY:
            began = time.monotonic()
            snap = snapshot()
            stats = snap.compare_to(base, "traceback")
            with report.open("a") as out:
                out.write(f"\n=== {time.monotonic() - start:.0f} s: traced {traced_mb(snap):.2f} MB,"
                          f" {sum(s.size_diff for s in stats) / 2**10:+.1f} KiB since baseline\n")
                for stat in stats[:TOP]:
                    if stat.size_diff <= 0:
                        break
                    out.write(f"{stat.size_diff / 2**10:+9.1f} KiB {stat.count_diff:+7d} blocks  "
                              f"now {stat.size / 2**10:9.1f} KiB\n")
                    for line in stat.traceback.format(most_recent_first=True)[: FRAMES * 2]:
                        out.write(f"      {line}\n")
            del snap, stats  # before the next sample: never traced as the service's
            pause = max(every_s, 3 * (time.monotonic() - began))  # reports never block the series long


def series(path: Path, start: float, every_s: float) -> None:
    """The traced total every ``every_s`` seconds, cheaply (no snapshot), never while the report
    holds a snapshot: the total then counts the service's heap and the baseline, a constant."""
    while True:
        with BUSY:
            point = {"t": round(time.monotonic() - start, 1),
                     "traced_mb": tracemalloc.get_traced_memory()[0] / 2**20}
        with path.open("a") as out:
            out.write(json.dumps(point) + "\n")
        time.sleep(every_s)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def watch_malloc(report: Path, every_s: float) -> None:
    """glibc's own count (mallinfo2, all arenas): bytes in use and bytes free but kept. What
    tracemalloc cannot see: C libraries' allocations (libpq, OpenSSL) and the arenas' holes.
    In use that grows is a leak in C; free that grows while in use stays is fragmentation."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    start = time.monotonic()
    while True:
        info = libc.mallinfo2()
        point = {"t": round(time.monotonic() - start, 1), "in_use_mb": info.uordblks / 2**20,
                 "free_mb": info.fordblks / 2**20, "mmapped_mb": info.hblkhd / 2**20,
                 "arena_mb": info.arena / 2**20}
        with report.open("a") as out:
            out.write(json.dumps(point) + "\n")
        time.sleep(every_s)


def shared_httpx() -> None:
    """The experiment of ``MSGGC_TRACE_SHARED_HTTPX=1``: ``httpx.post`` through one client for the
    process, instead of a new client (and a new TLS context, CA bundle loaded) per call."""
    import httpx

    client = httpx.Client()
    httpx.post = client.post  # type: ignore[assignment]


def main() -> None:
    report = Path(sys.argv[1])
    every = float(os.environ.get("MSGGC_TRACE_EVERY", "60"))
    if os.environ.get("MSGGC_TRACE_PYTHON", "1") == "1":
        tracemalloc.start(FRAMES)
        threading.Thread(target=watch, name="tracemalloc", daemon=True,
                         args=(report, float(os.environ.get("MSGGC_TRACE_WARMUP", "120")), every)).start()
    threading.Thread(target=watch_malloc, name="mallinfo", daemon=True,
                     args=(report.with_suffix(".malloc.jsonl"), every)).start()
    if os.environ.get("MSGGC_TRACE_SHARED_HTTPX") == "1":
        shared_httpx()
    from engine.cli import main as msggc

    sys.argv = ["msggc", *sys.argv[2:]]
    msggc()


if __name__ == "__main__":
    main()
