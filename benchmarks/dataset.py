"""Seeded template databases: one per (shape, rows), copied fresh for every contender.

Why a template: seeding costs far more than a file copy, and a byte-for-byte copy gives every
contender the same heap layout, hint bits, visibility map and planner statistics.

The shapes dense, sparse and aged fill msggc's own ``messages``; the real-table shapes fill an
application's tables in schema ``app`` (:data:`LAYOUTS`): ``uuid-dense`` and ``uuid-sparse`` a
table keyed by random UUIDs (``gen_random_uuid()``, as applications make them), ``cascade`` a
messages-like table with a child table whose rows PostgreSQL deletes with their parent.
The partitioned shapes ``part-mixed`` and ``part-retention`` fill a messages-like table
partitioned by range on ``created_at``, one partition per day (:func:`_seed_partitioned`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql

from benchmarks.server import BenchmarkError, Server

TEMPLATE_VERSION = 1
"""Bump when the way templates are built changes: a reused template must match the code."""
BYTES_PER_ROW = 310
"""Disk per seeded row: ``pg_database_size`` of a 1M-row aged seed, 310 MB (table and indexes
302 B/row, 303 at 10M; the other one-table shapes 276-304 at 10M). For the disk check."""


@dataclass(frozen=True)
class Layout:
    """The table a shape's garbage lives in, and how it is seeded."""

    table: str = "messages"
    """The collected table, as every contender names it (msggc: ``--table``)."""
    seeding: Literal["synth", "uuid", "cascade", "partitioned"] = "synth"
    garbage: Literal["dense", "sparse", "aged", "runs", "mixed", "retention"] = "dense"
    """Where the garbage sits (``engine.tools.synth``): spread evenly, or the oldest rows; on a
    partitioned table (:func:`_seed_partitioned`): whole old days and a share of the newest
    (mixed), or every day past the retention (retention)."""
    fraction: float | None = None
    """The share of garbage rows; None: synth's default for ``garbage``."""
    integer_key: bool = True
    garbage_index: bool = True
    """A partial index ``(id) WHERE processed_at IS NOT NULL``."""
    children: tuple[str, ...] = ()
    """Tables holding one row per row of ``table``, deleted with it (ON DELETE CASCADE)."""
    description: str = ""
    partitions: int = 0
    """Daily range partitions on ``created_at`` (0: a plain table)."""
    retention_days: int | None = None
    """Garbage is also older than this many days (msggc ``--older-than``); None: no retention."""
    bytes_per_row: int = BYTES_PER_ROW
    """Disk per seeded row, child tables included (10M seeds: cascade 429, partitioned 320)."""

    @property
    def predicate(self) -> str:
        """The garbage predicate every contender uses (and the counts check)."""
        return garbage_sql(self.retention_days)


GARBAGE_SQL = "processed_at IS NOT NULL"


def garbage_sql(retention_days: int | None = None) -> str:
    """``processed_at IS NOT NULL``, and older than the retention when there is one."""
    if retention_days is None:
        return GARBAGE_SQL
    return f"{GARBAGE_SQL} AND processed_at < now() - interval '{int(retention_days)} days'"


UUID_TABLE = "app.msgs_uuid"
HIDDEN_TABLE = "app.msgs_hidden"
CASCADE_TABLE = "app.msgs_cascade"
REPLIES = "app.replies"
PART_TABLE = "app.msgs_part"
PART_DAYS = 100
PART_DESCRIPTION = (
    f"`{PART_TABLE}`: messages' columns, `PARTITION BY RANGE (created_at)`, {PART_DAYS} daily partitions"
    " (`msgs_part_d000` oldest .. `msgs_part_d099` newest, holding now()), the rows spread evenly over"
    " them; primary key `(id, created_at)`, index `(message_id)`, partial index `(id) WHERE processed_at"
    " IS NOT NULL`")
LAYOUTS: dict[str, Layout] = {
    "dense": Layout(garbage="dense"),
    "sparse": Layout(garbage="sparse"),
    "aged": Layout(garbage="aged"),
    "backlog": Layout(garbage="aged", fraction=0.99,
                      description="`messages`, 99% garbage: the oldest rows processed, the newest 1% not"
                                  " (a neglected table, the case for `--strategy compact`)"),
    "uuid-dense": Layout(
        table=UUID_TABLE, seeding="uuid", garbage="dense", fraction=0.8, integer_key=False,
        garbage_index=False,
        description=f"`{UUID_TABLE}`: messages' columns, `id uuid` primary key from `gen_random_uuid()`"
                    " (key order unrelated to heap order), unique `message_id`, no partial index"),
    "uuid-sparse": Layout(
        table=UUID_TABLE, seeding="uuid", garbage="sparse", fraction=0.01, integer_key=False,
        description=f"`{UUID_TABLE}`: messages' columns, `id uuid` primary key from `gen_random_uuid()`,"
                    " unique `message_id`, partial index `(id) WHERE processed_at IS NOT NULL`"),
    "hidden": Layout(
        table=HIDDEN_TABLE, seeding="uuid", garbage="runs", fraction=0.8, garbage_index=False,
        description=f"`{HIDDEN_TABLE}`: a table msggc did not create: messages' columns, `id bigint`"
                    " primary key in insertion order, unique `message_id`, no partial index; the"
                    " garbage in runs of 1,000 rows (four runs processed, then one not)"),
    "cascade": Layout(
        table=CASCADE_TABLE, seeding="cascade", garbage="dense", children=(REPLIES,), bytes_per_row=440,
        description=f"`{CASCADE_TABLE}` (like `messages`: bigint identity key, partial garbage index) and"
                    f" `{REPLIES}(id bigint PRIMARY KEY, message_id bigint REFERENCES {CASCADE_TABLE}(id)"
                    " ON DELETE CASCADE, body text)`, one reply per message, indexed on `message_id`"),
    "part-mixed": Layout(
        table=PART_TABLE, seeding="partitioned", garbage="mixed", fraction=0.1, integer_key=False,
        partitions=PART_DAYS, bytes_per_row=330,
        description=PART_DESCRIPTION + "; the oldest 80% of the days wholly processed, the newest 20%"
                                       " with 10% of their rows processed (spread evenly)"),
    "part-retention": Layout(
        table=PART_TABLE, seeding="partitioned", garbage="retention", integer_key=False,
        partitions=PART_DAYS, retention_days=30, bytes_per_row=330,
        description=PART_DESCRIPTION + "; every row processed but the newest day's; garbage ="
                                       " processed more than 30 days ago (`--older-than 30d`): the"
                                       " oldest 70 days"),
}


def layout(shape: str) -> Layout:
    try:
        return LAYOUTS[shape]
    except KeyError:
        raise BenchmarkError(f"unknown shape {shape!r}: choose among {', '.join(LAYOUTS)}") from None


def ident(table: str) -> sql.Identifier:
    """``schema.table`` or ``table`` as an identifier."""
    return sql.Identifier(*table.split(".", 1))


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

    @property
    def layout(self) -> Layout:
        return layout(self.shape)

    @property
    def table(self) -> str:
        return self.layout.table


def template_name(shape: str, rows: int, fraction: float | None = None) -> str:
    """One name per dataset; a non-default garbage fraction is part of it (in 1/10000)."""
    suffix = "" if fraction is None else f"_f{round(fraction * 10000)}"
    return f"msggc_bench_tpl_{shape.replace('-', '_')}_{rows}{suffix}"


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


def _count_garbage(dsn: str, table: str, predicate: str = GARBAGE_SQL) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}")
                            .format(ident(table), sql.SQL(predicate))).fetchone()[0]


LEAVES = ("SELECT c.oid FROM pg_class c WHERE c.oid = %(oid)s AND c.relkind = 'r'"
          " UNION ALL SELECT relid FROM pg_partition_tree(%(oid)s) WHERE isleaf")
"""The table itself, or the leaf partitions of a partitioned one (where the rows and options are)."""


def leaves(conn: psycopg.Connection[Any], table: str) -> list[sql.Identifier]:
    """The table, or each leaf partition of it, as identifiers."""
    oid = conn.execute("SELECT to_regclass(%s)::oid", (ident(table).as_string(conn),)).fetchone()[0]
    rows = conn.execute(f"SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                        f" ON n.oid = c.relnamespace WHERE c.oid IN ({LEAVES})", {"oid": oid}).fetchall()
    return [sql.Identifier(schema, name) for schema, name in rows]


def _freeze_conditions(dsn: str, tables: tuple[str, ...]) -> None:
    """No autovacuum on the copies: it would start mid-run for batched contenders only.

    A batched GC commits as it goes, so autovacuum may wake up in the middle of its run and
    compete with it, while ``single`` commits at its very end. Turning it off per table makes the
    conditions equal; VACUUM after GC is the same cost whoever deleted the rows.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in tables:
            for leaf in leaves(conn, table):  # a partitioned table takes no storage option itself
                conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off,"
                                     " toast.autovacuum_enabled = off)").format(leaf))


def build(server: Server, shape: str, rows: int, reuse: bool, fraction: float | None = None,
          name: str | None = None) -> Template:
    """Seed the template for (shape, rows, fraction), or reuse one an earlier run built identically.

    ``fraction`` None is the shape's default garbage fraction (``engine.tools.synth``); ``name``
    None is the template's name (:func:`template_name`), another seeds a working database.
    """
    from engine import migrate

    shape_layout = layout(shape)
    name = name or template_name(shape, rows, fraction)
    key = {"version": TEMPLATE_VERSION, "rows": rows, "shape": shape, "fraction": fraction}
    if reuse and (meta := _reusable(server, name, key)) is not None and _fresh(shape_layout, meta):
        print(f"template {name}: reused", file=sys.stderr)
        return Template(name, shape, rows, fraction, meta["expected_garbage"], meta["seed"], reused=True)
    what = "template" if name == template_name(shape, rows, fraction) else "database"
    print(f"{what} {name}: seeding {rows:,} rows ({shape})", file=sys.stderr)
    server.create_database(name)
    dsn = server.database(name)
    began = time.monotonic()
    migrate.upgrade(dsn)
    migrated = time.monotonic()
    report = SEEDERS[shape_layout.seeding](dsn, shape_layout, rows, fraction, _progress(shape))
    seeded = time.monotonic()
    expected = _count_garbage(dsn, shape_layout.table, shape_layout.predicate)
    if expected != report.garbage_rows:
        raise BenchmarkError(f"seed of {name} reported {report.garbage_rows} garbage rows, found {expected}")
    _make_archives(dsn, shape_layout)
    _freeze_conditions(dsn, (shape_layout.table, *shape_layout.children))
    seed = {
        **asdict(report),
        "migrate_s": migrated - began,
        "seed_wall_s": seeded - migrated,
        "seeded_unix": time.time(),
        **_sizes(dsn, shape_layout),
    }
    server.set_comment(name, json.dumps({**key, "expected_garbage": expected, "seed": seed}))
    server.checkpoint()
    print(f"{what} {name}: {expected:,} garbage rows, seed {seed['seed_wall_s']:.1f}s", file=sys.stderr)
    return Template(name, shape, rows, fraction, expected, seed, reused=False)


PARTITIONED_TEMPLATE_HOURS = 11
"""A partitioned template's days are placed around the instant it was seeded (its newest day
holds now(), its retention boundary falls between two days): reused for this long only."""


def _fresh(shape_layout: Layout, meta: dict[str, Any]) -> bool:
    """Whether a template's rows still sit where its counts say (always, but on partitioned shapes)."""
    if not shape_layout.partitions:
        return True
    seeded = (meta.get("seed") or {}).get("seeded_unix") or 0.0
    return time.time() - seeded < PARTITIONED_TEMPLATE_HOURS * 3600


def _sizes(dsn: str, shape_layout: Layout) -> dict[str, Any]:
    """Heap and index sizes of the table (and its child tables): what a contender has to walk;
    a partitioned table's are the sums over its leaves."""
    regclass = "SELECT to_regclass(%s)"
    with psycopg.connect(dsn) as conn:
        oid = conn.execute(regclass, (ident(shape_layout.table).as_string(conn),)).fetchone()[0]
        heap, total = conn.execute(f"SELECT sum(pg_relation_size(oid))::bigint,"
                                   f" sum(pg_total_relation_size(oid))::bigint FROM ({LEAVES}) AS l",
                                   {"oid": conn.execute(f"{regclass}::oid", (oid,)).fetchone()[0]}
                                   ).fetchone()
        sizes = {"heap_bytes": heap, "total_bytes": total}
        for child in shape_layout.children:
            child_oid = conn.execute(regclass, (ident(child).as_string(conn),)).fetchone()[0]
            sizes.setdefault("children_total_bytes", 0)
            sizes["children_total_bytes"] += conn.execute("SELECT pg_total_relation_size(%s)",
                                                          (child_oid,)).fetchone()[0]
    return sizes


# --- seeding the real-table shapes -----------------------------------------------------------------

Progress = Any
"""``engine.tools.synth``'s progress callback: (phase, fraction)."""
MAINTENANCE_WORK_MEM = "1GB"
CHUNK_ROWS = 1_000_000

MESSAGE_COLUMNS = """
    message_id text NOT NULL,
    chat_id text NOT NULL,
    direction smallint NOT NULL,
    status smallint NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
"""
"""``messages``' columns after its key, shared by the shapes that bring their own key."""
KEYED_CREATE = "CREATE TABLE {t} (id {key_type}," + MESSAGE_COLUMNS + ")"
KEY_TYPES = {True: "bigint GENERATED BY DEFAULT AS IDENTITY",
             False: "uuid NOT NULL DEFAULT gen_random_uuid()"}
"""By ``Layout.integer_key``: the key the application's own inserts (the load) leave to the table."""
KEYED_INSERT = """
INSERT INTO {t} (id, message_id, chat_id, direction, status, payload, created_at, processed_at)
SELECT {key}, 'wamid.' || s.k, (15550000000 + mod(s.k, 9973))::text, mod(s.k, 2)::smallint,
       CASE WHEN s.garbage THEN 3 ELSE mod(s.k, 3) END::smallint,
       %(filler)s::text || s.k || '}}', s.created_at,
       CASE WHEN s.garbage
            THEN least(s.created_at + (1 + mod(s.k, 600)) * interval '1 second', %(now)s) END
FROM (SELECT g.k, %(t0)s + (g.k * %(step_us)s) * interval '1 microsecond' AS created_at,
             {garbage} AS garbage
      FROM (SELECT generate_series(%(low)s::bigint, %(high)s::bigint) AS k) AS g) AS s
"""
EVEN_SPREAD = ("(g.k + 1) * %(garbage)s::bigint / %(rows)s::bigint"
               " > g.k * %(garbage)s::bigint / %(rows)s::bigint")
GARBAGE = {"dense": EVEN_SPREAD, "sparse": EVEN_SPREAD, "aged": "g.k < %(garbage)s::bigint",
           "runs": "g.k / 1000 %% 5 <> 4 AND g.k < %(garbage)s::bigint * 5 / 4"}
"""As ``engine.tools.synth``: exactly G garbage rows, evenly spaced (dense, sparse) or the oldest;
or in runs of 1,000 (four runs of garbage, then one run kept), up to G."""
REPLY_INSERT = ("INSERT INTO {child} SELECT id, id, 'Re: ' || message_id || ', noted, thanks.'"
                " FROM {t} ORDER BY id")
REPLY_FOREIGN_KEY = ("ALTER TABLE {child} ADD CONSTRAINT {name} FOREIGN KEY (message_id)"
                     " REFERENCES {t} (id) ON DELETE CASCADE")


class Bulk:
    """An autocommit session with bulk-load settings that times its statements by label."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("SET synchronous_commit = off")
        self.conn.execute("SET statement_timeout = 0")
        self.conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(MAINTENANCE_WORK_MEM)))
        self.seconds: dict[str, float] = {}

    def run(self, label: str, template: str, params: dict[str, Any] | None = None, **names: Any) -> None:
        began = time.monotonic()
        self.conn.execute(sql.SQL(template).format(**names), params)
        self.seconds[label] = self.seconds.get(label, 0.0) + time.monotonic() - began

    def indexes(self) -> dict[str, float]:
        return {label: s for label, s in self.seconds.items() if label not in ("insert", "vacuum")}

    def close(self) -> None:
        self.conn.close()


def _schema_of(table: str) -> sql.Identifier:
    return sql.Identifier(table.split(".", 1)[0] if "." in table else "public")


def _seed_synth(dsn: str, shape_layout: Layout, rows: int, fraction: float | None,
                progress: Progress) -> Any:
    from engine.tools import synth

    share = shape_layout.fraction if fraction is None else fraction
    return synth.seed(dsn, rows, shape_layout.garbage, share, table=shape_layout.table,
                      on_progress=progress)


def _seed_uuid(dsn: str, shape_layout: Layout, rows: int, fraction: float | None,
               progress: Progress) -> Any:
    """A table with its own key: random UUIDs (rows inserted in creation order, their keys in no
    order) or, with an integer key, bigints in insertion order; the indexes built once the rows
    are in, then VACUUM ANALYZE (as synth does)."""
    from engine.tools import synth

    share = shape_layout.fraction if fraction is None else fraction
    garbage = math.floor(rows * (share or 0.0) + 0.5)
    name = shape_layout.table.rsplit(".", 1)[-1]
    t = ident(shape_layout.table)
    bulk = Bulk(dsn)
    try:
        bulk.run("schema", "CREATE SCHEMA IF NOT EXISTS {s}", s=_schema_of(shape_layout.table))
        bulk.run("schema", KEYED_CREATE, t=t, key_type=sql.SQL(KEY_TYPES[shape_layout.integer_key]))
        now = bulk.conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        params = {"filler": synth.PAYLOAD_FILLER, "now": now, "t0": now - synth.TIME_SPAN,
                  "step_us": int(synth.TIME_SPAN.total_seconds() * 1e6) // (rows + 1),
                  "rows": rows, "garbage": garbage}
        for low in range(0, rows, CHUNK_ROWS):
            high = min(rows, low + CHUNK_ROWS)
            bulk.run("insert", KEYED_INSERT, {**params, "low": low, "high": high - 1}, t=t,
                     garbage=sql.SQL(GARBAGE[shape_layout.garbage]),
                     key=sql.SQL("s.k" if shape_layout.integer_key else "gen_random_uuid()"))
            progress("insert", high / rows)
        if shape_layout.integer_key:  # the application's inserts go on after the seeded keys
            bulk.run("schema", "ALTER TABLE {t} ALTER COLUMN id RESTART WITH {n}", t=t, n=sql.Literal(rows))
        bulk.run(f"{name}_pkey", "ALTER TABLE {t} ADD CONSTRAINT {c} PRIMARY KEY (id)", t=t,
                 c=sql.Identifier(f"{name}_pkey"))
        bulk.run(f"{name}_message_id_key", "ALTER TABLE {t} ADD CONSTRAINT {c} UNIQUE (message_id)", t=t,
                 c=sql.Identifier(f"{name}_message_id_key"))
        if shape_layout.garbage_index:
            bulk.run(f"{name}_garbage", "CREATE INDEX {c} ON {t} (id) WHERE processed_at IS NOT NULL", t=t,
                     c=sql.Identifier(f"{name}_garbage"))
        bulk.run("vacuum", "VACUUM (ANALYZE) {t}", t=t)
    finally:
        bulk.close()
    return synth.SeedReport(rows=rows, garbage_rows=garbage, shape=shape_layout.garbage,
                            insert_seconds=bulk.seconds["insert"], index_seconds=bulk.indexes(),
                            vacuum_analyze_seconds=bulk.seconds["vacuum"])


def _seed_cascade(dsn: str, shape_layout: Layout, rows: int, fraction: float | None,
                  progress: Progress) -> Any:
    """``messages``' twin (``LIKE ... INCLUDING ALL``) seeded by synth, then one reply per message
    in each child table, whose foreign key is added last: validated in one pass, not per row."""
    from engine.tools import synth

    t = ident(shape_layout.table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(_schema_of(shape_layout.table)))
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE public.messages INCLUDING ALL)").format(t))
    parent = _seed_synth(dsn, shape_layout, rows, fraction, progress)
    bulk = Bulk(dsn)
    try:
        for table in shape_layout.children:
            name, child = table.rsplit(".", 1)[-1], ident(table)
            bulk.run("schema", "CREATE TABLE {child} (id bigint NOT NULL, message_id bigint, body text)",
                     child=child)
            bulk.run("insert", REPLY_INSERT, child=child, t=t)
            progress(f"insert {name}", 1.0)
            bulk.run(f"{name}_pkey", "ALTER TABLE {child} ADD CONSTRAINT {c} PRIMARY KEY (id)", child=child,
                     c=sql.Identifier(f"{name}_pkey"))
            bulk.run(f"{name}_message_id_idx", "CREATE INDEX {c} ON {child} (message_id)", child=child,
                     c=sql.Identifier(f"{name}_message_id_idx"))
            bulk.run(f"{name}_message_id_fkey", REPLY_FOREIGN_KEY, child=child, t=t,
                     name=sql.Identifier(f"{name}_message_id_fkey"))
            bulk.run("vacuum", "VACUUM (ANALYZE) {child}", child=child)
    finally:
        bulk.close()
    bulk.seconds.pop("schema", None)
    return synth.SeedReport(
        rows=parent.rows, garbage_rows=parent.garbage_rows, shape=parent.shape,
        insert_seconds=parent.insert_seconds + bulk.seconds.get("insert", 0.0),
        index_seconds={**parent.index_seconds, **bulk.indexes()},
        vacuum_analyze_seconds=parent.vacuum_analyze_seconds + bulk.seconds.get("vacuum", 0.0))


PART_CREATE = ("CREATE TABLE {t} (id bigint GENERATED BY DEFAULT AS IDENTITY," + MESSAGE_COLUMNS
               + ") PARTITION BY RANGE (created_at)")
PART_LEAF = "CREATE TABLE {leaf} PARTITION OF {t} FOR VALUES FROM ({low}) TO ({high})"
PART_INSERT = """
INSERT INTO {leaf} (id, message_id, chat_id, direction, status, payload, created_at, processed_at)
SELECT s.id, 'wamid.' || s.id, (15550000000 + mod(s.id, 9973))::text, mod(s.id, 2)::smallint,
       CASE WHEN s.processed THEN 3 ELSE mod(s.id, 3) END::smallint,
       %(filler)s::text || s.id || '}}', s.created_at,
       CASE WHEN s.processed THEN s.created_at + (1 + mod(s.id, 600)) * interval '1 second' END
FROM (SELECT %(base)s::bigint + g.j + 1 AS id,
             %(start)s::timestamptz + (g.j * %(step_us)s::bigint) * interval '1 microsecond' AS created_at,
             (g.j + 1) * %(processed)s::bigint / %(n)s::bigint > g.j * %(processed)s::bigint / %(n)s::bigint
                 AS processed
      FROM (SELECT generate_series(0, %(n)s::bigint - 1) AS j) AS g) AS s
"""
DAY = timedelta(days=1)
ROWS_SPAN = timedelta(hours=11)
"""A day's rows (created, then processed within 10 minutes) fill the first 11 hours of its
partition: the retention boundary, 12 hours into a day when seeded, stays in the gap after them
for 11 hours, whoever computes ``now() - 30 days`` and whenever in that time."""
MIXED_WHOLE_DAYS = 0.8


def part_days(shape_layout: Layout, rows: int, fraction: float | None) -> list[tuple[int, int, int]]:
    """Per day, oldest first: (rows, rows processed, rows that are garbage)."""
    days, found = shape_layout.partitions, []
    share = shape_layout.fraction if fraction is None else fraction
    for k in range(days):
        n = (k + 1) * rows // days - k * rows // days
        if shape_layout.garbage == "mixed":
            processed = n if k < round(days * MIXED_WHOLE_DAYS) else math.floor(n * (share or 0.0) + 0.5)
            found.append((n, processed, processed))
        else:  # retention: processed but the newest day; garbage once older than the retention
            processed = n if k < days - 1 else 0
            old = k <= days - 1 - (shape_layout.retention_days or 0)
            found.append((n, processed, processed if old else 0))
    return found


def _seed_partitioned(dsn: str, shape_layout: Layout, rows: int, fraction: float | None,
                      progress: Progress) -> Any:
    """One partition per day on ``created_at``, the newest holding now(); each filled on its own
    (no routing), the indexes built on the parent once the rows are in, then VACUUM ANALYZE."""
    from engine.tools import synth

    name = shape_layout.table.rsplit(".", 1)[-1]
    schema = shape_layout.table.split(".", 1)[0] if "." in shape_layout.table else "public"
    t = ident(shape_layout.table)
    bulk = Bulk(dsn)
    days = part_days(shape_layout, rows, fraction)
    try:
        bulk.run("schema", "CREATE SCHEMA IF NOT EXISTS {s}", s=_schema_of(shape_layout.table))
        bulk.run("schema", PART_CREATE, t=t)
        now = bulk.conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        t0 = now - (len(days) - 1) * DAY - DAY / 2
        base = 0
        for k, (n, processed, _) in enumerate(days):
            leaf = sql.Identifier(schema, f"{name}_d{k:03d}")
            start = t0 + k * DAY
            bulk.run("schema", PART_LEAF, leaf=leaf, t=t, low=sql.Literal(start),
                     high=sql.Literal(start + DAY))
            bulk.run("insert", PART_INSERT, {"filler": synth.PAYLOAD_FILLER, "base": base, "start": start,
                                             "step_us": int(ROWS_SPAN.total_seconds() * 1e6) // max(1, n),
                                             "n": n, "processed": processed}, leaf=leaf)
            base += n
            progress("insert", (k + 1) / len(days))
        bulk.run("identity", "SELECT setval(pg_get_serial_sequence({n}, 'id'), {v})",
                 n=sql.Literal(shape_layout.table), v=sql.Literal(max(1, rows)))
        bulk.run(f"{name}_pkey", "ALTER TABLE {t} ADD CONSTRAINT {c} PRIMARY KEY (id, created_at)", t=t,
                 c=sql.Identifier(f"{name}_pkey"))
        bulk.run(f"{name}_message_id_idx", "CREATE INDEX {c} ON {t} (message_id)", t=t,
                 c=sql.Identifier(f"{name}_message_id_idx"))
        bulk.run(f"{name}_garbage", "CREATE INDEX {c} ON {t} (id) WHERE processed_at IS NOT NULL", t=t,
                 c=sql.Identifier(f"{name}_garbage"))
        bulk.run("vacuum", "VACUUM (ANALYZE) {t}", t=t)
    finally:
        bulk.close()
    for label in ("schema", "identity"):
        bulk.seconds.pop(label, None)
    return synth.SeedReport(rows=rows, garbage_rows=sum(garbage for _, _, garbage in days),
                            shape=shape_layout.garbage, insert_seconds=bulk.seconds["insert"],
                            index_seconds=bulk.indexes(), vacuum_analyze_seconds=bulk.seconds["vacuum"])


SEEDERS = {"synth": _seed_synth, "uuid": _seed_uuid, "cascade": _seed_cascade,
           "partitioned": _seed_partitioned}


def _make_archives(dsn: str, shape_layout: Layout) -> None:
    """``<table>_archive`` (and its children's) for ``--archive`` contenders, as an operator
    makes them: ``msggc migrate --archive-for`` (msggc's migration already made messages')."""
    from engine.archive import create_archive
    from engine.config import TableSpec

    if shape_layout.partitions:
        return  # an archive is made per partition; the partitioned shapes run no --archive contender
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in (shape_layout.table, *shape_layout.children):
            create_archive(conn, TableSpec.parse(table))


def conditions(dsn: str, table: str = "messages") -> dict[str, Any]:
    """What a fresh copy looks like before a contender: must be the same for every contender."""
    with psycopg.connect(dsn) as conn:
        oid = conn.execute("SELECT to_regclass(%s)::oid", (ident(table).as_string(conn),)).fetchone()[0]
        pages, visible, tuples, options, schema, name = conn.execute(
            "SELECT relpages, relallvisible, reltuples, reloptions,"
            " (SELECT nspname FROM pg_namespace WHERE oid = relnamespace),"
            " relname FROM pg_class WHERE oid = %s", (oid,)
        ).fetchone()
        stats = conn.execute(
            "SELECT count(*) FROM pg_stats WHERE schemaname = %s AND tablename = %s", (schema, name)
        ).fetchone()[0]
    return {"relpages": pages, "relallvisible": visible, "reltuples": tuples,
            "pg_stats_columns": stats, "reloptions": options}


def remaining_garbage(dsn: str, table: str = "messages", predicate: str = GARBAGE_SQL) -> int:
    """Garbage left after a contender: with the rows it deleted, must add up to the expected."""
    return _count_garbage(dsn, table, predicate)


def remaining_children(dsn: str, shape_layout: Layout) -> dict[str, int]:
    """Rows left in each child table: one per seeded parent row not deleted (the load adds
    parents only), so seeded rows - deleted once PostgreSQL cascaded the deletes."""
    with psycopg.connect(dsn) as conn:
        return {child: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(child))).fetchone()[0]
                for child in shape_layout.children}
