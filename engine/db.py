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
        " AND to_regclass('gc_sweep') IS NOT NULL AND EXISTS (SELECT 1 FROM pg_attribute"
        "   WHERE attrelid = to_regclass('gc_runs') AND attname = 'progress' AND NOT attisdropped)"
    ).fetchone()
    if not row or not row[0]:
        raise SchemaMissing("msggc tables are missing or out of date in this database:"
                            " run `msggc migrate` first")


def is_user_fault(exc: BaseException) -> bool:
    """Errors caused by the environment or the operator's data, not by a bug: reported as one line.
    A data exception (SQLSTATE class 22: ``division by zero``, ``invalid input syntax for type
    integer``) is what a ``--where`` raises on rows it meets once the run is under way, and an
    application's own function in it may ``RAISE``."""
    return isinstance(exc, (pg_errors.InsufficientPrivilege, pg_errors.UndefinedTable, psycopg.DataError,
                            pg_errors.RaiseException))


def user_fault(exc: BaseException) -> str | None:
    """The one-line reason of an environment error (also when SQLAlchemy wraps it), followed by the
    server's DETAIL and HINT lines where they help (:func:`helpful_lines`); else None."""
    cause = getattr(exc, "orig", None) or exc
    if not is_user_fault(cause):
        return None
    return primary_message(cause) + helpful_lines(cause)


def primary_message(exc: BaseException) -> str:
    """The server's message alone: no ``LINE 1: <statement>`` and caret, no CONTEXT, no DETAIL."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return exc.diag.message_primary
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


_DETAIL_HELPS = ("22", "23", "2B", "42501", "P0001")
"""SQLSTATEs (or their class) whose DETAIL an operator can act on: the value that failed to convert
or the token of bad JSON (22), the key still referenced or already present (23), the objects that
depend on a table (2B), the privilege that is missing (42501), an application's own RAISE (P0001)."""
_HINT_HELPS = ("22", "42501", "42883", "42725", "53", "P0001")
"""... and whose HINT helps: a datestyle (22), a grant (42501), the casts a filter's operator or
function needs (42883, 42725), the setting to raise when a resource runs out (53). Left out: every
CONTEXT and statement position (msggc's own SQL), the HINT to ``DROP ... CASCADE`` (2BP01: never
the answer on an application's table), the "might succeed if retried" of class 40 (msggc retries
itself)."""
_DETAIL_CHARS = 300
"""A DETAIL may quote a whole row (``Failing row contains (...)``): enough to find it, no more."""


def helpful_lines(exc: BaseException) -> str:
    """The server's DETAIL and HINT of ``exc`` where they help, each on a line of its own after
    msggc's one line (``\n  DETAIL: ...``); "" when none does."""
    if not isinstance(exc, psycopg.Error) or not (state := exc.sqlstate or ""):
        return ""
    diag, lines = exc.diag, []
    if diag.message_detail and state.startswith(_DETAIL_HELPS):
        lines.append(f"DETAIL: {_clip(diag.message_detail)}")
    if diag.message_hint and state.startswith(_HINT_HELPS):
        lines.append(f"HINT: {_clip(diag.message_hint)}")
    return "".join(f"\n  {line}" for line in lines)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."
