"""pgbench's per-transaction latencies (``-l``) laid against one GC run: p99 in the seconds
before it and during it, and every transaction over 15 ms with its time from the run's start.
Reads ``pgbench_log.*``, ``gc.start``, ``gc.end`` and ``phases.json`` that ``probe.sh`` leaves
in /tmp/bench/pgblog."""

import json
import sys
from pathlib import Path

LOGS = Path("/tmp/bench/pgblog")


def latencies() -> list[tuple[float, float]]:
    """(start time, latency ms) of every transaction; a log line is: client, transaction,
    latency µs, script, epoch s, µs of the end."""
    found = []
    for log in LOGS.glob("pgbench_log.*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            ended = int(fields[4]) + int(fields[5]) / 1e6
            took_us = int(fields[2])
            found.append((ended - took_us / 1e6, took_us / 1000.0))
    return sorted(found)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))] if ordered else float("nan")


def main() -> None:
    start = float((LOGS / "gc.start").read_text())
    end = float((LOGS / "gc.end").read_text())
    every = latencies()
    during = [ms for at, ms in every if start <= at <= end]
    before = [ms for at, ms in every if at < start]
    print(f"gc {end - start:.2f}s; p99 alone {p99(before):.1f} ms; p99 during {p99(during):.1f} ms;"
          f" n={len(during)}")
    if len(sys.argv) > 1:
        return
    phases = (LOGS / "phases.json").read_text().strip()
    print(json.loads(phases) if phases else {})
    for at, ms in every:
        if start - 1 <= at <= end + 1 and ms > 15:
            print(f"  +{at - start:6.2f}s {ms:7.1f} ms")


if __name__ == "__main__":
    main()
