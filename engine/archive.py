"""``--archive``: deleted rows move to ``<table>_archive`` in the statement that deletes them;
``msggc restore`` puts a run's rows back and ``msggc purge-archive`` empties old ones, in batches.
"""

from __future__ import annotations

from datetime import timedelta

from psycopg import sql

from engine.config import TableSpec
from engine.db import Connection, regclass_of, table_ident
from engine.errors import SchemaMissing, TargetTableError
from engine.queries import Archive

BOOKKEEPING_COLUMNS = ("archived_at", "run_id")
BATCH_ROWS = 5000


def archive_table(table: TableSpec) -> TableSpec:
    return TableSpec(name=f"{table.name}_archive", schema=table.schema)


def table_columns(conn: Connection, oid: int) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum", (oid,))]


def resolve(conn: Connection, table: TableSpec, target_oid: int) -> Archive:
    """The archive of ``table``; it must hold every column of the table plus its bookkeeping."""
    archive = archive_table(table)
    oid = regclass_of(conn, archive)
    if oid is None:
        raise SchemaMissing(f"archive table {archive.qualified} does not exist: run `msggc migrate` first")
    columns = table_columns(conn, target_oid)
    missing = set(columns + list(BOOKKEEPING_COLUMNS)) - set(table_columns(conn, oid))
    if missing:
        raise TargetTableError(f"archive table {archive.qualified} lacks columns {sorted(missing)}")
    return Archive(table=archive, columns=tuple(columns))


def _move_batches(conn: Connection, statement: sql.Composed, params: dict[str, object]) -> int:
    """Repeat a batch statement, one transaction each, until it moves nothing."""
    moved = 0
    while True:
        with conn.transaction():
            count = conn.execute(statement, {**params, "limit": BATCH_ROWS}).rowcount
        moved += count
        if count == 0:
            return moved


def restore(conn: Connection, table: TableSpec, target_oid: int, run_id: int) -> int:
    """Put a run's archived rows back into the table; returns how many."""
    archive = resolve(conn, table, target_oid)
    columns = sql.SQL(", ").join(map(sql.Identifier, archive.columns))
    statement = sql.SQL(
        "WITH back AS (DELETE FROM {archive} WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM {archive} WHERE run_id = %(run)s LIMIT %(limit)s)) RETURNING {columns})"
        " INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM back"
    ).format(archive=table_ident(archive.table), table=table_ident(table), columns=columns)
    return _move_batches(conn, statement, {"run": run_id})


def purge(conn: Connection, table: TableSpec, older_than: timedelta) -> int:
    """Delete archived rows archived longer ago than ``older_than``; returns how many."""
    archive = archive_table(table)
    if regclass_of(conn, archive) is None:
        raise SchemaMissing(f"archive table {archive.qualified} does not exist: run `msggc migrate` first")
    statement = sql.SQL(
        "DELETE FROM {archive} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {archive}"
        " WHERE archived_at < now() - %(age)s::interval LIMIT %(limit)s))"
    ).format(archive=table_ident(archive))
    return _move_batches(conn, statement, {"age": older_than})
