"""Dropping a leaf partition that is wholly garbage instead of deleting its rows one by one.

A drop writes a catalog change where a delete writes every row to WAL and leaves it to VACUUM.
It must never lose a row, nor hold the application up for long:
- only a RANGE leaf (not the default one, never a LIST or HASH leaf: their values have nowhere
  else to go) that has rows, all of them garbage in a sample of its blocks, with a later leaf
  already holding rows (the application writes there now), and no foreign key onto the table;
- it is detached with ``DETACH PARTITION ... CONCURRENTLY`` where the server allows it
  (PostgreSQL 14+, no default partition), else in a short transaction; under ``lock_timeout``,
  retried with backoff, and walked row by row when it cannot be detached;
- once detached no row can arrive: it is locked and read in full; a row that is not garbage
  (inserted or un-processed meanwhile) sends it back (re-attached with its bounds) to be walked
  row by row; else it is dropped, its rows counted as deleted, in the same transaction as the
  run's record of them;
- the run records the leaf before detaching it, so a run killed between the detach and the drop
  is finished by the next one (a pending detach is finalized first).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from engine import runs
from engine.config import GcOptions, TableSpec
from engine.db import Connection, one_row, regclass_of, table_ident
from engine.errors import MsggcError
from engine.planner import Sample
from engine.queries import Statements
from engine.target import Target
from engine.target import resolve as resolve_target
from engine.walk import Walk

DETACH_ATTEMPTS = 5
DETACH_BACKOFF_S = 0.2
CONCURRENT_DETACH_VERSION = 140000
UPPER_BOUND = re.compile(r"FOR VALUES FROM \(.*\) TO \((.*)\)", re.DOTALL)
"""A one-column range leaf's bound as ``pg_get_expr`` prints it: its exclusive upper end."""


@dataclass(frozen=True)
class Leaf:
    """A leaf partition as its parent declares it: what re-attaching it needs."""

    table: TableSpec
    parent: TableSpec
    bound: str
    """``FOR VALUES ...`` as ``pg_get_expr`` prints it."""
    parent_has_default: bool


def droppable(conn: Connection, oid: int) -> Leaf | None:
    """The leaf, when it is a range leaf (on one column) of which a later leaf already holds
    rows: the application writes there, not here; else None."""
    row = conn.execute(
        "SELECT n.nspname, c.relname, pn.nspname, p.relname, pg_get_expr(c.relpartbound, c.oid),"
        " pt.partstrat::text, pt.partnatts, a.attname,"
        " EXISTS (SELECT 1 FROM pg_inherits i2 JOIN pg_class s ON s.oid = i2.inhrelid"
        "         WHERE i2.inhparent = p.oid AND pg_get_expr(s.relpartbound, s.oid) = 'DEFAULT')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_inherits i ON i.inhrelid = c.oid JOIN pg_class p ON p.oid = i.inhparent"
        " JOIN pg_namespace pn ON pn.oid = p.relnamespace"
        " JOIN pg_partitioned_table pt ON pt.partrelid = p.oid"
        " LEFT JOIN pg_attribute a ON a.attrelid = p.oid AND a.attnum = pt.partattrs[0]"
        " WHERE c.oid = %s",
        (oid,),
    ).fetchone()
    if row is None:
        return None
    schema, name, parent_schema, parent, bound, strategy, columns, key, has_default = row
    if strategy != "r" or bound == "DEFAULT" or columns != 1 or key is None:
        return None
    upper = UPPER_BOUND.fullmatch(bound)
    if upper is None or upper.group(1) == "MAXVALUE":
        return None
    leaf = Leaf(TableSpec(name=name, schema=schema), TableSpec(name=parent, schema=parent_schema), bound,
                bool(has_default))
    # a row at or past the leaf's upper bound: partition pruning reads the later leaves only,
    # and the first row found ends the probe
    probe = sql.SQL("SELECT EXISTS (SELECT 1 FROM {parent} WHERE {key} >= {upper})").format(
        parent=table_ident(leaf.parent), key=sql.Identifier(key),
        upper=sql.SQL(upper.group(1)))  # a constant the server printed from its catalog
    later = one_row(conn.execute(probe))[0]
    return leaf if later else None


PARTMAN_LOCK = "pg_partman run_maintenance"
"""The advisory lock pg_partman's maintenance takes (``pg_try_advisory_xact_lock(hashtext(...))``):
held (shared, so a run's workers drop leaves side by side) around a detach and its drop,
maintenance waits for its next round instead of racing them."""


@dataclass(frozen=True)
class Drop:
    """What dropping one leaf needs; called with a worker's connection, it returns the leaf's
    rows, or None when the leaf is to be walked row by row after all."""

    leaf: Leaf
    statements: Statements
    params: dict[str, object]
    run_id: int
    lock_timeout_ms: int
    detaching: threading.Lock
    """Shared by the run's drops: a partitioned table has at most one detach pending at a time."""

    def __call__(self, conn: Connection) -> int | None:
        """Detach, read in full and drop the leaf. Its transactions commit synchronously even
        under ``--async-commit``: a drop a crash took back after the worker counted it would send
        the walk over a leaf it believes gone (and never swept); the commit's cost is the
        unlink of the leaf's files, not the WAL flush (measured: 12.5 ms either way)."""
        with _maintenance_paused(conn) as paused:
            if not paused:
                return None
            leaf = self.leaf
            runs.mark_detaching(conn, self.run_id, leaf.table.qualified, leaf.parent.qualified, leaf.bound)
            with self.detaching:
                detached = _detach(conn, leaf, self.lock_timeout_ms)
            if not detached:
                runs.mark_detaching(conn, self.run_id, leaf.table.qualified, None)
                return None
            return finish_detached(conn, leaf, self.statements, self.params, self.run_id)


@contextmanager
def _maintenance_paused(conn: Connection) -> Iterator[bool]:
    """pg_partman's lock, tried a few times with backoff: False when its maintenance keeps it."""
    for attempt in range(DETACH_ATTEMPTS):
        if one_row(conn.execute("SELECT pg_try_advisory_lock_shared(hashtext(%s))", (PARTMAN_LOCK,)))[0]:
            break
        time.sleep(DETACH_BACKOFF_S * 2**attempt)
    else:
        yield False
        return
    try:
        yield True
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock_shared(hashtext(%s))", (PARTMAN_LOCK,))


def finish_detached(conn: Connection, leaf: Leaf, statements: Statements, params: dict[str, object],
                    run_id: int) -> int | None:
    """The detached leaf dropped when it is still wholly garbage (its rows returned), or
    attached again to be walked row by row (None)."""
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table_ident(leaf.table)))
        live, rows = one_row(conn.execute(sql.SQL(
            "SELECT count(*) FILTER (WHERE ({garbage}) IS NOT TRUE), count(*) FROM {t}"
        ).format(t=table_ident(leaf.table), garbage=statements.garbage), params))
        if live == 0:
            conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(leaf.table)))
            runs.record_drop(conn, run_id, leaf.table.qualified, rows)
            return int(rows)
    conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} {}").format(
        table_ident(leaf.parent), table_ident(leaf.table), sql.SQL(leaf.bound)))  # bound from the catalog
    runs.mark_detaching(conn, run_id, leaf.table.qualified, None)
    return None


def _detach(conn: Connection, leaf: Leaf, lock_timeout_ms: int) -> bool:
    """Detached within a few attempts of ``lock_timeout`` each, or given up (False)."""
    concurrently = conn.info.server_version >= CONCURRENT_DETACH_VERSION and not leaf.parent_has_default
    statement = sql.SQL("ALTER TABLE {} DETACH PARTITION {}{}").format(
        table_ident(leaf.parent), table_ident(leaf.table), sql.SQL(" CONCURRENTLY" if concurrently else ""))
    for attempt in range(DETACH_ATTEMPTS):
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{lock_timeout_ms}ms",))
            if concurrently:
                conn.execute(statement)
            else:
                with conn.transaction():
                    conn.execute(statement)
            return True
        except pg_errors.LockNotAvailable:
            if concurrently:
                finalize_pending(conn, leaf)  # an interrupted concurrent detach leaves it pending
            time.sleep(DETACH_BACKOFF_S * 2**attempt)
        finally:
            conn.execute("RESET lock_timeout")
    return False


def finalize_pending(conn: Connection, leaf: Leaf) -> bool:
    """Complete a concurrent detach that was interrupted (it stays pending until finalized)."""
    pending = conn.execute(
        "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(%s) AND inhdetachpending",
        (table_ident(leaf.table).as_string(conn),)).fetchone()
    if pending is None:
        return False
    try:
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(
            table_ident(leaf.parent), table_ident(leaf.table)))
    except psycopg.OperationalError:
        return False
    return True


def is_attached(conn: Connection, leaf: Leaf) -> bool:
    return conn.execute(
        "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(%s) AND NOT inhdetachpending",
        (table_ident(leaf.table).as_string(conn),)).fetchone() is not None


# -- the walk's part: which leaves go, and a killed run's leaves finished --------------------

def may_drop(options: GcOptions, target: Target) -> bool:
    """Unless the operator said ``--no-drop``, rows must be archived, or a foreign key points at
    the table (its rules are checked row by row)."""
    return not (options.no_drop or options.archive or options.archive_to or target.references)


def whole_leaf(conn: Connection, options: GcOptions, target: Target, oid: int, sample: Sample) -> Leaf | None:
    """The leaf when the run will drop it whole: its sample found only garbage (the read in full
    after its detach decides) and it may be dropped."""
    if not sample.all_garbage or not may_drop(options, target):
        return None
    return droppable(conn, oid)


def drops(walk: Walk, whole: dict[str, Leaf]) -> dict[str, Drop]:
    """The drop of each leaf found wholly garbage that the run has not finished yet."""
    detaching = threading.Lock()
    return {name: Drop(leaf, walk.legs[name].statements, walk.params, walk.run.id,
                       walk.options.lock_timeout_ms, detaching)
            for name, leaf in whole.items()
            if not all(part.done for part in walk.run.slices if part.leaf == name)}


def finish_interrupted(conn: Connection, walk: Walk, target: Target) -> None:
    """The leaves a killed run detached (or began to), finished before this run walks: dropped if
    still wholly garbage, else attached again and this run fails, so that the next one walks
    them with the others."""
    if not may_drop(walk.options, target):
        return
    for run_id in (walk.run.id, walk.run.resumed_from):
        if run_id is None:
            continue
        for pending in runs.detaching(conn, run_id):
            _finish_interrupted_drop(conn, walk, pending)
        runs.forget_detaching(conn, run_id)


def _finish_interrupted_drop(conn: Connection, walk: Walk, pending: dict[str, str]) -> None:
    leaf = Leaf(TableSpec.parse(pending["leaf"]), TableSpec.parse(pending["parent"]),
                pending["bound"], parent_has_default=False)
    finalize_pending(conn, leaf)
    if is_attached(conn, leaf) or regclass_of(conn, leaf.table) is None:
        return
    spec = dataclasses.replace(walk.options.table, schema=leaf.table.schema, name=leaf.table.name)
    statements = Statements.for_target(resolve_target(conn, spec), walk.options.older_than is not None)
    dropped = finish_detached(conn, leaf, statements, walk.params, walk.run.id)
    if dropped is None:
        raise MsggcError(f"{leaf.table.qualified}, detached by an interrupted run, holds rows that are"
                         " not garbage: it is attached again; run again to walk it row by row")
    walk.record_drop(pending["leaf"], dropped)
