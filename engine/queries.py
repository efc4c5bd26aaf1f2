"""Every statement of the hot path, composed once per run from identifiers and kept together.

The garbage predicate is defined here and nowhere else; every DELETE repeats it, so a row that
stopped being garbage after it was picked (un-processed concurrently) is re-checked under the
row lock and survives. The foreign keys' parts of them (a child row that holds a row, a
self-referencing table's subtrees) are composed in :mod:`engine.reference_queries`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

from psycopg import sql

from engine.config import TableSpec
from engine.db import table_ident
from engine.reference_queries import garbage_subtrees, held_by, referenced, refuse_unsafe_self_references
from engine.references import Reference
from engine.target import Target

SET_BATCH_SETTINGS = sql.SQL(
    "SELECT set_config('lock_timeout', %(lock_timeout)s, true),"
    " set_config('statement_timeout', %(statement_timeout)s, true),"
    " set_config('synchronous_commit',"
    " coalesce(%(synchronous_commit)s, current_setting('synchronous_commit')), true),"
    " set_config('jit', 'off', true)"
)
"""Transaction-local: a batch waits at most lock_timeout for a row lock, runs at most
statement_timeout, and with ``--async-commit`` does not wait for its WAL flush. No JIT: a batch
is short, and the recursive statement of a table that references itself is estimated far above
``jit_above_cost`` (measured: 0.67 s of compilation for a 40 ms batch)."""

SET_SWEEP_SETTINGS = sql.SQL(
    "SELECT set_config('lock_timeout', %(lock_timeout)s, true), set_config('statement_timeout', '0', true)"
)
"""The sweep's read of the keys scans the whole table and locks no row: statement_timeout,
which bounds how long a batch holds its row locks, does not apply to it."""


def garbage_predicate(target: Target, with_cutoff: bool) -> sql.Composable:
    """The processed column's test (IS NOT NULL, or IS TRUE for a boolean; older than the cutoff
    with a retention), and the operator's ``--where`` filter, re-rendered from its validated parse
    tree."""
    parts: list[sql.Composable] = []
    if target.processed is not None:
        column = sql.Identifier(target.processed)
        parts.append(sql.SQL("{c} {test}").format(c=column, test=sql.SQL(target.processed_test)))
        if with_cutoff:
            parts.append(sql.SQL("{c} < %(cutoff)s").format(c=column))
    if target.filter is not None:
        # validated, then re-rendered from its parse tree; it holds no placeholder (they are
        # refused), so a '%' in it (LIKE 'vip%') is the operator's text, escaped for psycopg
        parts.append(sql.SQL(target.filter.sql.replace("%", "%%")))
    return sql.SQL(" AND ").join(parts)


@dataclass(frozen=True)
class Archive:
    """Where ``--archive`` moves deleted rows, and the columns it copies."""

    table: TableSpec
    columns: tuple[str, ...]
    stream: bool = False
    """``--archive-to``: the DELETE runs inside ``COPY (...) TO STDOUT`` and its rows, with the
    bookkeeping columns, stream to the client as CSV (``table`` is not written)."""


STREAM_OPTIONS = sql.SQL("(FORMAT csv)")


@dataclass(frozen=True)
class Statements:
    """The statements of one run; composed once so psycopg can prepare them (what each batch
    asks of its foreign keys is worked out once too: ``cached_property``)."""

    target: Target
    garbage: sql.Composable
    """What makes a row garbage (counted, sampled)."""
    deletable: sql.Composable
    """Garbage that may go: no blocking foreign key holds it (every DELETE re-checks this)."""
    archive: Archive | None = None
    delete_dependents: bool = False
    child_archives: dict[str, Archive] = field(default_factory=dict)
    """Per constraint, where ``--archive`` keeps the child rows a delete removes with the parent."""

    @classmethod
    def for_target(cls, target: Target, with_cutoff: bool, archive: Archive | None = None,
                   delete_dependents: bool = False,
                   child_archives: dict[str, Archive] | None = None) -> Statements:
        refuse_unsafe_self_references(target)
        garbage = garbage_predicate(target, with_cutoff)
        holding = [ref for ref in target.references
                   if ref.blocks and not ref.deletes_dependents(delete_dependents)]
        deletable = sql.SQL(" AND ").join(
            [garbage, *(sql.SQL("NOT {}").format(referenced(target, ref)) for ref in holding)])
        archives = {name: archive for name, archive in (child_archives or {}).items()
                    if name not in {ref.name for ref in target.references if ref.self_referencing}}
        return cls(target=target, garbage=garbage, deletable=deletable, archive=archive,
                   delete_dependents=delete_dependents, child_archives=archives)

    @cached_property
    def kept_by(self) -> tuple[Reference, ...]:
        """The foreign keys whose referenced garbage rows stay (and are counted): a key of the
        table onto itself always."""
        return tuple(r for r in self.target.references
                     if r.blocks and not r.deletes_dependents(self.delete_dependents))

    @cached_property
    def changes_children(self) -> tuple[Reference, ...]:
        """The foreign keys whose child rows a batch deletes or changes (counted before it)."""
        return tuple(r for r in self.target.references
                     if not r.blocks or r.deletes_dependents(self.delete_dependents))

    @cached_property
    def self_references(self) -> tuple[Reference, ...]:
        """The keys of the table onto itself: a garbage row goes only with its whole subtree."""
        return tuple(r for r in self.target.references if r.self_referencing)

    @cached_property
    def _holding_others(self) -> tuple[Reference, ...]:
        return tuple(r for r in self.kept_by if not r.self_referencing)

    def _held_by_others(self, outer: str | None = None) -> sql.Composable:
        """The row is referenced by a child of another table that holds it."""
        return held_by(self.target, self._holding_others, outer)

    def _subtrees(self, range_: sql.Composable) -> sql.Composed:
        """The rows a DELETE of the range takes when the table references itself (see
        :func:`engine.reference_queries.garbage_subtrees`)."""
        return garbage_subtrees(self.target, self.self_references, self._holding_others, self.garbage,
                                range_)

    @cached_property
    def changes_seen_in_statistics(self) -> tuple[Reference, ...]:
        """The keys whose child rows PostgreSQL deletes or updates itself, counted from the batch
        transaction's own statistics of the child table (no second pass over the range): those
        not archived, onto another table, and the child's only key onto this one (so that every
        change the transaction made there is theirs)."""
        per_child = Counter(ref.child_oid for ref in self.target.references)
        return tuple(ref for ref in self.target.references
                     if not ref.blocks and ref.name not in self.child_archives and not ref.child_partitioned
                     and per_child[ref.child_oid] == 1 and ref.child_oid != self.target.oid)

    @cached_property
    def child_changes(self) -> sql.Composed:
        """This transaction's deletes (CASCADE) or updates (SET NULL/DEFAULT) of each such child."""
        return sql.SQL("SELECT {}").format(sql.SQL(", ").join(
            sql.SQL("pg_stat_get_xact_tuples_{}({})").format(
                sql.SQL("deleted" if ref.removes_children else "updated"), sql.Literal(ref.child_oid))
            for ref in self.changes_seen_in_statistics))

    @property
    def has_dependents(self) -> bool:
        return bool(self.target.references)

    @property
    def ranges_only(self) -> bool:
        """Batches delete a range known before the delete (see ``strategies._delete_range``): the
        child rows of a foreign key are handled first, or the deleted rows stream out through
        COPY, which returns them and no counts of what a pick-and-delete statement picked."""
        return self.has_dependents or (self.archive is not None and self.archive.stream)

    # -- child rows of a range's deletable garbage ------------------------------------------

    def _children_of(self, ref: Reference, range_: sql.Composable,
                     predicate: sql.Composable, exact: bool = False) -> sql.Composed:
        """The child rows of ``ref`` whose parent in ``range_`` passes ``predicate``; when the
        table references itself, whose parent the range's DELETE takes (:meth:`delete_range`:
        subtrees reach past the range), unless ``range_`` is ``exact``: the rows locked for
        :meth:`delete_locked`, which takes no subtree."""
        if self.self_references and not exact:
            range_ = sql.SQL("ctid = ANY(ARRAY({}))").format(self._subtrees(range_))
            predicate = sql.SQL("{} AND NOT ({})").format(self.garbage, self._held_by_others())
        template = "ROW({child_cols}) IN (SELECT {parent_cols} FROM {t} WHERE {range} AND {pred})"
        return sql.SQL(template).format(
            child_cols=sql.SQL(", ").join(sql.Identifier("msggc_child", c) for c in ref.child_columns),
            parent_cols=sql.SQL(", ").join(map(sql.Identifier, ref.parent_columns)),
            t=table_ident(self.table), range=range_, pred=predicate)

    def count_children(self, ref: Reference, range_: sql.Composable, exact: bool = False) -> sql.Composed:
        return sql.SQL("SELECT count(*) FROM {child} AS msggc_child WHERE {match}").format(
            child=table_ident(ref.child), match=self._children_of(ref, range_, self.deletable, exact))

    def delete_children(self, ref: Reference, range_: sql.Composable, exact: bool = False) -> sql.Composed:
        """``--delete-dependents``: the child rows that hold the range's garbage go first."""
        return sql.SQL("DELETE FROM {child} AS msggc_child WHERE {match}").format(
            child=table_ident(ref.child), match=self._children_of(ref, range_, self.garbage, exact))

    def archive_children(self, ref: Reference, range_: sql.Composable, archive: Archive,
                         exact: bool = False) -> sql.Composed:
        """The child rows about to go with their parents, copied to the child's archive."""
        columns = sql.SQL(", ").join(map(sql.Identifier, archive.columns))
        return sql.SQL(
            "INSERT INTO {archive} ({columns}, archived_at, run_id)"
            " SELECT {columns}, now(), %(run_id)s FROM {child} AS msggc_child WHERE {match}"
        ).format(archive=table_ident(archive.table), columns=columns, child=table_ident(ref.child),
                 match=self._children_of(ref, range_, self.deletable if not ref.blocks else self.garbage,
                                         exact))

    def sample_foreign_key(self, ref: Reference) -> sql.Composed:
        """In a block sample of the table: the garbage rows ``ref`` holds, or the child rows a
        delete of the sample's deletable garbage would change (``--dry-run``'s estimate)."""
        sample = self._format("{t} TABLESAMPLE SYSTEM (%(percent)s) REPEATABLE (7)")
        if ref in self.kept_by:  # a key onto the table itself: held by a row that stays (one level)
            staying = sql.SQL("({}) IS NOT TRUE").format(self.garbage) if ref.self_referencing else None
            return sql.SQL("SELECT count(*) FROM {sample} WHERE {garbage} AND {held}").format(
                sample=sample, garbage=self.garbage, held=referenced(self.target, ref, child_test=staying))
        parents = sql.SQL("SELECT {cols} FROM {sample} WHERE {pred}").format(
            cols=sql.SQL(", ").join(map(sql.Identifier, ref.parent_columns)), sample=sample,
            pred=self.garbage if ref.blocks else self.deletable)
        return sql.SQL("SELECT count(*) FROM {child} AS msggc_child WHERE ROW({cols}) IN ({parents})").format(
            child=table_ident(ref.child), parents=parents,
            cols=sql.SQL(", ").join(sql.Identifier("msggc_child", c) for c in ref.child_columns))

    def count_kept(self, range_: sql.Composable) -> sql.Composed:
        """Per holding foreign key, the range's garbage rows left because a child references them."""
        counts = sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {})").format(
            referenced(self.target, ref)) for ref in self.kept_by)
        return self._format("SELECT {counts} FROM {t} WHERE {range} AND {garbage}", counts=counts,
                            range=range_)

    @property
    def table(self) -> TableSpec:
        return self.target.spec

    def _moving(self, delete: sql.Composed) -> sql.Composed:
        """With an archive, the DELETE's rows are inserted there in the same statement."""
        if self.archive is None:
            return delete
        columns = sql.SQL(", ").join(map(sql.Identifier, self.archive.columns))
        if self.archive.stream:
            return sql.SQL("COPY ({delete} RETURNING {columns}, now(), %(run_id)s::bigint)"
                           " TO STDOUT {options}").format(delete=delete, columns=columns,
                                                          options=STREAM_OPTIONS)
        return sql.SQL(
            "WITH gone AS ({delete} RETURNING {columns})"
            " INSERT INTO {archive} ({columns}, archived_at, run_id)"
            " SELECT {columns}, now(), %(run_id)s FROM gone"
        ).format(delete=delete, columns=columns, archive=table_ident(self.archive.table))

    def _format(self, template: str, **extra: sql.Composable) -> sql.Composed:
        return sql.SQL(template).format(
            t=table_ident(self.table),
            k=sql.Identifier(self.target.key[0]) if self.target.key else sql.SQL("ctid"),
            garbage=self.garbage,
            deletable=self.deletable,
            **extra,
        )

    # -- ranges: a batch is a half-open block range or a key range (lo, hi] -------------------

    @property
    def block_range(self) -> sql.Composable:
        return sql.SQL("ctid >= %(lo_tid)s::tid AND ctid < %(hi_tid)s::tid")

    @property
    def key_range(self) -> sql.Composable:
        return self._format("{k} > %(lo)s AND {k} <= %(hi)s")

    # -- deletes ---------------------------------------------------------------------------

    def delete_range(self, range_: sql.Composable) -> sql.Composed:
        """The fast path: one DELETE over the range, waiting at most lock_timeout on a lock. When
        the table references itself, the range's garbage goes with its garbage subtrees, found
        first (:meth:`_subtrees`), and every row is re-checked as it is deleted."""
        if self.self_references:
            return self._moving(self._format(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY({subtrees})) AND {garbage} AND NOT ({held})",
                subtrees=self._subtrees(range_), held=self._held_by_others()))
        return self._moving(self._format("DELETE FROM {t} WHERE {range} AND {deletable}", range=range_))

    def lock_free_garbage(self, range_: sql.Composable, by_ctid: bool) -> sql.Composed:
        """The slow path after a lock timeout: lock the range's garbage the application does not
        hold, and return it; the batch then archives, counts and deletes exactly those rows
        (:meth:`locked`), so a child row of a parent left behind is never archived."""
        return self._format("SELECT {col} FROM {t} WHERE {range} AND {garbage} FOR UPDATE SKIP LOCKED",
                            col=self._row_column(by_ctid), range=range_)

    def locked(self, by_ctid: bool) -> sql.Composed:
        """The rows :meth:`lock_free_garbage` locked (parameter ``msggc_locked``), as a range."""
        cast = sql.SQL("::tid[]" if by_ctid else "")
        return sql.SQL("{col} = ANY(%(msggc_locked)s{cast})").format(col=self._row_column(by_ctid), cast=cast)

    def delete_locked(self, by_ctid: bool) -> sql.Composed:
        """Delete the locked rows that are still deletable (none can have changed: they are ours)."""
        return self._moving(self._format("DELETE FROM {t} WHERE {locked} AND {deletable}",
                                         locked=self.locked(by_ctid)))

    def _row_column(self, by_ctid: bool) -> sql.Composable:
        return sql.SQL("ctid") if by_ctid else sql.Identifier(self.target.key[0])

    def count_garbage_in(self, range_: sql.Composable) -> sql.Composed:
        """Garbage still present in a range after a skip-locked delete: the rows skipped."""
        return self._format("SELECT count(*) FROM {t} WHERE {range} AND {deletable}", range=range_)

    @property
    def delete_next_garbage(self) -> sql.Composed:
        """Pick the next garbage keys over the partial index and delete them, in one statement.

        ``key = ANY(ARRAY(...))`` keeps a primary-key lookup whatever the statistics say, where
        ``id IN (SELECT ... LIMIT n)`` may flip to a scan. Returns rows deleted, keys picked and
        the last key picked (the new position). With an archive, the deleted rows move there.
        """
        return self._pick_and_delete(
            self._format("SELECT {k} FROM {t} WHERE {deletable} AND {k} > %(lo)s AND {k} <= %(end)s"
                         " ORDER BY {k} LIMIT %(size)s"),
            self._format("{k} = ANY(ARRAY(SELECT {k} FROM picked))"),
            self._format("max({k}) FROM picked"),
        )

    def delete_next_by_key(self, has_after: bool) -> sql.Composed:
        """The same for any ordered key: the next garbage rows after ``after`` in key order,
        deleted by their key (and re-checked); the last key comes back as text values. By key,
        not by ctid: a row the application updates meanwhile has a new ctid but the same key,
        and must not be passed by."""
        return self._pick_and_delete(
            self._format("SELECT {keys} FROM {t} WHERE {deletable}{after}"
                         " ORDER BY {keys} LIMIT %(size)s", keys=self._keys, after=self._after(has_after)),
            sql.SQL("ROW({keys}) IN (SELECT {keys} FROM picked)").format(keys=self._keys),
            sql.SQL("{texts} FROM picked ORDER BY {desc} LIMIT 1").format(texts=self._key_texts,
                                                                          desc=self._keys_desc),
        )

    def _pick_and_delete(self, picked: sql.Composable, match: sql.Composable,
                         last: sql.Composable) -> sql.Composed:
        archive: sql.Composable = sql.SQL("")
        returning: sql.Composable = sql.SQL("1")
        if self.archive is not None and self.archive.stream:
            raise TypeError("a streamed archive deletes ranges only (see ranges_only)")
        if self.archive is not None:
            columns = sql.SQL(", ").join(map(sql.Identifier, self.archive.columns))
            returning = columns
            archive = sql.SQL(
                ", moved AS (INSERT INTO {archive} ({columns}, archived_at, run_id)"
                " SELECT {columns}, now(), %(run_id)s FROM gone)"
            ).format(archive=table_ident(self.archive.table), columns=columns)
        return self._format(
            "WITH picked AS MATERIALIZED ({picked}),"
            " gone AS (DELETE FROM {t} WHERE {match} AND {deletable} RETURNING {returning}){archive}"
            " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM picked), (SELECT {last})",
            picked=picked, match=match, last=last, returning=returning, archive=archive,
        )

    # -- ordered keys: positions are the key's values as text, compared as a row -------------

    @staticmethod
    def key_values(prefix: str, values: list[str] | None) -> dict[str, str]:
        """The parameters of a key position (none before the first)."""
        return {f"{prefix}_{i}": value for i, value in enumerate(values or ())}

    @property
    def _keys(self) -> sql.Composable:
        return sql.SQL(", ").join(map(sql.Identifier, self.target.key))

    @property
    def _keys_desc(self) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(k)) for k in self.target.key)

    @property
    def _key_texts(self) -> sql.Composable:
        return sql.SQL("ARRAY[{}]").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in self.target.key))

    def _key_row(self, prefix: str) -> sql.Composable:
        """``ROW(%(prefix_0)s, ...)``: text parameters the server reads as the key's types."""
        return sql.SQL("ROW({})").format(sql.SQL(", ").join(
            sql.Placeholder(f"{prefix}_{i}") for i in range(len(self.target.key))))

    def _after(self, has_after: bool) -> sql.Composable:
        if not has_after:
            return sql.SQL("")
        return sql.SQL(" AND ROW({keys}) > {after}").format(keys=self._keys, after=self._key_row("after"))

    def ordered_range(self, has_after: bool, has_hi: bool) -> sql.Composable:
        """Keys after ``after`` up to ``hi`` included (open on a missing side)."""
        bounds: list[sql.Composable] = [sql.SQL("TRUE")]
        if has_after:
            bounds.append(sql.SQL("ROW({}) > {}").format(self._keys, self._key_row("after")))
        if has_hi:
            bounds.append(sql.SQL("ROW({}) <= {}").format(self._keys, self._key_row("hi")))
        return sql.SQL(" AND ").join(bounds)

    def ordered_garbage_bound(self, has_after: bool) -> sql.Composed:
        """The key of the garbage row ``offset + 1`` ahead, in key order."""
        return self._format("SELECT {texts} FROM {t} WHERE {garbage}{after} ORDER BY {keys}"
                            " OFFSET %(offset)s LIMIT 1", texts=self._key_texts, keys=self._keys,
                            after=self._after(has_after))

    # -- the sweep: keys read after the walk, deleted by key -------------------------------

    @property
    def fill_sweep(self) -> sql.Composed:
        """The keys of the table's deletable garbage now, numbered 1..n for the run and leaf; one
        statement, so one snapshot: a row the application moves meanwhile is read once."""
        stored = (sql.SQL(", ").join(sql.SQL("{}, {}").format(sql.Literal(k), sql.Identifier(k))
                                     for k in self.target.key)
                  if self.target.key else sql.SQL("'ctid', ctid"))
        return self._format("INSERT INTO gc_sweep (run_id, leaf, n, key)"
                            " SELECT %(run_id)s, %(leaf)s, row_number() OVER (), jsonb_build_object({stored})"
                            " FROM {t} WHERE {deletable}", stored=stored)

    @property
    def sweep_range(self) -> sql.Composable:
        """The rows of the sweep's keys (lo, hi]: found by key wherever they have moved since
        (by address for a table without a key)."""
        picked = sql.SQL("msggc_sweep.run_id = %(run_id)s AND msggc_sweep.leaf = %(leaf)s"
                         " AND msggc_sweep.n > %(lo)s AND msggc_sweep.n <= %(hi)s")
        if not self.target.key:
            return sql.SQL("ctid = ANY(ARRAY(SELECT (msggc_sweep.key ->> 'ctid')::tid"
                           " FROM gc_sweep AS msggc_sweep WHERE {picked}))").format(picked=picked)
        return self._format(
            "ROW({keys}) IN (SELECT {typed} FROM gc_sweep AS msggc_sweep,"
            " jsonb_populate_record(NULL::{t}, msggc_sweep.key) AS msggc_key WHERE {picked})",
            keys=self._keys, picked=picked,
            typed=sql.SQL(", ").join(sql.Identifier("msggc_key", k) for k in self.target.key))

    # -- probes ----------------------------------------------------------------------------

    @property
    def key_upper_bound(self) -> sql.Composed:
        """The key ``size`` rows ahead: an index-only probe on the primary key."""
        return self._format(
            "SELECT {k} FROM {t} WHERE {k} > %(lo)s AND {k} <= %(end)s"
            " ORDER BY {k} OFFSET %(offset)s LIMIT 1"
        )

    @property
    def garbage_upper_bound(self) -> sql.Composed:
        """The key of the garbage row ``offset + 1`` ahead, over the partial index."""
        return self._format(
            "SELECT {k} FROM {t} WHERE {garbage} AND {k} > %(lo)s AND {k} <= %(end)s"
            " ORDER BY {k} OFFSET %(offset)s LIMIT 1"
        )

    @property
    def key_bounds(self) -> sql.Composed:
        return self._format("SELECT min({k}), max({k}) FROM {t}")

    @property
    def sample_garbage(self) -> sql.Composed:
        """Rows, garbage rows, and blocks holding garbage in a block sample: the planner's
        density estimate, and how many garbage rows a deleted page holds (the guard's pages
        dirtied per row)."""
        return self._format(
            "SELECT count(*), count(*) FILTER (WHERE {garbage}),"
            " count(DISTINCT (ctid::text::point)[0]) FILTER (WHERE {garbage})"
            " FROM {t} TABLESAMPLE SYSTEM (%(percent)s) REPEATABLE (7)"
        )
