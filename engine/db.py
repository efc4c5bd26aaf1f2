"""The thin connector layer: every connection msggc opens goes through here.

It turns driver failures a user can cause (wrong DSN, server down, missing table, missing
privilege) into the errors of :mod:`engine.errors`, with the DSN's password masked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from engine.config import TableSpec, mask_dsn, scrub_dsn
from engine.errors import DatabaseUnreachable, PermissionMissing, SchemaMissing, TargetTableError

CONNECT_TIMEOUT_S = 5
APPLICATION_NAME = "msggc"

Row = tuple[Any, ...]
Connection = psycopg.Connection[Row]
Cursor = psycopg.Cursor[Row]


def one_row(cursor: Cursor) -> Row:
    """The row of a query that always returns exactly one (a function call, an aggregate,
    ``EXISTS``, an ``INSERT ... RETURNING``): its absence is a bug, not a state of the data."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row where one row is always expected")
    return row


def connect(dsn: str, *, autocommit: bool = True, timeout_s: float = CONNECT_TIMEOUT_S) -> Connection:
    """Open a connection or raise :class:`DatabaseUnreachable` with a one-line reason."""
    try:
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=max(1, round(timeout_s)),
            application_name=APPLICATION_NAME,
        )
    except psycopg.OperationalError as exc:
        reason = scrub_dsn(str(exc), dsn) or type(exc).__name__
        raise DatabaseUnreachable(f"cannot connect to {mask_dsn(dsn)}: {reason}") from None
    except psycopg.ProgrammingError as exc:
        raise DatabaseUnreachable(f"invalid DSN {mask_dsn(dsn)}: {scrub_dsn(str(exc), dsn)}") from None


@contextmanager
def connection(dsn: str, *, autocommit: bool = True) -> Iterator[Connection]:
    with connect(dsn, autocommit=autocommit) as conn:
        yield conn


def table_ident(table: TableSpec) -> sql.Composable:
    if table.schema:
        return sql.Identifier(table.schema, table.name)
    return sql.Identifier(table.name)


def regclass_of(conn: Connection, table: TableSpec) -> int | None:
    """The table's oid, or None when it does not exist (no string formatting: to_regclass)."""
    ident = table_ident(table).as_string(conn)
    row = conn.execute("SELECT to_regclass(%s)::oid", (ident,)).fetchone()
    return row[0] if row and row[0] is not None else None


def require_bookkeeping(conn: Connection) -> None:
    """msggc's own tables must exist before any run."""
    row = conn.execute(
        "SELECT to_regclass('gc_runs') IS NOT NULL AND to_regclass('gc_outbox') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        raise SchemaMissing("msggc tables are missing in this database: run `msggc migrate` first")


RELATION_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence",
                  "i": "an index", "I": "a partitioned index", "c": "a composite type", "t": "a TOAST table"}
BOOKKEEPING_PRIVILEGES = (("gc_runs", "SELECT"), ("gc_runs", "INSERT"), ("gc_runs", "UPDATE"),
                          ("gc_outbox", "SELECT"), ("gc_outbox", "INSERT"), ("gc_outbox", "UPDATE"))


def require_target(conn: Connection, table: TableSpec) -> int:
    """The target must be an existing plain table with its key and processed-at columns, the
    role must be allowed to DELETE from it and to record the run in msggc's own tables."""
    oid = regclass_of(conn, table)
    if oid is None:
        raise TargetTableError(
            f"table {table.qualified} does not exist: run `msggc migrate` first"
            " (or pass --table for another table)"
        )
    kind = one_row(conn.execute("SELECT relkind FROM pg_class WHERE oid = %s", (oid,)))[0]
    if kind == "p":  # its own heap is empty: a walk over it would find nothing and say complete
        raise TargetTableError(
            f"{table.qualified} is a partitioned table: collect each partition with --table PARTITION"
        )
    if kind != "r":
        raise TargetTableError(f"{table.qualified} is {RELATION_KINDS.get(kind, 'not a table')}, not a table")
    columns = {
        name: type_
        for name, type_ in conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (oid,),
        )
    }
    for column in (table.key, table.processed_at):
        if column not in columns:
            raise TargetTableError(f"table {table.qualified} has no column {column!r}")
    if columns[table.key] not in ("bigint", "integer", "smallint"):
        raise TargetTableError(
            f"column {table.qualified}.{table.key} must be an integer key, not {columns[table.key]}"
        )
    if not columns[table.processed_at].startswith("timestamp"):
        raise TargetTableError(
            f"column {table.qualified}.{table.processed_at} must be a timestamp,"
            f" not {columns[table.processed_at]}"
        )
    allowed = conn.execute("SELECT has_table_privilege(%s::oid, 'DELETE')", (oid,)).fetchone()
    if not allowed or not allowed[0]:
        raise PermissionMissing(f"the database role may not DELETE from {table.qualified}")
    for name, privilege in BOOKKEEPING_PRIVILEGES:
        if not one_row(conn.execute("SELECT has_table_privilege(%s, %s)", (name, privilege)))[0]:
            raise PermissionMissing(f"the database role may not {privilege} {name}: it cannot record"
                                    " the run (grant SELECT, INSERT, UPDATE on gc_runs and gc_outbox)")
    return oid


def is_user_fault(exc: BaseException) -> bool:
    """Errors caused by the environment, not by a bug: reported as one line."""
    return isinstance(exc, (pg_errors.InsufficientPrivilege, pg_errors.UndefinedTable))


def user_fault(exc: BaseException) -> str | None:
    """The one-line reason of an environment error (also when SQLAlchemy wraps it), else None."""
    cause = getattr(exc, "orig", None) or exc
    if not is_user_fault(cause):
        return None
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__
