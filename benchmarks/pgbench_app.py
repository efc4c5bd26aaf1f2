"""pgbench as the application beside a contender: an application nobody here wrote.

TPC-B-like, rate-limited (``-R``), ``CLIENTS`` clients on one thread, with its per-transaction
log; its tables are made in the contender's database (``pgbench -i``) and checkpointed before
it starts, so the contender meets them clean. Same interface as the runner's own load process:
started before a contender, stopped after, a summary with ``latency_ms`` and an ``ops_log`` of
(end time, latency) the runner scores over the contender's run.

Why the latency is pgbench's ``time`` column: with ``-R`` it is measured from the transaction's
scheduled start, so a stall charges the transactions queued behind it (no coordinated omission).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.metrics import LatencySummary

PGBENCH = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
CLIENTS = 4
SCALE = 4
"""Branches: one per client, so the clients do not queue on one branch row of their own."""
WARMUP_S = 1.0
TAIL_S = 3.0
"""pgbench buffers its log (4 kB, about 100 transactions) and dies on SIGTERM without writing
it: it runs this long past the contender, so what is lost is past the window the runner scores
(measured: at 50 transactions/s the last 2.2 s were lost)."""


class PgbenchProcess:
    def __init__(self, dsn: str, rate: float, max_s: float, workdir: Path, tag: str) -> None:
        self.dir = workdir / f"pgbench-{tag}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rate = rate
        subprocess.run([PGBENCH, "-i", "-q", "-s", str(SCALE), "-I", "dtgvp", dsn], check=True,
                       capture_output=True, text=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [PGBENCH, "-n", "-R", str(rate), "-c", str(CLIENTS), "-j", "1", "-T", str(int(max_s)),
             "--log", "--log-prefix", str(self.dir / "log"), dsn],
            cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(WARMUP_S)
        if self.proc.poll() is not None:
            said = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"pgbench did not start: {said}")

    def stop(self) -> dict[str, Any]:
        time.sleep(TAIL_S)
        elapsed = time.monotonic() - self.started
        self.proc.send_signal(signal.SIGTERM)  # SIGINT is ignored by a job started in the background
        self.proc.wait(timeout=30)
        log = read_logs(self.dir)
        return {"app": "pgbench", "rate": self.rate, "connections": CLIENTS, "ops": len(log), "errors": 0,
                "elapsed_s": elapsed, "latency_ms": asdict(LatencySummary.of([ms for _, ms in log])),
                "ops_log": log}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def read_logs(directory: Path) -> list[list[float]]:
    """(end time, latency ms) of every transaction in pgbench's logs: ``client_id transaction_no
    time script_no time_epoch time_us [schedule_lag]``, ``time`` in microseconds."""
    entries: list[list[float]] = []
    for path in sorted(directory.glob("log*")):
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) < 6 or not fields[2].isdigit():
                continue  # a line the kill cut, or a skipped transaction
            entries.append([int(fields[4]) + int(fields[5]) / 1e6, int(fields[2]) / 1000])
    return entries
