"""Dropping a leaf partition that is wholly garbage instead of deleting its rows one by one.

A drop writes a catalog change where a delete writes every row to WAL and leaves it to VACUUM.
It must never lose a row, nor hold the application up for long, nor leave a range homeless:
- only a RANGE leaf on one column (not the default one, never a LIST or HASH leaf: their values
  have nowhere else to go), owned by the role, with a later leaf already holding rows (the
  application writes there now), no foreign key onto the table and no archive asked for;
- only a leaf known to be wholly garbage: a sample of its blocks first, then an exact answer
  (a btree on the processed column answers ``IS NULL`` at once; else one full read);
- it is detached in one short transaction: the parent then the leaf locked (the application
  waits for the leaf's last read, bounded by ``statement_timeout``), read in full, then a plain
  ``DETACH`` (never ``CONCURRENTLY``: it would commit a pending detach of its own) recorded in the
  run, every lock under ``lock_timeout`` and retried with backoff. A crash or a timeout in it rolls
  all of it back; so no leaf is ever left pending, and a range is without its leaf only once
  every row in it was garbage, checked under the lock;
- then it is dropped, its rows counted, in a second transaction that holds no lock of the
  application's (the unlink of its files at commit takes 10-60 ms on a busy disk). A run killed
  between the two leaves a detached leaf of garbage: the next run attaches it again first
  (:func:`recover`) and collects it with the rest;
- a leaf that cannot be dropped that way is walked row by row like any other.

Every run on a table, whatever its flags, first calls :func:`recover`: a leaf that a run
recorded and left detached (or, in versions that detached ``CONCURRENTLY``, pending) is attached
again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from psycopg import errors as pg_errors
from psycopg import sql

from engine import runs
from engine.config import GcOptions, TableSpec
from engine.db import Connection, one_row, table_ident
from engine.errors import MsggcError
from engine.queries import Statements
from engine.target import Target

DETACH_ATTEMPTS = 5
DETACH_BACKOFF_S = 0.2
RANGE_BOUND = re.compile(r"FOR VALUES FROM \((.*)\) TO \((.*)\)", re.DOTALL)
"""A one-column range leaf's bound as ``pg_get_expr`` prints it: its lower and upper ends."""


@dataclass(frozen=True)
class Leaf:
    """A leaf partition as its parent declares it: what dropping or re-attaching it needs."""

    table: TableSpec
    parent: TableSpec
    bound: str
    """``FOR VALUES ...`` as ``pg_get_expr`` prints it."""


def droppable(conn: Connection, oid: int) -> Leaf | None:
    """The leaf, when it is a range leaf (on one column) that the role owns, as it owns its
    parent (``DETACH`` and ``DROP`` need both), and of which a later leaf already holds rows:
    the application writes there, not here; else None."""
    row = conn.execute(
        "SELECT n.nspname, c.relname, pn.nspname, p.relname, pg_get_expr(c.relpartbound, c.oid),"
        " pt.partstrat::text, pt.partnatts, a.attname,"
        " pg_has_role(c.relowner, 'USAGE') AND pg_has_role(p.relowner, 'USAGE')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_inherits i ON i.inhrelid = c.oid JOIN pg_class p ON p.oid = i.inhparent"
        " JOIN pg_namespace pn ON pn.oid = p.relnamespace"
        " JOIN pg_partitioned_table pt ON pt.partrelid = p.oid"
        " LEFT JOIN pg_attribute a ON a.attrelid = p.oid AND a.attnum = pt.partattrs[0]"
        " WHERE c.oid = %s AND NOT i.inhdetachpending",
        (oid,),
    ).fetchone()
    if row is None:
        return None
    schema, name, parent_schema, parent, bound, strategy, columns, key, owned = row
    if strategy != "r" or bound == "DEFAULT" or columns != 1 or key is None or not owned:
        return None
    ends = RANGE_BOUND.fullmatch(bound)
    if ends is None or ends.group(2) == "MAXVALUE":
        return None
    leaf = Leaf(TableSpec(name=name, schema=schema), TableSpec(name=parent, schema=parent_schema), bound)
    # a row at or past the leaf's upper bound: partition pruning reads the later leaves only,
    # and the first row found ends the probe
    probe = sql.SQL("SELECT EXISTS (SELECT 1 FROM {parent} WHERE {key} >= {upper})").format(
        parent=table_ident(leaf.parent), key=sql.Identifier(key),
        upper=sql.SQL(ends.group(2)))  # a constant the server printed from its catalog
    later = one_row(conn.execute(probe))[0]
    return leaf if later else None


def holds_live_rows(conn: Connection, statements: Statements, params: dict[str, object]) -> bool:
    """Exactly: does the table hold a row that is not garbage? A NULL processed value is never
    garbage, and a btree on the processed column finds one at once; where garbage is more than
    "processed", one full read answers the rest."""
    table = table_ident(statements.table)
    probes: list[sql.Composable] = []
    processed = statements.target.processed
    if processed is not None:
        unprocessed = sql.SQL("{} IS NULL").format(sql.Identifier(processed))
        probes.append(sql.SQL("EXISTS (SELECT 1 FROM {t} WHERE {p})").format(t=table, p=unprocessed))
        only_processed = sql.SQL("{} IS NOT NULL").format(sql.Identifier(processed))
        if statements.garbage.as_string(conn) == only_processed.as_string(conn):
            return bool(one_row(conn.execute(sql.SQL("SELECT {}").format(probes[0]), params))[0])
    probes.append(sql.SQL("EXISTS (SELECT 1 FROM {t} WHERE ({g}) IS NOT TRUE)").format(
        t=table, g=statements.garbage))
    return bool(one_row(conn.execute(sql.SQL("SELECT {}").format(sql.SQL(" OR ").join(probes)), params))[0])


PARTMAN_LOCK = "pg_partman run_maintenance"
"""The advisory lock pg_partman's maintenance takes (``pg_try_advisory_xact_lock(hashtext(...))``):
held (shared, so a run's workers drop leaves side by side) around a drop, maintenance waits for
its next round instead of racing it."""


@dataclass
class Contention:
    """Shared by a run's drops: once one drop never got the table's lock (a transaction of the
    application's holds it open), the next ones try once each instead of backing off five times
    (6.2 s a leaf: ten minutes for 100 daily leaves behind one long read); a drop that gets it
    lifts that."""

    held: bool = False

    @property
    def attempts(self) -> int:
        return 1 if self.held else DETACH_ATTEMPTS


@dataclass(frozen=True)
class Drop:
    """What dropping one leaf needs; called with a worker's connection, it returns the leaf's
    rows, or None when the leaf is to be walked row by row after all."""

    leaf: Leaf
    statements: Statements
    params: dict[str, object]
    run_id: int
    lock_timeout_ms: int
    statement_timeout_ms: int
    contention: Contention

    def __call__(self, conn: Connection) -> int | None:
        """Detached in one transaction (tried a few times with backoff while a lock is not
        granted within ``lock_timeout``), then dropped in a second one: the unlink of its files
        at the drop's commit (10-60 ms on a busy disk) holds no lock of the application's."""
        with _maintenance_paused(conn) as paused:
            if not paused:
                return None
            for attempt in range(self.contention.attempts):
                try:
                    rows = self._detach_if_wholly_garbage(conn)
                    break
                except pg_errors.LockNotAvailable:
                    time.sleep(DETACH_BACKOFF_S * 2**attempt)
                except (pg_errors.QueryCanceled, pg_errors.InsufficientPrivilege):
                    return None  # its read takes longer than a batch may hold locks, or not ours
            else:
                self.contention.held = True
                return None
            self.contention.held = False
            if rows is not None:
                self._drop_detached(conn, rows)
            return rows

    def resumed(self, conn: Connection) -> int | None:
        """On a new connection, after the worker's was lost during the drop: the leaf's rows once
        it is dropped (its detach had committed: dropped now; its drop had: read from its record),
        or None when nothing of it had committed and the leaf is to be walked row by row."""
        state = detach_state(conn, self.leaf)
        if state == "attached":
            return None
        name = self.leaf.table.qualified
        if state == "gone" and (rows := runs.dropped_rows(conn, self.run_id, name)) is not None:
            return rows
        if state != "detached":
            raise MsggcError(f"{name}: the connection was lost while it was being dropped, and it is"
                             f" now {state}; the next run sees to it first")
        rows = int(one_row(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            table_ident(self.leaf.table))))[0])  # counted wholly garbage in the detach's transaction
        self._drop_detached(conn, rows)
        return rows

    def _detach_if_wholly_garbage(self, conn: Connection) -> int | None:
        """The leaf's rows, once it is detached with its record; None (nothing changed) when it
        holds a row that is not garbage."""
        leaf = self.leaf
        with conn.transaction():
            self._set_local(conn, statement_timeout=True)
            # the parent first, as the application's statements lock it before its leaves: a
            # leaf locked first would deadlock with a statement that touches every leaf
            for only, table in ((sql.SQL("ONLY "), leaf.parent), (sql.SQL(""), leaf.table)):
                conn.execute(sql.SQL("LOCK TABLE {}{} IN ACCESS EXCLUSIVE MODE").format(
                    only, table_ident(table)))
            live, rows = one_row(conn.execute(sql.SQL(
                "SELECT count(*) FILTER (WHERE ({garbage}) IS NOT TRUE), count(*) FROM {t}"
            ).format(t=table_ident(leaf.table), garbage=self.statements.garbage), self.params))
            if live:
                return None
            conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                table_ident(leaf.parent), table_ident(leaf.table)))
            runs.record_detached(conn, self.run_id, leaf.table.qualified, leaf.parent.qualified, leaf.bound)
            return int(rows)

    def _drop_detached(self, conn: Connection, rows: int) -> None:
        """Drop the detached leaf and count its rows in one transaction. Nobody reaches it through
        the parent any more, so nothing waits for its lock; if it cannot be dropped, the run fails
        and the next run attaches it again first (:func:`recover`), then collects it."""
        for attempt in range(DETACH_ATTEMPTS):
            try:
                with conn.transaction():
                    self._set_local(conn, statement_timeout=False)
                    conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(self.leaf.table)))
                    runs.record_drop(conn, self.run_id, self.leaf.table.qualified, rows)
                return
            except pg_errors.LockNotAvailable:
                time.sleep(DETACH_BACKOFF_S * 2**attempt)
        raise MsggcError(f"{self.leaf.table.qualified}, detached wholly garbage, could not be dropped:"
                         f" a session held it past lock_timeout ({self.lock_timeout_ms} ms)"
                         f" {DETACH_ATTEMPTS} times; the next run attaches it again and collects it")

    def _set_local(self, conn: Connection, *, statement_timeout: bool) -> None:
        """This transaction's timeouts; it commits synchronously even under ``--async-commit``:
        a detach or drop a crash took back after the worker counted it would send the walk over
        a leaf it believes gone (and never swept)."""
        bound_ms = self.statement_timeout_ms if statement_timeout else 0
        conn.execute("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true),"
                     " set_config('synchronous_commit', 'on', true)",
                     (f"{self.lock_timeout_ms}ms", f"{bound_ms}ms"))


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


# -- the planner's part: which leaves go -----------------------------------------------------

def may_drop(options: GcOptions, target: Target) -> bool:
    """Unless the operator said ``--no-drop``, rows must be archived, or a foreign key points at
    the table (its rules are checked row by row)."""
    return not (options.no_drop or options.archive or options.archive_to or target.references)


def whole_leaf(conn: Connection, options: GcOptions, target: Target, all_garbage_sampled: bool,
               statements: Statements, cutoff: datetime | None) -> Leaf | None:
    """The leaf when the run will drop it whole: its sample found only garbage, the exact check
    found no row that is not, and it may be dropped (the drop reads it again under its lock)."""
    if not all_garbage_sampled or not may_drop(options, target):
        return None
    leaf = droppable(conn, statements.target.oid)
    if leaf is None or holds_live_rows(conn, statements, {"cutoff": cutoff}):
        return None
    return leaf


def drops(whole: dict[str, Leaf], legs: dict[str, Statements], options: GcOptions,
          run: runs.Run, params: dict[str, object]) -> dict[str, Drop]:
    """The drop of each leaf found wholly garbage that the run has not finished yet."""
    timeouts = (options.lock_timeout_ms, options.statement_timeout_ms)
    contention = Contention()
    return {name: Drop(leaf, legs[name], params, run.id, *timeouts, contention)
            for name, leaf in whole.items() if not all(part.done for part in run.slices if part.leaf == name)}


# -- what an earlier version left: a leaf detached, or pending detach ------------------------

class LeafNotRecovered(MsggcError):
    """A leaf an earlier run left detached could not be attached again yet: nothing is lost
    (its rows are in it), and no run on the table can be complete until it is."""


def recover(conn: Connection, oid: int, lock_timeout_ms: int) -> list[str]:
    """Attach again every leaf of the table ``oid`` (however a run named it) that a run recorded
    and left detached or pending detach (finalized first, never a second concurrent detach),
    moving back in the same transaction the rows that a default partition took meanwhile;
    returns their names. It drops nothing: the run's own planning decides on them as on any leaf."""
    attached = []
    for run_id, record in runs.unfinished_detaches(conn):
        leaf = _recorded(record)
        if not _in_tree(conn, leaf.parent, oid):
            continue
        if _attached_again(conn, leaf, lock_timeout_ms):
            attached.append(leaf.table.qualified)
        runs.forget_detached(conn, run_id, record["leaf"])
    return attached


def _in_tree(conn: Connection, table: TableSpec, oid: int) -> bool:
    """``table`` is the partitioned table ``oid`` or one of its partitions."""
    return bool(one_row(conn.execute(
        "SELECT to_regclass(%s) IN (SELECT relid FROM pg_partition_tree(%s))",
        (table_ident(table).as_string(conn), oid)))[0])


def left_detached(conn: Connection) -> list[tuple[Leaf, str, int]]:
    """Every leaf an earlier run recorded and left detached or pending, with its state and run:
    ``msggc status`` shows them until the next run on their table attaches them again."""
    leaves = [(_recorded(record), run_id) for run_id, record in runs.unfinished_detaches(conn)]
    return [(leaf, state, run_id) for leaf, run_id in leaves
            if (state := detach_state(conn, leaf)) in ("pending", "detached")]


def _recorded(record: dict[str, str]) -> Leaf:
    return Leaf(TableSpec.parse(record["leaf"]), TableSpec.parse(record["parent"]), record["bound"])


def _attached_again(conn: Connection, leaf: Leaf, lock_timeout_ms: int) -> bool:
    """The leaf finalized if pending, then attached again; False when it is attached or gone."""
    state = detach_state(conn, leaf)
    if state == "pending":
        finalize = sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(
            table_ident(leaf.parent), table_ident(leaf.table))
        _retried(conn, lock_timeout_ms, leaf, "finalize its pending detach", lambda: conn.execute(finalize))
    if state not in ("pending", "detached"):
        return False
    _retried(conn, lock_timeout_ms, leaf, "attach it again", lambda: _attach_again(conn, leaf))
    return True


def detach_state(conn: Connection, leaf: Leaf) -> str:
    """``gone`` (no such table), ``attached``, ``pending`` (detach to finalize) or ``detached``."""
    row = conn.execute(
        "SELECT c.oid, i.inhdetachpending FROM pg_class c"
        " LEFT JOIN pg_inherits i ON i.inhrelid = c.oid WHERE c.oid = to_regclass(%s)",
        (table_ident(leaf.table).as_string(conn),)).fetchone()
    if row is None:
        return "gone"
    return "detached" if row[1] is None else "pending" if row[1] else "attached"


def _retried(conn: Connection, lock_timeout_ms: int, leaf: Leaf, what: str,
             step: Callable[[], object]) -> None:
    """``step`` under ``lock_timeout``, retried with backoff; a clear failure if it keeps
    waiting for the application."""
    for attempt in range(DETACH_ATTEMPTS):
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{lock_timeout_ms}ms",))
            step()
            return
        except pg_errors.LockNotAvailable:
            time.sleep(DETACH_BACKOFF_S * 2**attempt)
        except pg_errors.InsufficientPrivilege as exc:
            raise LeafNotRecovered(f"{leaf.table.qualified}, left detached by an earlier run, needs its owner"
                                   f" to {what}: {exc.diag.message_primary}") from None
        finally:
            conn.execute("RESET lock_timeout")
    raise LeafNotRecovered(
        f"{leaf.table.qualified}, left detached by an earlier run, could not {what}: the application"
        f" held its locks past lock_timeout ({lock_timeout_ms} ms) {DETACH_ATTEMPTS} times; nothing is"
        " lost, and the next run tries again first")


def _attach_again(conn: Connection, leaf: Leaf) -> None:
    """One transaction: the rows a default partition took in the leaf's range move back into the
    leaf, and the leaf is attached with its bound."""
    with conn.transaction():
        default = conn.execute(
            "SELECT n.nspname, s.relname FROM pg_inherits i JOIN pg_class s ON s.oid = i.inhrelid"
            " JOIN pg_namespace n ON n.oid = s.relnamespace"
            " WHERE i.inhparent = to_regclass(%s) AND pg_get_expr(s.relpartbound, s.oid) = 'DEFAULT'",
            (table_ident(leaf.parent).as_string(conn),)).fetchone()
        if default is not None:
            _move_back(conn, leaf, sql.Identifier(*default))
        conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} {}").format(
            table_ident(leaf.parent), table_ident(leaf.table), sql.SQL(leaf.bound)))  # bound from the catalog


def _move_back(conn: Connection, leaf: Leaf, default: sql.Composable) -> None:
    key, columns = one_row(conn.execute(
        "SELECT a.attname, (SELECT array_agg(attname ORDER BY attnum) FROM pg_attribute"
        "  WHERE attrelid = p.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = '')"
        " FROM pg_class p JOIN pg_partitioned_table pt ON pt.partrelid = p.oid"
        " JOIN pg_attribute a ON a.attrelid = p.oid AND a.attnum = pt.partattrs[0]"
        " WHERE p.oid = to_regclass(%s)", (table_ident(leaf.parent).as_string(conn),)))
    ends = RANGE_BOUND.fullmatch(leaf.bound)
    if ends is None:
        raise MsggcError(f"{leaf.table.qualified}: unexpected partition bound {leaf.bound!r}")
    lower, upper = ends.groups()  # constants the server printed from its catalog
    in_range = [sql.SQL("{} < {}").format(sql.Identifier(key), sql.SQL(upper))]
    if lower != "MINVALUE":
        in_range.append(sql.SQL("{} >= {}").format(sql.Identifier(key), sql.SQL(lower)))
    names = sql.SQL(", ").join(sql.Identifier(column) for column in columns)  # generated ones follow
    conn.execute(sql.SQL(
        "WITH moved AS (DELETE FROM {default} WHERE {in_range} RETURNING {names})"
        " INSERT INTO {leaf} ({names}) OVERRIDING SYSTEM VALUE SELECT {names} FROM moved"
    ).format(default=default, in_range=sql.SQL(" AND ").join(in_range), names=names,
             leaf=table_ident(leaf.table)))
