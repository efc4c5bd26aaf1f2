"""``--archive``: deleted rows move to ``<table>_archive`` in the statement that deletes them;
``msggc restore`` puts a run's rows back and ``msggc purge-archive`` empties old ones, in batches.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

from psycopg import sql

from engine.config import TableSpec
from engine.db import Connection, one_row, regclass_of, table_ident
from engine.errors import SchemaMissing, TargetTableError
from engine.queries import Archive

BOOKKEEPING_COLUMNS = ("archived_at", "run_id")
BATCH_ROWS = 5000
RESTORING = "msggc_restoring"
"""This session's temp list of the archived rows a restore walks."""


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


class Restored(NamedTuple):
    restored: int
    conflicting: int
    """Rows kept in the archive: a row now in the table holds their key or another unique value."""


def restore(conn: Connection, table: TableSpec, target_oid: int, run_id: int,
            key: tuple[str, ...]) -> Restored:
    """Put a run's archived rows back, one transaction per batch. A row that conflicts with one
    now in the table (same ``key``) stays archived, so a rerun once the conflict is gone restores
    the rest; a table without a key takes every row back or, on any conflict, none of the batch.
    The batches walk a list of the run's rows made up front: the rows that stay would otherwise
    be met again by every batch."""
    archive = resolve(conn, table, target_oid)
    keys = sql.SQL(", ").join(map(sql.Identifier, key))
    names = {"archive": table_ident(archive.table), "table": table_ident(table),
             "restoring": sql.Identifier(RESTORING),
             "columns": sql.SQL(", ").join(map(sql.Identifier, archive.columns)),
             "on_conflict": sql.SQL(""), "went_back": sql.SQL("")}
    if key:
        names["on_conflict"] = sql.SQL(" ON CONFLICT DO NOTHING RETURNING {}").format(keys)
        names["went_back"] = sql.SQL(" WHERE ROW({k}) IN (SELECT {k} FROM back)").format(k=keys)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{restoring}").format(**names))
    conn.execute(sql.SQL("CREATE TEMP TABLE {restoring} (seq bigint PRIMARY KEY, at tid NOT NULL)")
                 .format(**names))
    total = conn.execute(sql.SQL(
        "INSERT INTO {restoring} SELECT row_number() OVER (ORDER BY ctid), ctid FROM {archive}"
        " WHERE run_id = %(run)s").format(**names), {"run": run_id}).rowcount
    statement = sql.SQL(
        "WITH batch AS (SELECT ctid AS at, {columns} FROM {archive} WHERE ctid = ANY(ARRAY("
        "SELECT at FROM {restoring} WHERE seq > %(after)s AND seq <= %(upto)s)) AND run_id = %(run)s"
        " FOR UPDATE),"
        " back AS (INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM batch"
        "{on_conflict})"
        " DELETE FROM {archive} WHERE ctid = ANY(ARRAY(SELECT at FROM batch{went_back}))"
    ).format(**names)
    restored = 0
    for after in range(0, total, BATCH_ROWS):
        with conn.transaction():
            restored += conn.execute(
                statement, {"run": run_id, "after": after, "upto": after + BATCH_ROWS}).rowcount
    conn.execute(sql.SQL("DROP TABLE {restoring}").format(**names))
    kept = one_row(conn.execute(sql.SQL("SELECT count(*) FROM {archive} WHERE run_id = %(run)s")
                                .format(**names), {"run": run_id}))[0]
    return Restored(restored, kept)


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
