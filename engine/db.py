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
from engine.errors import DatabaseUnreachable, SchemaMissing

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
    """msggc's own tables must exist, up to the newest, before any run."""
    row = conn.execute(
        "SELECT to_regclass('gc_runs') IS NOT NULL AND to_regclass('gc_outbox') IS NOT NULL"
        " AND to_regclass('gc_sweep') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        raise SchemaMissing("msggc tables are missing or out of date in this database:"
                            " run `msggc migrate` first")


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
