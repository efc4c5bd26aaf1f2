"""Plan a run: read what the table has (size, garbage density, indexes) and pick a strategy.

The planner only reads; it works on any ``messages`` table, including one msggc did not create
and that lacks the partial garbage index: it then plans with what the table has.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime

from engine.config import GcOptions, StrategyName
from engine.db import Connection, one_row
from engine.errors import UsageError
from engine.queries import Statements
from engine.target import Target

DENSE_GARBAGE_FRACTION = 0.05
"""At or above this share of garbage rows, most heap blocks hold garbage: reading the heap in
block order (physical) beats jumping through an index to each row."""

SAMPLE_BLOCKS = 2000
"""Blocks read by the density sample (16 MB): enough for a tight estimate, cheap on any table."""

TID_RANGE_SCAN_VERSION = 140000
"""PostgreSQL 14 added TID range scans; before it a ctid range is a sequential scan."""

PARALLEL_FROM_BLOCKS = 16_384
"""From 128 MB of heap a second worker pays off: below, its connection and planning cost more
than the time it saves (measured: see BENCHMARKS.md)."""

MAX_AUTO_WORKERS = 4
"""Beyond this, workers contend for WAL insertion more than they add (and the application's
backends need cores too)."""

HEAP_ORDER_CORRELATION = 0.9
"""At or above this correlation (``pg_stats``) of the key with the heap's order, a walk by key
ranges reads the heap almost sequentially, like the heap walk, and needs no sweep after it."""

DENSE_KEY_SPAN = 1.5
"""At most this many key values per row (an identity key with few gaps): the key walk cuts its
ranges by arithmetic. The key is unique, so ``size`` key values hold at most ``size`` rows (the
same bound the probe gives), and a batch needs no index probe for where ``size`` rows end
(measured on 2M dense rows, one worker: the probed walk used 2.82-2.91 s of server CPU, the
arithmetic one 2.47-2.50 s, one ``DELETE`` 2.26-2.44 s)."""

LEAF_SAMPLE_BLOCKS = 128
DROP_WHOLE_REASON = "every row is garbage (checked exactly): detached and dropped whole"
"""Blocks sampled of each leaf of a partitioned table: a live row of a mostly live leaf shows in
any sample (so a leaf dropped whole is told from one that is not, see :mod:`engine.partitions`),
and the garbage share of a small leaf is close enough to plan it."""

SWEEP_ONLY_BLOCKS = 16_384
SWEEP_ONLY_FRACTION = 0.02
"""A leaf of at most ``SWEEP_ONLY_BLOCKS`` (128 MB) with less than this share of garbage is walked
by its sweep alone: every leaf is swept after its walk (a row may move in from another leaf),
and the sweep's one read finds all its garbage, so a walk before it would read the leaf twice.
A denser leaf is walked first: the sweep stores each garbage row's key and deletes it by key,
about 15 us a row here (measured at 10M rows, 100 daily leaves of which 20 hold 10% garbage:
those 20 swept alone took 3.1 s, and the whole run 7.2 s against 3.7 s walking them first)."""


def sample_percent(blocks: int, sample_blocks: int = SAMPLE_BLOCKS) -> float:
    """The share of blocks a sample of ``sample_blocks`` reads (all of a small table)."""
    return min(100.0, 100.0 * sample_blocks / max(blocks, 1))


@dataclass(frozen=True)
class Sample:
    """Rows, and garbage rows among them, in a block sample of the table's ``blocks``."""

    blocks: int
    percent: float
    rows: int
    garbage: int
    analyzed_rows_per_block: float | None = None
    """``reltuples / relpages`` as the last VACUUM or ANALYZE left them (None: never analyzed)."""
    garbage_blocks: int = 0
    """Blocks of the sample holding garbage."""

    @property
    def garbage_per_block(self) -> float | None:
        """Garbage rows a page that holds any holds: deleting them dirties one page per this many."""
        return self.garbage / self.garbage_blocks if self.garbage_blocks else None

    @property
    def rows_estimate(self) -> int:
        """The rows counted when the sample read every block; else the server's own estimate
        (the analyzed density times the blocks now), which a small sample scaled up misses by
        its luck of the draw, the same luck for every leaf of one size (``REPEATABLE``)."""
        if self.percent < 100.0 and self.analyzed_rows_per_block is not None:
            return round(self.analyzed_rows_per_block * self.blocks)
        return round(self.rows * 100.0 / self.percent)

    @property
    def all_garbage(self) -> bool:
        """Rows, every one garbage (a NULL test is not garbage)."""
        return self.rows > 0 and self.garbage == self.rows


def take_sample(conn: Connection, statements: Statements, sample_blocks: int,
                cutoff: datetime | None) -> Sample:
    """A sample of ``sample_blocks`` of the table's blocks (all of a smaller table)."""
    blocks, density = one_row(conn.execute(
        "SELECT pg_relation_size(oid) / current_setting('block_size')::int,"
        " CASE WHEN relpages > 0 AND reltuples >= 0 THEN reltuples / relpages END"
        " FROM pg_class WHERE oid = %s", (statements.target.oid,)))
    percent = sample_percent(blocks, sample_blocks)
    rows, garbage, garbage_blocks = one_row(conn.execute(statements.sample_garbage,
                                                         {"percent": percent, "cutoff": cutoff}))
    return Sample(int(blocks), percent, int(rows), int(garbage), None if density is None else float(density),
                  int(garbage_blocks))


@dataclass(frozen=True)
class TableFacts:
    """What the planner learned about the table, reported by ``--dry-run`` too."""

    oid: int
    blocks: int
    rows_estimate: int
    garbage_fraction: float
    garbage_index: str | None
    key_indexed: bool
    key_min: int | None
    key_max: int | None
    server_version: int
    key: tuple[str, ...] = ()
    integer_key: bool = False
    key_in_heap_order: bool = False
    """The integer key's values follow the heap's order (see ``HEAP_ORDER_CORRELATION``)."""
    garbage_per_block: float | None = None
    """Garbage rows per page holding garbage, from the sample (None: none sampled)."""

    @property
    def key_walk_reads_heap_in_order(self) -> bool:
        return self.integer_key and self.key_indexed and self.key_in_heap_order

    @property
    def dense_key(self) -> bool:
        """One integer key with at most ``DENSE_KEY_SPAN`` values per row."""
        if not self.integer_key or self.key_min is None or self.key_max is None:
            return False
        return self.key_max - self.key_min + 1 <= DENSE_KEY_SPAN * max(self.rows_estimate, 1)

    @property
    def garbage_rows_estimate(self) -> int:
        return round(self.rows_estimate * self.garbage_fraction)

    @property
    def sample_percent(self) -> float:
        return sample_percent(self.blocks)

    @property
    def rows_per_block(self) -> float:
        return self.rows_estimate / self.blocks if self.blocks else 1.0


@dataclass(frozen=True)
class Plan:
    strategy: StrategyName
    reason: str
    facts: TableFacts
    cutoff: datetime | None
    sweep_only: bool = False
    """A leaf partition walked by its sweep alone (see ``SWEEP_ONLY_FRACTION``)."""
    drop_whole: bool = False
    """A leaf partition to be detached and dropped whole (see :mod:`engine.partitions`)."""


def read_facts(conn: Connection, target: Target, statements: Statements, cutoff: datetime | None,
               sample: Sample | None = None) -> TableFacts:
    """The table's facts, its garbage share from ``sample`` or from a sample of ``SAMPLE_BLOCKS``."""
    oid = target.oid
    sample = sample or take_sample(conn, statements, SAMPLE_BLOCKS, cutoff)
    blocks = sample.blocks
    key_min, key_max = one_row(conn.execute(statements.key_bounds)) if target.integer_key else (None, None)
    return TableFacts(
        oid=oid,
        blocks=blocks,
        rows_estimate=sample.rows_estimate,
        garbage_fraction=sample.garbage / sample.rows if sample.rows else 0.0,
        garbage_index=_garbage_index(conn, target),
        key_indexed=_key_indexed(conn, target),
        key_min=key_min,
        key_max=key_max,
        server_version=conn.info.server_version,
        key=target.key,
        integer_key=target.integer_key,
        key_in_heap_order=target.integer_key and _key_correlation(conn, target) >= HEAP_ORDER_CORRELATION,
        garbage_per_block=sample.garbage_per_block,
    )


def _key_correlation(conn: Connection, target: Target) -> float:
    """How closely the key's order follows the heap's, from the last ANALYZE (0: unknown)."""
    row = conn.execute(
        "SELECT abs(s.correlation) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname"
        " WHERE c.oid = %s AND s.attname = %s AND NOT s.inherited",
        (target.oid, target.key[0]),
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


LEADING_KEY = (
    "(SELECT array_agg(a.attnum ORDER BY k.n) FROM unnest(%(key)s::text[]) WITH ORDINALITY AS k(name, n)"
    " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = k.name)"
    " = (i.indkey::int2[])[0:cardinality(%(key)s::text[]) - 1]"
)
"""The index's leading columns are the key's, in order."""


def _garbage_index(conn: Connection, target: Target) -> str | None:
    """A valid partial btree index led by the key whose predicate is the processed test."""
    if not target.key or target.processed is None:
        return None
    row = conn.execute(
        "SELECT i.indexrelid::regclass::text FROM pg_index i"
        " WHERE i.indrelid = %(oid)s AND i.indisvalid AND i.indpred IS NOT NULL AND " + LEADING_KEY +
        " AND pg_get_expr(i.indpred, i.indrelid) = format('(%%I IS NOT NULL)', %(processed)s::text)"
        " ORDER BY pg_relation_size(i.indexrelid) LIMIT 1",
        {"oid": target.oid, "key": list(target.key), "processed": target.processed},
    ).fetchone()
    return str(row[0]) if row else None


def _key_indexed(conn: Connection, target: Target) -> bool:
    """A valid btree index led by the key: what walks in key order need."""
    if not target.key:
        return False
    row = one_row(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'btree' AND i.indrelid = %(oid)s"
        " AND i.indisvalid AND i.indpred IS NULL AND " + LEADING_KEY + ")",
        {"oid": target.oid, "key": list(target.key)},
    ))
    return bool(row[0])


def choose_strategy(facts: TableFacts, requested: StrategyName) -> tuple[StrategyName, str]:
    """The strategy and a one-line reason. A forced strategy is checked, never silently swapped."""
    physical_ok = facts.server_version >= TID_RANGE_SCAN_VERSION
    density = f"estimated garbage {facts.garbage_fraction:.1%} of ~{facts.rows_estimate:,} rows"
    if requested != "auto":
        if (refusal := _refusal(facts, requested, physical_ok)) is not None:
            raise UsageError(f"strategy {requested} cannot walk this table: {refusal}")
        return requested, f"forced by --strategy; {density}"
    cut = "cut by arithmetic on a dense key" if facts.dense_key else "each bounded by an index probe"
    in_order = (f"key ranges in heap order, {cut}"
                " (sequential reads; a key walk of a plain table needs no sweep)")
    if physical_ok and facts.garbage_fraction >= DENSE_GARBAGE_FRACTION:
        if facts.key_walk_reads_heap_in_order:
            return "key", f"{density}: dense, {in_order}"
        return "physical", f"{density}: dense, one sequential pass over the heap by TID ranges"
    if facts.garbage_index:
        return "index", f"{density}: sparse, keyset walk over {facts.garbage_index}"
    if facts.key_walk_reads_heap_in_order:
        return "key", f"{density}: no partial garbage index led by the key, {in_order}"
    if physical_ok:
        return "physical", f"{density}: no partial garbage index led by the key, sequential TID-range walk"
    if facts.key_indexed and facts.integer_key:
        return "key", f"{density}: key ranges probed on the primary key (no TID range scans)"
    if facts.key_indexed:
        return "index", f"{density}: keyset walk in key order (no TID range scans)"
    raise UsageError("the table has no index on its key and the server has no TID range scans")


def _refusal(facts: TableFacts, requested: StrategyName, physical_ok: bool) -> str | None:
    """Why a forced strategy cannot work on this table, or None."""
    no_key = "the table has no primary key (name its key columns with --key)"
    if requested == "physical":
        return None if physical_ok else "it needs PostgreSQL 14 or later (TID range scans)"
    if not facts.key:
        return no_key
    if requested == "index" and not (facts.garbage_index or facts.key_indexed):
        return (f"it needs a btree index led by the key ({', '.join(facts.key)}); best a partial one"
                " WHERE <processed column> IS NOT NULL, or choose --strategy physical")
    if requested == "key" and not facts.integer_key:
        return (f"it cuts ranges of one integer key; the key ({', '.join(facts.key)}) is not one:"
                " choose --strategy index or physical")
    if requested == "key" and not facts.key_indexed:
        return "it needs a btree index led by the key column"
    return None


def partitioned_reason(plans: Iterable[Plan]) -> str:
    """How a partitioned table's leaves go, e.g. ``partitioned: 100 leaves, 70 dropped whole,
    30 swept alone`` or ``..., 20 walked (physical 20)``."""
    plans = list(plans)
    walks = Counter(plan.strategy for plan in plans if not (plan.drop_whole or plan.sweep_only))
    parts = [f"{n} {how}" for n, how in ((sum(plan.drop_whole for plan in plans), "dropped whole"),
                                         (sum(plan.sweep_only for plan in plans), "swept alone")) if n]
    if walks:
        kinds = ", ".join(f"{strategy} {n}" for strategy, n in walks.most_common())
        parts.append(f"{walks.total()} walked ({kinds})")
    return f"partitioned: {len(plans)} leaves, " + ", ".join(parts)


def workers_for(plans: Iterable[Plan], server_host: str) -> int:
    """``--workers auto``: one for a small table; else one per core the server can use, up to
    ``MAX_AUTO_WORKERS``, counting the cores of this machine when the server runs on it (socket
    or loopback) and two otherwise."""
    if sum(plan.facts.blocks for plan in plans) < PARALLEL_FROM_BLOCKS:
        return 1
    local = server_host.startswith("/") or server_host in ("localhost", "127.0.0.1", "::1")
    cores = (os.cpu_count() or 1) if local else 2
    return max(1, min(MAX_AUTO_WORKERS, cores))


def cutoff_of(conn: Connection, options: GcOptions) -> datetime | None:
    """The retention's cutoff, computed once for the whole run (all leaves share it)."""
    if options.older_than is None:
        return None
    # a retention reaching before year 1 (e.g. 99999999w) keeps every row: clamp, not overflow
    cutoff: datetime = one_row(conn.execute(
        "SELECT CASE WHEN %(keep)s::interval < now() - '0001-01-01 00:00+00'::timestamptz"
        " THEN now() - %(keep)s::interval ELSE '0001-01-01 00:00+00'::timestamptz END",
        {"keep": options.older_than},
    ))[0]
    return cutoff


def make_plan(conn: Connection, options: GcOptions, target: Target, statements: Statements,
              cutoff: datetime | None, sample: Sample | None = None) -> Plan:
    facts = read_facts(conn, target, statements, cutoff, sample)
    strategy, reason = choose_strategy(facts, options.strategy)
    return Plan(strategy=strategy, reason=reason, facts=facts, cutoff=cutoff)


def leaf_plan(conn: Connection, options: GcOptions, target: Target, statements: Statements,
              cutoff: datetime | None, sample: Sample) -> Plan:
    """A leaf partition's plan: a small leaf is planned from its leaf sample (``sample``), and
    walked by its sweep alone when its garbage is scarce (``SWEEP_ONLY_FRACTION``) and no foreign
    key keeps garbage rows (the walk counts those; the sweep reads deletable rows only)."""
    small = sample.blocks <= SWEEP_ONLY_BLOCKS
    plan = make_plan(conn, options, target, statements, cutoff, sample if small else None)
    scarce = plan.facts.garbage_fraction < SWEEP_ONLY_FRACTION
    if small and scarce and options.strategy == "auto" and not statements.kept_by:
        density = f"estimated garbage {plan.facts.garbage_fraction:.1%} of ~{plan.facts.rows_estimate:,} rows"
        return replace(plan, sweep_only=True,
                       reason=f"{density}: scarce in a small leaf, its sweep's one read finds it all")
    return plan


def whole_leaf_plan(conn: Connection, target: Target, cutoff: datetime | None, sample: Sample) -> Plan:
    """A leaf partition about to be dropped whole (found wholly garbage, exactly); if the drop
    cannot happen after all, it is walked by TID ranges like any dense table."""
    facts = TableFacts(oid=target.oid, blocks=sample.blocks, rows_estimate=sample.rows_estimate,
                       garbage_fraction=1.0, garbage_index=None, key_indexed=False, key_min=None,
                       key_max=None, server_version=conn.info.server_version, key=target.key,
                       integer_key=target.integer_key, garbage_per_block=sample.garbage_per_block)
    return Plan(strategy="physical", reason=DROP_WHOLE_REASON, facts=facts,
                cutoff=cutoff, drop_whole=True)
