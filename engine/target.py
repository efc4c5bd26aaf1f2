"""The table a run collects, as the database describes it: its key, its garbage, its privileges.

An operator names a table, optionally its key columns, its processed column and a ``--where``
filter (:class:`engine.config.TableSpec`); this module checks all of it against the catalog once,
before any run exists, and answers what the walks may rely on: which key (the primary key by
default; none at all is fine for the physical walk), whether it is a single integer (the key-range
walk needs one), and the one garbage predicate every DELETE repeats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from engine.config import TableSpec
from engine.db import Connection, helpful_lines, one_row, primary_message, regclass_of, table_ident
from engine.errors import PermissionMissing, TargetTableError, UsageError
from engine.references import Reference, referencing

if TYPE_CHECKING:  # engine.predicate loads pglast (~60 ms): imported only when a --where is given
    from engine.predicate import Filter

DEFAULT_PROCESSED_COLUMN = "processed_at"
INTEGER_TYPES = ("bigint", "integer", "smallint")
TIME_TYPES = ("timestamp with time zone", "timestamp without time zone", "date")
FLAG_TYPES = ("boolean",)
ProcessedTest = Literal["IS NOT NULL", "IS TRUE"]
RELATION_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence",
                  "i": "an index", "I": "a partitioned index", "c": "a composite type", "t": "a TOAST table"}
PROBE_ROWS = 10_000
PROBE_TIMEOUT_MS = 2_000
"""Rows a ``--where`` is tried on before a run (see :func:`_try_on_rows`), and the time it may
take at most: past it (a heap whose first pages hold only dead rows), the try is given up."""
BOOKKEEPING_PRIVILEGES = (("gc_runs", "SELECT"), ("gc_runs", "INSERT"), ("gc_runs", "UPDATE"),
                          ("gc_outbox", "SELECT"), ("gc_outbox", "INSERT"), ("gc_outbox", "UPDATE"),
                          ("gc_sweep", "SELECT"), ("gc_sweep", "INSERT"), ("gc_sweep", "DELETE"))


@dataclass(frozen=True)
class Target:
    spec: TableSpec
    oid: int
    columns: dict[str, str]
    """Every column and its type (``format_type``), in table order."""
    key: tuple[str, ...]
    """The key the keyset walks order by; empty when the table has none (physical walk only)."""
    processed: str | None
    """The processed column (its test: :attr:`processed_test`); None when ``--where`` alone says."""
    filter: Filter | None
    references: tuple[Reference, ...] = ()
    """Foreign keys of other tables (or this one) onto it."""
    leaves: tuple[Target, ...] = ()
    """A partitioned table's leaf partitions, each a target of its own (a ctid is per leaf)."""
    processed_test: ProcessedTest = "IS NOT NULL"
    """How the processed column says garbage: a timestamp or a date once it IS NOT NULL, a boolean
    once it IS TRUE (``false`` is a row not processed yet, not garbage)."""

    @property
    def integer_key(self) -> bool:
        """A single integer key column: what the key-range walk needs (it does arithmetic on it)."""
        return len(self.key) == 1 and self.columns[self.key[0]] in INTEGER_TYPES

    @property
    def qualified(self) -> str:
        return self.spec.qualified

    def describe(self) -> str:
        """The garbage predicate in force, as the run record and ``msggc status`` show it."""
        parts = [f"{self.processed} {self.processed_test}"] if self.processed else []
        if self.filter is not None:
            parts.append(f"({self.filter.text})")
        return " AND ".join(parts)


def resolve(conn: Connection, spec: TableSpec, *, with_retention: bool = False) -> Target:
    """The checked target, or a :class:`UsageError` that says what to change."""
    target = _resolve(conn, spec, with_retention)
    if target.filter is not None:
        _try_on_rows(conn, target)
    return target


def _resolve(conn: Connection, spec: TableSpec, with_retention: bool) -> Target:
    oid, partitioned = _require_table(conn, spec)
    columns: dict[str, str] = dict(conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (oid,)).fetchall())
    flt = None
    if spec.where:
        from engine.predicate import check_volatility, parse_filter

        flt = parse_filter(spec.where, columns)
        check_volatility(conn, flt)
        _check_on_server(conn, spec, flt)
    leaves = tuple(_resolve(conn, leaf, with_retention) for leaf in _leaves(conn, oid, spec)
                   ) if partitioned else ()
    processed = _processed(spec, columns, flt)
    kind = _processed_type(conn, spec, oid, processed)
    target = Target(spec, oid, columns, _key(conn, spec, oid, columns), processed, flt,
                    referencing(conn, oid), leaves, "IS TRUE" if kind in FLAG_TYPES else "IS NOT NULL")
    if with_retention and (target.processed is None or kind not in TIME_TYPES):
        raise UsageError(
            f"--older-than needs a date/time processed column; {spec.qualified}."
            f"{target.processed or '(none)'} is {columns.get(target.processed or '', 'absent')}:"
            " name one with --processed-column, or write the age into --where")
    _require_privileges(conn, spec, oid)
    return target


def _check_on_server(conn: Connection, spec: TableSpec, flt: Filter) -> None:
    """The server plans it once (nothing runs): a filter that is not boolean, compares a text
    with a number or calls a function with the wrong arguments is refused here, in one line."""
    statement = sql.SQL("EXPLAIN SELECT FROM {} WHERE {}").format(
        table_ident(spec), sql.SQL(flt.sql.replace("%", "%%")))  # validated: no placeholder in it
    try:
        with conn.transaction():
            conn.execute(statement, {})  # with parameters, as every statement holding the filter:
            # psycopg reads '%%' back as '%' only then (without, `n % 2` reached the server as `n %% 2`)
    except (psycopg.DataError, psycopg.ProgrammingError, psycopg.NotSupportedError) as exc:
        raise UsageError(f"--where: {primary_message(exc)}: {flt.text}{helpful_lines(exc)}") from None


def _try_on_rows(conn: Connection, target: Target) -> None:
    """The garbage predicate on the table's first ``PROBE_ROWS`` rows (a few milliseconds): a filter
    the server plans but that raises on the table's own values (``n / 0 = 1``, ``status::int = 1``
    where a status reads ``'x'``) is refused here, before any run exists, with the server's reason;
    one that raises only on rows further on fails its run, in one line too (the walk's failure)."""
    from engine.queries import garbage_predicate  # engine.queries imports this module

    statement = sql.SQL(
        "SELECT count(*) FILTER (WHERE {garbage}) FROM (SELECT * FROM {t} LIMIT %(rows)s) AS msggc_probe"
    ).format(garbage=garbage_predicate(target, with_cutoff=False), t=table_ident(target.spec))
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{PROBE_TIMEOUT_MS}ms",))
            conn.execute(statement, {"rows": PROBE_ROWS})
    except RAISED_BY_ROWS as exc:
        raise filter_failed(exc, target.spec) from None
    except pg_errors.QueryCanceled:  # a bloated head of the table: the planner and the walk tell
        pass


RAISED_BY_ROWS = (psycopg.DataError, psycopg.NotSupportedError, pg_errors.RaiseException)
"""What a filter the server planned may still raise on the rows it meets: a data exception
(SQLSTATE class 22), a feature the server refuses at run time, an application function's RAISE."""


def filter_failed(exc: psycopg.Error, spec: TableSpec) -> UsageError:
    """A ``--where`` that raised on the table's rows (:data:`RAISED_BY_ROWS`), said in one line."""
    return UsageError(f"--where: {primary_message(exc)} (on a row of {spec.qualified}): {spec.where}"
                      f"{helpful_lines(exc)}")


@contextmanager
def filter_refused_on_rows(spec: TableSpec) -> Iterator[None]:
    """Around what reads the table's rows before a run exists (the planner's samples, a dry run's
    rolled-back batches): a ``--where`` that raises on a row there is refused like one that raised
    on the rows tried at resolve, for the CLI, the Python API and the service's queued runs alike
    (the worker closes those ``failed`` with this line), never a traceback."""
    try:
        yield
    except RAISED_BY_ROWS as exc:
        if spec.where is None:
            raise
        raise filter_failed(exc, spec) from None


def locate(conn: Connection, spec: TableSpec) -> tuple[int, tuple[str, ...]]:
    """The table's oid and key, for what only moves its rows back (restore)."""
    oid, _ = _require_table(conn, spec)
    columns = [name for (name,) in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,))]
    return oid, _key(conn, spec, oid, columns)


def _require_table(conn: Connection, spec: TableSpec) -> tuple[int, bool]:
    """The table's oid, and whether it is partitioned (then its leaves are walked, one by one)."""
    oid = regclass_of(conn, spec)
    if oid is None:
        hint = "run `msggc migrate` first" if spec.name == "messages" else "check --table (SCHEMA.NAME)"
        raise TargetTableError(f"table {spec.qualified} does not exist: {hint}")
    kind = one_row(conn.execute("SELECT relkind FROM pg_class WHERE oid = %s", (oid,)))[0]
    if kind not in ("r", "p"):
        raise TargetTableError(f"{spec.qualified} is {RELATION_KINDS.get(kind, 'not a table')}, not a table")
    return int(oid), kind == "p"


def _leaves(conn: Connection, oid: int, spec: TableSpec) -> list[TableSpec]:
    """Every leaf partition under the table (sub-partitions included), each described like it."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_partition_tree(%s::regclass) t"
        " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE t.isleaf ORDER BY n.nspname, c.relname", (oid,)).fetchall()
    return [dataclasses.replace(spec, schema=schema, name=name) for schema, name in rows]


def _key(conn: Connection, spec: TableSpec, oid: int, columns: Collection[str]) -> tuple[str, ...]:
    """The named key columns, else the primary key's, else none."""
    if spec.key:
        unknown = [name for name in spec.key if name not in columns]
        if unknown:
            raise TargetTableError(f"--key: table {spec.qualified} has no column {unknown[0]!r}")
        if not _unique(conn, oid, spec.key):
            raise TargetTableError(
                f"--key: ({', '.join(spec.key)}) is not unique in {spec.qualified}: a keyset walk would"
                " skip rows sharing a value; name the columns of its primary key or of a unique index")
        return spec.key
    return primary_key(conn, oid)


def _unique(conn: Connection, oid: int, key: tuple[str, ...]) -> bool:
    """A valid unique index (or the primary key) on some of these columns: no two rows share them."""
    return bool(one_row(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = %(oid)s AND i.indisunique"
        " AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL"
        " AND (SELECT array_agg(a.attname::text) FROM pg_attribute a"
        "      WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) <@ %(key)s::text[])",
        {"oid": oid, "key": list(key)}))[0])


def primary_key(conn: Connection, oid: int) -> tuple[str, ...]:
    return tuple(name for (name,) in conn.execute(
        "SELECT a.attname FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n", (oid,)))


def _processed(spec: TableSpec, columns: dict[str, str], flt: Filter | None) -> str | None:
    """The named processed column; else ``processed_at`` if the table has one; else none, which
    only ``--where`` may make up for (garbage must be defined by something)."""
    name = spec.processed_column
    if name is not None:
        if name not in columns:
            raise TargetTableError(f"--processed-column: table {spec.qualified} has no column {name!r}")
        return name
    if DEFAULT_PROCESSED_COLUMN in columns:
        return DEFAULT_PROCESSED_COLUMN
    if flt is not None:
        return None
    raise TargetTableError(
        f"table {spec.qualified} has no column {DEFAULT_PROCESSED_COLUMN!r}: name the column that marks"
        " a message processed with --processed-column, or define garbage with --where")


_BASE_TYPE = """
WITH RECURSIVE base(typ, depth) AS (
    SELECT atttypid, 0 FROM pg_attribute WHERE attrelid = %(oid)s AND attname = %(column)s
    UNION ALL
    SELECT t.typbasetype, depth + 1 FROM base JOIN pg_type t ON t.oid = base.typ WHERE t.typtype = 'd'
)
SELECT format_type(typ, NULL) FROM base ORDER BY depth DESC LIMIT 1
"""


def _processed_type(conn: Connection, spec: TableSpec, oid: int, column: str | None) -> str | None:
    """The processed column's type under its domains, without modifiers (``timestamp(3) with time
    zone`` is a timestamp). Only a time or a flag says garbage on its own: ``IS NOT NULL`` on a
    boolean would take the ``false`` rows, on a text column the empty or ``'no'`` ones."""
    if column is None:
        return None
    kind = str(one_row(conn.execute(_BASE_TYPE, {"oid": oid, "column": column}))[0])
    if kind in TIME_TYPES + FLAG_TYPES:
        return kind
    problem = (f"{spec.qualified}.{column} is {kind}, not a timestamp or a date (garbage once set) or a"
               " boolean (garbage once true)")
    if spec.processed_column is not None:
        raise TargetTableError(f"--processed-column: {problem}: say what garbage is with --where instead")
    raise TargetTableError(f"the processed column {problem}: name the column that marks a row processed"
                           " with --processed-column")


def _require_privileges(conn: Connection, spec: TableSpec, oid: int) -> None:
    if not one_row(conn.execute("SELECT has_table_privilege(%s::oid, 'DELETE')", (oid,)))[0]:
        raise PermissionMissing(f"the database role may not DELETE from {spec.qualified}")
    for name, privilege in BOOKKEEPING_PRIVILEGES:
        if not one_row(conn.execute("SELECT has_table_privilege(%s, %s)", (name, privilege)))[0]:
            raise PermissionMissing(f"the database role may not {privilege} {name}: it cannot record"
                                    " the run (grant SELECT, INSERT, UPDATE on gc_runs and gc_outbox,"
                                    " SELECT, INSERT, DELETE on gc_sweep)")
