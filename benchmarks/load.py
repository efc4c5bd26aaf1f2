"""The application beside the GC: ``python -m benchmarks.load --dsn DSN --rate R --out F``.

A steady, open-loop load of the kind a messaging service puts on ``messages``: insert a new
message, read one by ``message_id``, mark one of its own recent messages delivered, update the
status of an older live message. Each operation is its own transaction, spread over a small
pool of connections (one thread each), like an application server's pool.

Why open loop: operations are scheduled at fixed instants (``rate`` per second in all) and
latency is measured from the scheduled instant, so a stall also charges the operations that
queued behind it on that connection (no coordinated omission). Why a pool and not one
connection: with one connection a read would queue behind a commit stuck in a WAL flush, which
no real application with a pool sees. Service time (from the actual start) is reported too.

Why these operations and not others: none of them creates or removes garbage (inserts are
unprocessed, updates keep ``processed_at IS NULL`` in their WHERE), so the exact expected
count of every contender stays checkable while the load runs. Bounded in count and time;
stops at SIGTERM/SIGINT after the operation in flight and writes its JSON summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.dataset import LEAVES, ident
from benchmarks.metrics import LatencySummary

STATEMENT_TIMEOUT = "10s"
SAMPLE_PAGES = 600
OWN_RECENT = 1000
WARMUP_OPS = 40
"""Unmeasured operations before ``ready``: statements prepared, pages and catalog caches warm, so
the first measured operations are not the connection's cold start."""

# {t}: the shape's table, ``messages`` unless a real-table shape names another (``--table``)
INSERT = (
    "INSERT INTO {t} (message_id, chat_id, direction, status, payload)"
    " VALUES (%(mid)s, %(chat)s, 1, 0, %(payload)s) RETURNING id"
)
READ = "SELECT id, status, payload FROM {t} WHERE message_id = %(mid)s"
DELIVERED = "UPDATE {t} SET status = 2 WHERE id = %(id)s AND processed_at IS NULL"
STATUS = "UPDATE {t} SET status = (status + 1) %% 3 WHERE id = %(id)s AND processed_at IS NULL"
KINDS = ("insert", "read", "update_own", "update_live")
PAYLOAD = '{"type":"text","text":{"body":"Hello from the load generator, this is a reply."},"n":'


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rate", type=float, default=200.0, help="operations per second")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--connections", type=int, default=4,
                        help="the application's pool: one thread and connection each")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--table", default="messages", help="the table the application works on")
    return parser.parse_args(argv)


def _live_sample(conn: psycopg.Connection[Any], table: str) -> list[tuple[Any, str]]:
    """Live (unprocessed) seeded messages to read and update, from a block sample."""
    pages = conn.execute(  # a partitioned table's pages are its leaves'
        f"SELECT sum(relpages)::bigint FROM pg_class WHERE oid IN ({LEAVES})",
        {"oid": conn.execute("SELECT to_regclass(%s)::oid", (ident(table).as_string(conn),)).fetchone()[0]},
    ).fetchone()
    percent = min(100.0, 100.0 * SAMPLE_PAGES / max(1, pages[0] if pages else 1))
    rows = conn.execute(
        sql.SQL("SELECT id, message_id FROM {} TABLESAMPLE SYSTEM (%s) REPEATABLE (11)"
                " WHERE processed_at IS NULL LIMIT 5000").format(ident(table)),
        (percent,),
    ).fetchall()
    if not rows:
        raise SystemExit("load: no live messages to update in the sample")
    return [(row[0], row[1]) for row in rows]


class Load:
    """The operation mix and its bookkeeping (latencies per kind, own recent ids)."""

    def __init__(self, conn: psycopg.Connection[Any], live: list[tuple[Any, str]], seed: int,
                 table: str = "messages") -> None:
        self.conn = conn
        self.live = live
        self.random = random.Random(seed)
        self.own: collections.deque[Any] = collections.deque(maxlen=OWN_RECENT)
        self.sql = {name: sql.SQL(template).format(t=ident(table))  # type: ignore[arg-type]
                    for name, template in (("insert", INSERT), ("read", READ), ("delivered", DELIVERED),
                                           ("status", STATUS))}
        self.tag = f"bench.{os.getpid()}.{time.time_ns()}.{seed}"
        self.count = 0

    def operate(self, kind: str) -> None:
        """One operation in its own transaction (the connection autocommits)."""
        self.count += 1
        if kind == "insert":
            params = {"mid": f"{self.tag}.{self.count}", "chat": f"1555{self.count % 9973}",
                      "payload": f"{PAYLOAD}{self.count}}}"}
            row = self.conn.execute(self.sql["insert"], params).fetchone()
            if row:
                self.own.append(row[0])
        elif kind == "read":
            self.conn.execute(self.sql["read"], {"mid": self.random.choice(self.live)[1]}).fetchall()
        elif kind == "update_own" and self.own:
            self.conn.execute(self.sql["delivered"], {"id": self.random.choice(self.own)})
        else:
            self.conn.execute(self.sql["status"], {"id": self.random.choice(self.live)[0]})


@dataclass
class Tally:
    """One worker's measurements; merged once the load stops."""

    corrected: list[float] = field(default_factory=list)
    service: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    ended_unix: list[float] = field(default_factory=list)
    """When each operation ended (wall clock): the runner scores the load over the GC's window."""
    errors: int = 0


def _worker(load: Load, slot: int, workers: int, rate: float, started: float, limit: int,
            stop: threading.Event, tally: Tally) -> None:
    """One connection of the pool, open loop: its i-th operation is due at
    ``started + (i * workers + slot) / rate``, so the pool as a whole runs at ``rate``."""
    for i in range(limit):
        due = started + (i * workers + slot) / rate
        if stop.wait(max(0.0, due - time.monotonic())):
            return
        kind = KINDS[(i + slot) % len(KINDS)]
        began = time.monotonic()
        try:
            load.operate(kind)
        except psycopg.Error as exc:
            tally.errors += 1
            print(f"load: {kind} failed: {str(exc).strip()}", file=sys.stderr)
        ended = time.monotonic()
        tally.corrected.append((ended - due) * 1000)
        tally.ended_unix.append(time.time())
        tally.service.append((ended - began) * 1000)
        tally.by_kind[kind].append((ended - began) * 1000)


def _summary(tallies: list[Tally], rate: float, elapsed: float) -> dict[str, Any]:
    corrected = [v for t in tallies for v in t.corrected]
    by_kind = {kind: [v for t in tallies for v in t.by_kind[kind]] for kind in KINDS}
    return {
        "rate": rate,
        "connections": len(tallies),
        "ops": len(corrected),
        "errors": sum(t.errors for t in tallies),
        "elapsed_s": elapsed,
        "latency_ms": asdict(LatencySummary.of(corrected)),
        "service_ms": asdict(LatencySummary.of([v for t in tallies for v in t.service])),
        "by_kind_service_ms": {k: asdict(LatencySummary.of(v)) for k, v in by_kind.items()},
        "ops_log": [[round(at, 3), round(ms, 2)] for t in tallies
                    for at, ms in zip(t.ended_unix, t.corrected, strict=True)],
    }


def _open(dsn: str, seed: int, live: list[tuple[Any, str]] | None, table: str) -> Load:
    """A warmed-up connection of the pool (statements prepared, caches filled)."""
    conn = psycopg.connect(dsn, autocommit=True, application_name="bench-load")
    conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
    load = Load(conn, live if live is not None else _live_sample(conn, table), seed, table)
    for i in range(WARMUP_OPS):
        load.operate(KINDS[i % len(KINDS)])
    return load


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    first = _open(args.dsn, args.seed, None, args.table)
    loads = [first] + [_open(args.dsn, args.seed + n, first.live, args.table)
                       for n in range(1, args.connections)]
    tallies = [Tally() for _ in loads]
    limit = int(args.rate * args.max_seconds / len(loads))
    started = time.monotonic() + 0.01
    threads = [
        threading.Thread(target=_worker, daemon=True,
                         args=(load, slot, len(loads), args.rate, started, limit, stop, tally))
        for slot, (load, tally) in enumerate(zip(loads, tallies, strict=True))
    ]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.2)
    summary = _summary(tallies, args.rate, time.monotonic() - started)
    for load in loads:
        load.conn.close()
    partial = args.out.with_suffix(".partial")
    partial.write_text(json.dumps(summary))
    partial.replace(args.out)  # atomic: the runner never reads half a summary
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
