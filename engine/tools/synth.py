"""Synthetic messages, generated server-side with ``INSERT ... SELECT ... generate_series``.

Why server-side: benchmarks need 10M-row tables in about a minute; rows shipped from Python would
take many times longer. Why drop and rebuild the indexes: one sorted build per index is several
times cheaper than maintaining every index row by row. The drop, the insert and the rebuild run in
one transaction, so a failure at any point rolls back to the table exactly as it was.

Seeding a non-empty table appends: ids continue after the largest id the table or its identity
sequence has ever reached, and created_at continues after the newest row, so ids and creation
times keep growing together. The table is locked (ACCESS EXCLUSIVE) while the seed runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, get_args

import psycopg
from psycopg import sql

from engine.errors import DatabaseUnreachable, SchemaMissing, TargetTableError, UsageError

Shape = Literal["dense", "sparse", "aged"]
SHAPES: tuple[str, ...] = get_args(Shape)
DEFAULT_GARBAGE_FRACTION: dict[str, float] = {"dense": 0.8, "sparse": 0.01, "aged": 0.8}

ProgressCallback = Callable[[str, float], None]

TIME_SPAN = timedelta(days=30)
"""A fresh table's created_at spans the 30 days before the seed, so retention filters bite."""

PAYLOAD_FILLER = (
    '{"type":"text","text":{"body":"Your order has shipped and will arrive tomorrow between '
    '9 and 12. Reply STOP to opt out."},"n":'
)
"""Constant text plus the row id: about 130 bytes like a real payload, and cheap to generate."""

REQUIRED_COLUMNS = frozenset(
    {"id", "message_id", "chat_id", "direction", "status", "payload", "created_at", "processed_at"}
)
MIN_CHUNK_ROWS = 100_000
PROGRESS_STEPS = 20
MAINTENANCE_WORK_MEM_KB = 1024 * 1024
LOCK_TIMEOUT = "30s"


@dataclass(frozen=True)
class SeedReport:
    """What was seeded and where the time went (the CLI and the benchmarks print it)."""

    rows: int
    garbage_rows: int
    shape: str
    insert_seconds: float
    index_seconds: dict[str, float] = field(default_factory=dict)
    vacuum_analyze_seconds: float = 0.0

    def total_seconds(self) -> float:
        """Insert, every index build and the final VACUUM ANALYZE."""
        return self.insert_seconds + sum(self.index_seconds.values()) + self.vacuum_analyze_seconds


@dataclass(frozen=True)
class _Target:
    """The table to seed, resolved once: its oid for catalog queries, its identifier for DDL."""

    oid: int
    ident: sql.Composable
    name: str


@dataclass(frozen=True)
class _SavedIndex:
    """Everything needed to recreate one index (or the constraint it backs) identically."""

    schema: str
    name: str
    index_def: str
    constraint: str | None
    constraint_def: str | None
    replica_identity: bool
    clustered: bool


@dataclass(frozen=True)
class _Layout:
    """Where the new rows go: ids after ``base_id``, created_at after ``t0`` every ``step_us``."""

    base_id: int
    t0: datetime
    step_us: int
    now: datetime


def seed(
    dsn: str,
    rows: int,
    shape: Shape,
    garbage_fraction: float | None = None,
    *,
    table: str = "messages",
    on_progress: ProgressCallback | None = None,
) -> SeedReport:
    """Fill ``table`` with ``rows`` synthetic messages of the given garbage shape.

    dense/sparse spread exactly ``round(rows * fraction)`` garbage rows evenly through the table;
    aged makes the oldest (lowest ids) that many rows garbage. ``table`` may be schema-qualified.
    """
    fraction = _validate(rows, shape, garbage_fraction)
    garbage = math.floor(rows * fraction + 0.5)
    notify = on_progress or _ignore_progress
    with _connect(dsn) as conn:
        _tune_session(conn)
        try:
            target, insert_seconds, index_seconds = _load(conn, table, rows, garbage, shape, notify)
        except psycopg.errors.LockNotAvailable as exc:
            raise TargetTableError(f"table {table} is busy (no lock within {LOCK_TIMEOUT})") from exc
        except psycopg.errors.IntegrityError as exc:
            raise TargetTableError(
                f"seed rolled back, table {table} unchanged: {exc.diag.message_primary}"
            ) from exc
        vacuum_seconds = _vacuum_analyze(conn, target, notify)
    return SeedReport(
        rows=rows,
        garbage_rows=garbage,
        shape=shape,
        insert_seconds=insert_seconds,
        index_seconds=index_seconds,
        vacuum_analyze_seconds=vacuum_seconds,
    )


def _load(
    conn: psycopg.Connection,
    table: str,
    rows: int,
    garbage: int,
    shape: str,
    notify: ProgressCallback,
) -> tuple[_Target, float, dict[str, float]]:
    """Drop indexes, insert, rebuild indexes and advance the identity: all or nothing."""
    with conn.transaction():
        target = _resolve_table(conn, table)
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(target.ident))
        layout = _layout(conn, target, rows)
        saved = _drop_indexes(conn, target)
        insert_seconds = _insert(conn, target, layout, rows, garbage, shape, notify)
        index_seconds = _recreate_indexes(conn, target, saved, notify)
        _advance_identity(conn, target, layout.base_id + rows)
    return target, insert_seconds, index_seconds


def _ignore_progress(phase: str, fraction: float) -> None:
    """Default progress sink."""


def _validate(rows: int, shape: str, garbage_fraction: float | None) -> float:
    """Reject impossible requests before touching the database; return the fraction to use."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise UsageError(f"rows must be an integer >= 1, got {rows!r}")
    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    fraction = DEFAULT_GARBAGE_FRACTION[shape] if garbage_fraction is None else garbage_fraction
    if not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise UsageError(f"garbage fraction must be between 0 and 1, got {fraction!r}")
    return float(fraction)


def _connect(dsn: str) -> psycopg.Connection:
    """Autocommit connection: the seed opens its own transaction, VACUUM must run outside one."""
    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise DatabaseUnreachable(f"cannot connect to the database: {reason}") from exc


def _tune_session(conn: psycopg.Connection) -> None:
    """Bulk-load settings for this session only; memory is raised, never lowered."""
    conn.execute("SELECT set_config('synchronous_commit', 'off', false)")
    conn.execute("SELECT set_config('statement_timeout', '0', false)")
    row = conn.execute(
        "SELECT setting::bigint FROM pg_settings WHERE name = 'maintenance_work_mem'"
    ).fetchone()
    if row is not None and row[0] < MAINTENANCE_WORK_MEM_KB:
        conn.execute(
            "SELECT set_config('maintenance_work_mem', %s, false)", (f"{MAINTENANCE_WORK_MEM_KB}kB",)
        )


def _resolve_table(conn: psycopg.Connection, table: str) -> _Target:
    """Find the table and check it has the columns the seed writes."""
    ident = sql.Identifier(*table.split(".", 1))
    row = conn.execute(
        "SELECT c.oid, c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)",
        (ident.as_string(conn),),
    ).fetchone()
    if row is None:
        if table == "messages":
            raise SchemaMissing("table messages does not exist: run `msggc migrate` first")
        raise TargetTableError(f"table {table} does not exist")
    oid, relkind = row
    if relkind != "r":
        raise TargetTableError(f"{table} is not a plain table (relkind {relkind!r})")
    columns = {
        name
        for (name,) in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (oid,),
        )
    }
    missing = sorted(REQUIRED_COLUMNS - columns)
    if missing:
        raise TargetTableError(f"table {table} lacks the columns {', '.join(missing)}")
    return _Target(oid=oid, ident=ident, name=table)


def _identity_sequence(conn: psycopg.Connection, target: _Target) -> str | None:
    """The sequence feeding ``id`` (identity or serial), or None for a plain column."""
    row = conn.execute("SELECT pg_get_serial_sequence(%s::regclass::text, 'id')", (target.oid,)).fetchone()
    return row[0] if row else None


def _layout(conn: psycopg.Connection, target: _Target, rows: int) -> _Layout:
    """Place the new rows after everything the table (and its sequence) already holds."""
    row = conn.execute(
        sql.SQL("SELECT id, created_at FROM {} ORDER BY id DESC LIMIT 1").format(target.ident)
    ).fetchone()
    max_id, last_created = row if row else (0, None)
    sequence = _identity_sequence(conn, target)
    if sequence is not None:
        seq_row = conn.execute("SELECT pg_sequence_last_value(%s::regclass)", (sequence,)).fetchone()
        max_id = max(max_id, seq_row[0] or 0) if seq_row else max_id
    now_row = conn.execute("SELECT now()").fetchone()
    assert now_row is not None
    now: datetime = now_row[0]
    t0 = now - TIME_SPAN
    if last_created is not None and last_created > t0:
        t0 = last_created
    # rows + 1 steps: the newest row stays strictly before now, so its processed_at can follow it.
    step_us = max(1, int((now - t0) / timedelta(microseconds=1)) // (rows + 1))
    return _Layout(base_id=max_id, t0=t0, step_us=step_us, now=now)


def _saved_indexes(conn: psycopg.Connection, target: _Target) -> list[_SavedIndex]:
    """Every index of the table with its definition, primary key first.

    Indexes that a foreign key depends on are left out: dropping them would need CASCADE.
    """
    cur = conn.execute(
        """
        SELECT n.nspname, ci.relname, pg_get_indexdef(i.indexrelid),
               con.conname, pg_get_constraintdef(con.oid), i.indisreplident, i.indisclustered
        FROM pg_index i
        JOIN pg_class ci ON ci.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = ci.relnamespace
        LEFT JOIN pg_constraint con
               ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
              AND con.contype IN ('p', 'u', 'x')
        WHERE i.indrelid = %s
          AND NOT EXISTS (SELECT 1 FROM pg_constraint fk
                          WHERE fk.contype = 'f' AND fk.conindid = i.indexrelid)
        ORDER BY i.indisprimary DESC, ci.relname
        """,
        (target.oid,),
    )
    return [_SavedIndex(*row) for row in cur]


def _drop_indexes(conn: psycopg.Connection, target: _Target) -> list[_SavedIndex]:
    """Drop the table's indexes and the constraints they back; return what to rebuild."""
    saved = _saved_indexes(conn, target)
    for index in saved:
        if index.constraint is not None:
            stmt = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                target.ident, sql.Identifier(index.constraint)
            )
        else:
            stmt = sql.SQL("DROP INDEX {}").format(sql.Identifier(index.schema, index.name))
        conn.execute(stmt)
    return saved


def _recreate_indexes(
    conn: psycopg.Connection,
    target: _Target,
    saved: list[_SavedIndex],
    notify: ProgressCallback,
) -> dict[str, float]:
    """Rebuild each index from the server's own definition text; return seconds per index.

    The definitions come from pg_get_indexdef/pg_get_constraintdef: SQL written and quoted by
    the server itself, replayed verbatim, never assembled from our strings.
    """
    seconds: dict[str, float] = {}
    for index in saved:
        phase = f"index {index.name}"
        notify(phase, 0.0)
        started = time.perf_counter()
        conn.execute(_create_statement(target, index))
        seconds[index.name] = time.perf_counter() - started
        _restore_index_flags(conn, target, index)
        notify(phase, 1.0)
    return seconds


def _create_statement(target: _Target, index: _SavedIndex) -> sql.SQL | sql.Composed:
    """ADD CONSTRAINT for constraint-backed indexes (keeps the constraint), else CREATE INDEX."""
    if index.constraint is not None and index.constraint_def is not None:
        return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            target.ident, sql.Identifier(index.constraint), sql.SQL(index.constraint_def)
        )
    return sql.SQL(index.index_def)


def _restore_index_flags(conn: psycopg.Connection, target: _Target, index: _SavedIndex) -> None:
    """Re-attach REPLICA IDENTITY USING INDEX and CLUSTER ON, which the drop forgot."""
    name = sql.Identifier(index.name)
    if index.replica_identity:
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(target.ident, name))
    if index.clustered:
        conn.execute(sql.SQL("ALTER TABLE {} CLUSTER ON {}").format(target.ident, name))


def _chunks(rows: int) -> Iterator[tuple[int, int]]:
    """Inclusive 0-based row ranges: about PROGRESS_STEPS statements, none tiny."""
    size = max(MIN_CHUNK_ROWS, math.ceil(rows / PROGRESS_STEPS))
    for low in range(0, rows, size):
        yield low, min(rows, low + size) - 1


_EVEN_SPREAD = sql.SQL(
    "(g.k + 1) * %(garbage)s::bigint / %(rows)s::bigint > g.k * %(garbage)s::bigint / %(rows)s::bigint"
)

_GARBAGE_PREDICATE: dict[str, sql.SQL] = {
    # Bresenham: row k is garbage when floor((k+1)G/N) steps past floor(kG/N); exactly G rows,
    # evenly spaced, so every heap page holds the same share of garbage.
    "dense": _EVEN_SPREAD,
    "sparse": _EVEN_SPREAD,
    # The oldest G rows (lowest ids, oldest created_at).
    "aged": sql.SQL("g.k < %(garbage)s::bigint"),
}

_INSERT = sql.SQL(
    """
    INSERT INTO {table}
        (id, message_id, chat_id, direction, status, payload, created_at, processed_at)
    OVERRIDING SYSTEM VALUE
    SELECT s.id,
           'wamid.' || s.id,
           (15550000000 + mod(s.id, 9973))::text,
           mod(s.id, 2)::smallint,
           CASE WHEN s.garbage THEN 3 ELSE mod(s.id, 3) END::smallint,
           %(filler)s::text || s.id || %(suffix)s::text,
           s.created_at,
           CASE WHEN s.garbage
                THEN least(s.created_at + (1 + mod(s.id, 600)) * interval '1 second', %(now)s::timestamptz)
           END
    FROM (SELECT %(base)s::bigint + g.k + 1 AS id,
                 %(t0)s::timestamptz
                     + ((g.k + 1) * %(step)s::bigint) * interval '1 microsecond' AS created_at,
                 {garbage} AS garbage
          -- In the select list, not FROM: streamed row by row instead of spooled to temp files.
          FROM (SELECT generate_series(%(low)s::bigint, %(high)s::bigint) AS k) AS g) AS s
    """
)


def _insert(
    conn: psycopg.Connection,
    target: _Target,
    layout: _Layout,
    rows: int,
    garbage: int,
    shape: str,
    notify: ProgressCallback,
) -> float:
    """Insert all rows chunk by chunk (one INSERT ... SELECT generate_series each)."""
    stmt = _INSERT.format(table=target.ident, garbage=_GARBAGE_PREDICATE[shape])
    params: dict[str, object] = {
        "filler": PAYLOAD_FILLER,
        "suffix": "}",
        "now": layout.now,
        "base": layout.base_id,
        "t0": layout.t0,
        "step": layout.step_us,
        "rows": rows,
        "garbage": garbage,
    }
    notify("insert", 0.0)
    started = time.perf_counter()
    for low, high in _chunks(rows):
        conn.execute(stmt, {**params, "low": low, "high": high})
        notify("insert", (high + 1) / rows)
    return time.perf_counter() - started


def _advance_identity(conn: psycopg.Connection, target: _Target, last_id: int) -> None:
    """Make the application's next insert take the id after the seeded ones."""
    sequence = _identity_sequence(conn, target)
    if sequence is not None:
        conn.execute("SELECT setval(%s::regclass, %s)", (sequence, last_id))


def _vacuum_analyze(conn: psycopg.Connection, target: _Target, notify: ProgressCallback) -> float:
    """Set the visibility map and fresh statistics, so plans and index-only scans are realistic."""
    notify("vacuum analyze", 0.0)
    started = time.perf_counter()
    conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(target.ident))
    notify("vacuum analyze", 1.0)
    return time.perf_counter() - started
