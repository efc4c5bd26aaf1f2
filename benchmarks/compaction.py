"""Compaction against the walk and one ``DELETE`` on a mostly-garbage table, side by side:
``python -m benchmarks.compaction [--rows N] [--fractions 0.8,0.99] [--dsn DSN] [--out F.json]``.

Every contender runs on its own copy (``FILE_COPY``) of the same seeded template, in the same run,
after a ``CHECKPOINT`` (the same full-page-image debt for all): one ``DELETE``; one ``DELETE``
then ``VACUUM`` (the space reusable); msggc's walk (``auto`` with its compaction out of reach);
msggc ``--strategy compact``; msggc with no flag (``auto``: a walk or a compaction). Each is
timed as the wall time of its statements or of ``engine.collect`` in this process (no process
start), its WAL is the server's LSN difference (so the server should be this benchmark's alone:
the embedded one by default), and every count is checked: no garbage left, every live row kept.
A compaction's phases are timed by the run itself (its record's ``seconds``), and its
``--dry-run`` on the same copy (before the checkpoint) is reported beside. ``--live-index``
runs every contender on a copy of the template with a btree on ``processed_at``, an index that
finds the live rows (``IS NULL``). No application writes beside it; the capture trigger's cost per
application write is measured apart (one-row updates, each its own transaction, without then
with the trigger).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.dataset import build
from benchmarks.server import BenchmarkError, Server

CONTENDERS = ("single", "single_vacuum", "walk", "compact", "default")
MSGGC = ("walk", "compact", "default")
GARBAGE = "processed_at IS NOT NULL"


def _single(dsn: str, vacuum: bool) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        deleted = conn.execute(f"DELETE FROM messages WHERE {GARBAGE}").rowcount
        if vacuum:
            conn.execute("VACUUM messages")
    return deleted


def _msggc(dsn: str, strategy: str, may_compact: bool = True) -> int:
    """``engine.collect`` with that strategy; ``may_compact`` False: auto's walk, whatever the
    table (its compaction threshold out of reach)."""
    from engine import GcOptions, collect
    from engine.compact import choice

    threshold = choice.MIN_ROWS
    choice.MIN_ROWS = threshold if may_compact else 2**62
    try:
        result = collect(dsn, GcOptions(strategy=strategy))  # type: ignore[arg-type]
    finally:
        choice.MIN_ROWS = threshold
    if result.status != "complete":
        raise BenchmarkError(f"msggc {strategy}: {result.status} {result.error}")
    return result.messages_deleted


RUNS: dict[str, Callable[[str], int]] = {
    "single": lambda dsn: _single(dsn, vacuum=False),
    "single_vacuum": lambda dsn: _single(dsn, vacuum=True),
    "walk": lambda dsn: _msggc(dsn, "auto", may_compact=False),
    "compact": lambda dsn: _msggc(dsn, "compact"),
    "default": lambda dsn: _msggc(dsn, "auto"),
}


def measure(server: Server, template: str, contender: str, garbage: int, rows: int) -> dict[str, Any]:
    """One contender on a fresh copy of ``template``: seconds, WAL, sizes, counts checked."""
    name = f"msggc_bench_compact_{contender}"
    server.create_database(name, template)
    dsn = server.database(name)
    try:
        predicted = _predicted(dsn) if contender == "compact" else {}
        server.checkpoint()
        before = server.wal_snapshot()
        began = time.monotonic()
        deleted = RUNS[contender](dsn)
        seconds = time.monotonic() - began
        wal = server.wal_bytes(before, server.wal_snapshot())
        with psycopg.connect(dsn, autocommit=True) as conn:
            left, present, size = conn.execute(
                f"SELECT count(*) FILTER (WHERE {GARBAGE}), count(*),"
                " pg_total_relation_size('messages') FROM messages").fetchone() or (None, None, None)
            record = conn.execute("SELECT cursor -> 'compact' FROM gc_runs WHERE cursor ? 'compact'"
                                  " ORDER BY id DESC LIMIT 1").fetchone() if contender in MSGGC else None
        if deleted != garbage or left != 0 or present != rows - garbage:
            raise BenchmarkError(f"{contender}: deleted {deleted} of {garbage}, {left} left,"
                                 f" {present} present")
        compaction = {"phases_s": record[0]["seconds"]} if record else {}
        return {"contender": contender, "seconds": seconds, "rows_per_s": deleted / seconds,
                "wal_bytes": wal, "table_bytes_after": size, "deleted": deleted, **compaction, **predicted}
    finally:
        server.drop_database(name)


def _predicted(dsn: str) -> dict[str, Any]:
    """The compaction's ``--dry-run`` on the same copy, before the checkpoint that precedes the run."""
    from engine import GcOptions, collect

    result = collect(dsn, GcOptions(strategy="compact", dry_run=True))
    figures = result.compaction or {}
    return {"predicted_s": result.predicted_seconds, "predicted_wal_bytes": result.predicted_wal_bytes,
            "predicted_phases_s": {"find": figures.get("predicted_find_seconds"),
                                   "write": figures.get("predicted_write_seconds"),
                                   "verify": figures.get("predicted_verify_seconds")}}


def with_live_index(server: Server, template: str) -> str:
    """A copy of ``template`` with a btree on ``processed_at`` (it answers ``IS NULL``: the live
    rows), analyzed; built again on every call (a minute at 10M rows, before any contender)."""
    name = f"{template}_live_index"
    server.create_database(name, template)
    with psycopg.connect(server.database(name), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("CREATE INDEX messages_processed_at ON messages (processed_at)")
        conn.execute("VACUUM (ANALYZE) messages")
    server.checkpoint()
    return name


def trigger_cost(server: Server, template: str, writes: int = 20_000) -> dict[str, float]:
    """What the capture trigger adds to an application's write: ``writes`` one-row updates (one
    transaction each, as an application commits them) timed without it, then with it."""
    from engine.compact import capture
    from engine.compact.state import Compaction

    name = "msggc_bench_compact_trigger"
    server.create_database(name, template)
    try:
        with psycopg.connect(server.database(name), autocommit=True) as conn:
            top = (conn.execute("SELECT max(id) FROM messages").fetchone() or (1,))[0]
            ids = [(1 + (i * 7919) % top,) for i in range(writes)]

            def timed() -> float:
                began = time.monotonic()
                for key in ids:
                    conn.execute("UPDATE messages SET status = status WHERE id = %s", key)
                return (time.monotonic() - began) / writes * 1e6

            timed()  # the pages in cache for both passes alike
            alone = timed()
            with conn.transaction():
                capture.create(conn, Compaction(0, "public", "messages", ["id"], GARBAGE, None))
            captured = timed()
        return {"writes": writes, "us_per_write_alone": alone, "us_per_write_captured": captured,
                "ratio": captured / alone}
    finally:
        server.drop_database(name)


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each contender against one ``DELETE``: speed (its time / theirs) and WAL (theirs / its)."""
    single = next(r for r in results if r["contender"] == "single")
    return [{**r, "speed_vs_single": single["seconds"] / r["seconds"],
             "wal_vs_single": r["wal_bytes"] / single["wal_bytes"]} for r in results]


def markdown(shape: dict[str, Any]) -> str:
    index = ", an index finding the live rows" if shape.get("live_index") else ""
    lines = [f"**{shape['rows']:,} rows, {shape['shape']}, {shape['fraction']:.0%} garbage{index}**"
             f" ({shape['server']})", "",
             "| contender | seconds | rows/s | WAL MB | table after MB | speed vs DELETE | WAL vs DELETE |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in shape["results"]:
        lines.append(f"| {r['contender']} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f}"
                     f" | {r['wal_bytes'] / 2**20:,.0f} | {r['table_bytes_after'] / 2**20:,.0f}"
                     f" | {r['speed_vs_single']:.2f}x"
                     f" | {r['wal_vs_single']:.2f}x |")
    for r in shape["results"]:
        if "phases_s" in r:
            phases = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in r["phases_s"].items())
            lines.append(f"\n{r['contender']}: phases (s): {phases}")
        if r.get("predicted_s"):
            lines.append(f"\n{r['contender']}: its --dry-run predicted {r['predicted_s']:.2f} s"
                         f" ({r['predicted_s'] / r['seconds']:.2f}x the measured)")
    cost = shape.get("trigger")
    if cost is None:
        return "\n".join(lines)
    lines.append(f"\nThe capture trigger on {cost['writes']:,} one-row updates (a transaction each):"
                 f" {cost['us_per_write_alone']:.0f} µs a write alone,"
                 f" {cost['us_per_write_captured']:.0f} µs captured ({cost['ratio']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compaction")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--fractions", default="0.8,0.99", help="garbage fractions, comma-separated")
    parser.add_argument("--shapes", default="dense",
                        help="comma-separated: dense (garbage spread evenly), aged (the oldest rows garbage,"
                             " the live ones at the table's end)")
    parser.add_argument("--dsn", default=None, help="a local server (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated; single always runs")
    parser.add_argument("--live-index", action="store_true", help="a btree on processed_at on every copy")
    parser.add_argument("--no-trigger-cost", action="store_true", help="skip the capture trigger's cost")
    args = parser.parse_args(argv)
    contenders = ["single", *(c for c in args.contenders.split(",") if c in CONTENDERS and c != "single")]
    server = Server.open(args.dsn)
    shapes = []
    for garbage_shape, fraction in ((g, float(f)) for g in args.shapes.split(",")
                                    for f in args.fractions.split(",")):
        template = build(server, garbage_shape, args.rows, reuse=True, fraction=fraction)
        copied = with_live_index(server, template.name) if args.live_index else template.name
        results = [measure(server, copied, contender, template.expected_garbage, args.rows)
                   for contender in contenders]
        version = server.settings()["version"].split(" on ")[0]
        shape = {"rows": args.rows, "shape": garbage_shape, "fraction": fraction, "server": version,
                 "live_index": args.live_index,
                 "results": ratios(results)}
        if not args.no_trigger_cost:
            shape["trigger"] = trigger_cost(server, copied)
        if args.live_index:
            server.drop_database(copied)
        print(markdown(shape) + "\n", file=sys.stderr)
        shapes.append(shape)
    if args.out:
        args.out.write_text(json.dumps(shapes, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
