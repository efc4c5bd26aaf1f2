"""Seeded template databases: one per (shape, rows), copied fresh for every contender.

Why a template: seeding costs far more than a file copy, and a byte-for-byte copy gives every
contender the same heap layout, hint bits, visibility map and planner statistics.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from benchmarks.server import BenchmarkError, Server

TEMPLATE_VERSION = 1
"""Bump when the way templates are built changes: a reused template must match the code."""


@dataclass(frozen=True)
class Template:
    """A seeded database and what the contenders must find in it."""

    name: str
    shape: str
    rows: int
    fraction: float | None
    expected_garbage: int
    seed: dict[str, Any]
    reused: bool


def template_name(shape: str, rows: int, fraction: float | None = None) -> str:
    """One name per dataset; a non-default garbage fraction is part of it (in 1/10000)."""
    suffix = "" if fraction is None else f"_f{round(fraction * 10000)}"
    return f"msggc_bench_tpl_{shape}_{rows}{suffix}"


def _progress(label: str) -> Any:
    """A stderr progress line for ``synth.seed`` that prints each phase at most every 10%."""
    last: dict[str, int] = {}

    def report(phase: str, fraction: float) -> None:
        step = int(fraction * 10)
        if last.get(phase) != step:
            last[phase] = step
            print(f"  seed {label}: {phase} {fraction:.0%}", file=sys.stderr)

    return report


def _reusable(server: Server, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded seed report of an existing template built by this code, else None."""
    if not server.database_exists(name):
        return None
    try:
        meta = json.loads(server.comment(name) or "")
    except json.JSONDecodeError:
        return None
    if any(meta.get(field) != value for field, value in key.items()):
        return None
    return meta


def _count_garbage(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM messages WHERE processed_at IS NOT NULL").fetchone()[0]


def _freeze_conditions(dsn: str) -> None:
    """No autovacuum on the copies: it would start mid-run for batched contenders only.

    A batched GC commits as it goes, so autovacuum may wake up in the middle of its run and
    compete with it, while ``single`` commits at its very end. Turning it off per table makes the
    conditions equal; VACUUM after GC is the same cost whoever deleted the rows.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE messages SET (autovacuum_enabled = off,"
                     " toast.autovacuum_enabled = off)")


def build(server: Server, shape: str, rows: int, reuse: bool, fraction: float | None = None) -> Template:
    """Seed the template for (shape, rows, fraction), or reuse one an earlier run built identically.

    ``fraction`` None is the shape's default garbage fraction (``engine.tools.synth``).
    """
    from engine import migrate
    from engine.tools import synth

    name = template_name(shape, rows, fraction)
    key = {"version": TEMPLATE_VERSION, "rows": rows, "shape": shape, "fraction": fraction}
    if reuse and (meta := _reusable(server, name, key)) is not None:
        print(f"template {name}: reused", file=sys.stderr)
        return Template(name, shape, rows, fraction, meta["expected_garbage"], meta["seed"], reused=True)
    print(f"template {name}: seeding {rows:,} rows ({shape})", file=sys.stderr)
    server.create_database(name)
    dsn = server.database(name)
    began = time.monotonic()
    migrate.upgrade(dsn)
    migrated = time.monotonic()
    report = synth.seed(dsn, rows, shape, fraction, on_progress=_progress(shape))  # type: ignore[arg-type]
    seeded = time.monotonic()
    expected = _count_garbage(dsn)
    if expected != report.garbage_rows:
        raise BenchmarkError(f"seed of {name} reported {report.garbage_rows} garbage rows, found {expected}")
    _freeze_conditions(dsn)
    seed = {
        **asdict(report),
        "migrate_s": migrated - began,
        "seed_wall_s": seeded - migrated,
        **_sizes(dsn),
    }
    server.set_comment(name, json.dumps({**key, "expected_garbage": expected, "seed": seed}))
    server.checkpoint()
    print(f"template {name}: {expected:,} garbage rows, seed {seed['seed_wall_s']:.1f}s", file=sys.stderr)
    return Template(name, shape, rows, fraction, expected, seed, reused=False)


def _sizes(dsn: str) -> dict[str, Any]:
    """Heap and index sizes of messages: what a contender has to walk."""
    with psycopg.connect(dsn) as conn:
        heap, total = conn.execute(
            "SELECT pg_relation_size('messages'), pg_total_relation_size('messages')"
        ).fetchone()
    return {"heap_bytes": heap, "total_bytes": total}


def conditions(dsn: str) -> dict[str, Any]:
    """What a fresh copy looks like before a contender: must be the same for every contender."""
    with psycopg.connect(dsn) as conn:
        pages, visible, tuples = conn.execute(
            "SELECT relpages, relallvisible, reltuples FROM pg_class WHERE oid = 'messages'::regclass"
        ).fetchone()
        stats = conn.execute(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = 'messages'"
        ).fetchone()[0]
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = 'messages'::regclass"
        ).fetchone()[0]
    return {"relpages": pages, "relallvisible": visible, "reltuples": tuples,
            "pg_stats_columns": stats, "reloptions": options}


def remaining_garbage(dsn: str) -> int:
    """Garbage left after a contender: with the rows it deleted, must add up to the expected."""
    return _count_garbage(dsn)
