"""Every statement of the hot path, composed once per run from identifiers and kept together.

The garbage predicate is defined here and nowhere else; every DELETE repeats it, so a row that
stopped being garbage after it was picked (un-processed concurrently) is re-checked under the
row lock and survives.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from engine.config import TableSpec
from engine.db import table_ident

SET_BATCH_SETTINGS = sql.SQL(
    "SELECT set_config('lock_timeout', %(lock_timeout)s, true),"
    " set_config('statement_timeout', %(statement_timeout)s, true),"
    " set_config('synchronous_commit',"
    " coalesce(%(synchronous_commit)s, current_setting('synchronous_commit')), true)"
)
"""Transaction-local: a batch waits at most lock_timeout for a row lock, runs at most
statement_timeout, and with ``--async-commit`` does not wait for its WAL flush."""


def garbage_predicate(table: TableSpec, with_cutoff: bool) -> sql.Composable:
    """``processed_at IS NOT NULL`` and, with a retention, ``processed_at < %(cutoff)s``."""
    column = sql.Identifier(table.processed_at)
    if with_cutoff:
        return sql.SQL("{c} IS NOT NULL AND {c} < %(cutoff)s").format(c=column)
    return sql.SQL("{c} IS NOT NULL").format(c=column)


@dataclass(frozen=True)
class Archive:
    """Where ``--archive`` moves deleted rows, and the columns it copies."""

    table: TableSpec
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Statements:
    """The statements of one run; composed once so psycopg can prepare them."""

    table: TableSpec
    garbage: sql.Composable
    archive: Archive | None = None

    @classmethod
    def for_table(cls, table: TableSpec, with_cutoff: bool, archive: Archive | None = None) -> Statements:
        return cls(table=table, garbage=garbage_predicate(table, with_cutoff), archive=archive)

    def _moving(self, delete: sql.Composed) -> sql.Composed:
        """With an archive, the DELETE's rows are inserted there in the same statement."""
        if self.archive is None:
            return delete
        columns = sql.SQL(", ").join(map(sql.Identifier, self.archive.columns))
        return sql.SQL(
            "WITH gone AS ({delete} RETURNING {columns})"
            " INSERT INTO {archive} ({columns}, archived_at, run_id)"
            " SELECT {columns}, now(), %(run_id)s FROM gone"
        ).format(delete=delete, columns=columns, archive=table_ident(self.archive.table))

    def _format(self, template: str, **extra: sql.Composable) -> sql.Composed:
        return sql.SQL(template).format(
            t=table_ident(self.table),
            k=sql.Identifier(self.table.key),
            garbage=self.garbage,
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
        """The fast path: one DELETE over the range, waiting at most lock_timeout on a lock."""
        return self._moving(self._format("DELETE FROM {t} WHERE {range} AND {garbage}", range=range_))

    def delete_range_skip_locked(self, range_: sql.Composable, by_ctid: bool) -> sql.Composed:
        """The slow path after a lock timeout: lock what is free, leave what the app holds."""
        column = sql.SQL("ctid") if by_ctid else sql.Identifier(self.table.key)
        return self._moving(self._format(
            "DELETE FROM {t} WHERE {col} = ANY(ARRAY("
            "SELECT {col} FROM {t} WHERE {range} AND {garbage} FOR UPDATE SKIP LOCKED"
            ")) AND {garbage}",
            col=column,
            range=range_,
        ))

    def count_garbage_in(self, range_: sql.Composable) -> sql.Composed:
        """Garbage still present in a range after a skip-locked delete: the rows skipped."""
        return self._format("SELECT count(*) FROM {t} WHERE {range} AND {garbage}", range=range_)

    @property
    def delete_next_garbage(self) -> sql.Composed:
        """Pick the next garbage keys over the partial index and delete them, in one statement.

        ``key = ANY(ARRAY(...))`` keeps a primary-key lookup whatever the statistics say, where
        ``id IN (SELECT ... LIMIT n)`` may flip to a scan. Returns rows deleted, keys picked and
        the last key picked (the new position). With an archive, the deleted rows move there.
        """
        archive: sql.Composable = sql.SQL("")
        returning: sql.Composable = sql.SQL("1")
        if self.archive is not None:
            columns = sql.SQL(", ").join(map(sql.Identifier, self.archive.columns))
            returning = columns
            archive = sql.SQL(
                ", moved AS (INSERT INTO {archive} ({columns}, archived_at, run_id)"
                " SELECT {columns}, now(), %(run_id)s FROM gone)"
            ).format(archive=table_ident(self.archive.table), columns=columns)
        return self._format(
            "WITH picked AS MATERIALIZED ("
            "SELECT {k} FROM {t} WHERE {garbage} AND {k} > %(lo)s AND {k} <= %(end)s"
            " ORDER BY {k} LIMIT %(size)s),"
            " gone AS (DELETE FROM {t} WHERE {k} = ANY(ARRAY(SELECT {k} FROM picked))"
            " AND {garbage} RETURNING {returning}){archive}"
            " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM picked),"
            " (SELECT max({k}) FROM picked)",
            returning=returning,
            archive=archive,
        )

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
        """Rows and garbage rows in a block sample: the planner's density estimate."""
        return self._format(
            "SELECT count(*), count(*) FILTER (WHERE {garbage})"
            " FROM {t} TABLESAMPLE SYSTEM (%(percent)s) REPEATABLE (7)"
        )
