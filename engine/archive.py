"""``--archive``: deleted rows move to ``<table>_archive`` in the statement that deletes them;
``msggc restore`` puts a run's rows back and ``msggc purge-archive`` empties old ones, in batches.
``msggc migrate --archive-for TABLE`` makes the archive of any table (:func:`create_archive`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

from psycopg import errors as pg_errors
from psycopg import sql

from engine.config import TableSpec
from engine.db import Connection, one_row, regclass_of, table_ident
from engine.errors import SchemaMissing, TargetTableError
from engine.queries import Archive
from engine.references import referencing
from engine.target import RELATION_KINDS, primary_key

BOOKKEEPING_COLUMNS = ("archived_at", "run_id")
ARCHIVE_SUFFIX = "_archive"
MAX_IDENTIFIER_BYTES = 63
"""NAMEDATALEN - 1: PostgreSQL would cut a longer name, and find another table by it."""
BATCH_ROWS = 5000
RESTORING = "msggc_restoring"
"""This session's temp list of the archived rows a restore walks."""


def archive_table(table: TableSpec) -> TableSpec:
    return TableSpec(name=f"{table.name}{ARCHIVE_SUFFIX}", schema=table.schema)


def table_columns(conn: Connection, oid: int) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum", (oid,))]


def missing_archive(table: TableSpec) -> str:
    """The one line of a missing archive table, naming the command that makes it."""
    return (f"archive table {archive_table(table).qualified} does not exist:"
            f" run `msggc migrate --archive-for {table.qualified}` first")


class ArchiveCreated(NamedTuple):
    table: TableSpec
    created: bool
    """False: it was there already, with every column the table's rows need."""


def create_archive(conn: Connection, table: TableSpec) -> ArchiveCreated:
    """Make ``<schema>.<table>_archive`` for ``gc --archive`` on any table, or check the one there.

    The archive takes the table's columns with their types and collations (``LIKE``) and nothing
    that could refuse a row the table held: no primary key, unique or check constraint, no NOT NULL,
    no identity, default or generation expression (the rows arrive with every value, and the same
    key may be archived twice once the application reuses it). Then the bookkeeping
    ``archived_at`` and ``run_id``, indexed for ``restore --run`` and ``purge-archive`` by BRIN
    (both only grow as rows arrive; a btree entry per archived row cost --archive dearly).
    An existing archive is kept when it has every column with the table's type, else refused.
    """
    oid, schema, name = _plain_table(conn, table)  # a partitioned table's archive is not partitioned
    archive = TableSpec(name=f"{name}{ARCHIVE_SUFFIX}", schema=schema)
    if len(archive.name.encode()) > MAX_IDENTIFIER_BYTES:
        raise TargetTableError(f"the archive of {table.qualified} would be named {archive.name!r}, longer"
                               f" than PostgreSQL's {MAX_IDENTIFIER_BYTES} bytes: rename the table first")
    columns = column_types(conn, oid)
    if clash := [column for column in BOOKKEEPING_COLUMNS if column in columns]:
        raise TargetTableError(f"table {table.qualified} has a column named {clash[0]!r}: its archive"
                               " keeps msggc's own column of that name beside every row")
    if regclass_of(conn, archive) is None:
        try:
            _create(conn, TableSpec(name=name, schema=schema), archive, columns)
            return ArchiveCreated(archive, created=True)
        except (pg_errors.DuplicateTable, pg_errors.UniqueViolation):
            pass  # a concurrent migrate made it a moment ago: checked below like any existing one
    _check_existing(conn, table, archive, columns)
    return ArchiveCreated(archive, created=False)


def column_types(conn: Connection, oid: int) -> dict[str, str]:
    """Every column of the table and its type (``format_type``), in table order."""
    return dict(conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (oid,)).fetchall())


def _plain_table(conn: Connection, table: TableSpec) -> tuple[int, str, str]:
    """The table's oid, schema and name, as the catalog spells them: a plain table or a
    partitioned one (whose archive is one plain table with the parent's columns, where
    ``gc --archive`` moves the rows of every leaf and whence ``restore --run`` puts them back
    through the parent, each into the leaf that holds its range then)."""
    row = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (table_ident(table).as_string(conn),)).fetchone()
    if row is None:
        raise TargetTableError(f"table {table.qualified} does not exist: check --archive-for (SCHEMA.TABLE)")
    oid, schema, name, kind = row
    if kind not in ("r", "p"):
        raise TargetTableError(f"{table.qualified} is {RELATION_KINDS.get(kind, 'not a table')}, not a table")
    return int(oid), str(schema), str(name)


def _create(conn: Connection, source: TableSpec, archive: TableSpec, columns: dict[str, str]) -> None:
    """``LIKE`` copies columns, types, collations and NOT NULL only: the NOT NULLs are dropped."""
    names = {"archive": table_ident(archive), "source": table_ident(source)}
    relax = [sql.SQL("ALTER COLUMN {} DROP NOT NULL").format(sql.Identifier(column)) for column in columns]
    with conn.transaction():
        conn.execute(sql.SQL("CREATE TABLE {archive} (LIKE {source})").format(**names))
        conn.execute(sql.SQL("ALTER TABLE {archive} {relax}, ADD COLUMN archived_at timestamptz NOT NULL"
                             " DEFAULT now(), ADD COLUMN run_id bigint NOT NULL")
                     .format(relax=sql.SQL(", ").join(relax), **names))
        for column in ("run_id", "archived_at"):
            conn.execute(sql.SQL("CREATE INDEX ON {archive} USING brin ({column}) WITH (autosummarize = on)")
                         .format(column=sql.Identifier(column), **names))
        conn.execute(sql.SQL("COMMENT ON TABLE {archive} IS {comment}").format(
            comment=sql.Literal("rows deleted by msggc gc --archive; msggc restore --run N puts them back"),
            **names))


def _check_existing(conn: Connection, table: TableSpec, archive: TableSpec, columns: dict[str, str]) -> None:
    """An archive made earlier (or by hand) must hold every column of the table, of its type."""
    oid = regclass_of(conn, archive)
    kind = one_row(conn.execute("SELECT relkind FROM pg_class WHERE oid = %s", (oid,)))[0] if oid else None
    if oid is None or kind not in ("r", "p"):
        raise TargetTableError(f"{archive.qualified} exists and is not a table: it cannot be the archive"
                               f" of {table.qualified}")
    has = column_types(conn, oid)
    missing = [column for column in (*columns, *BOOKKEEPING_COLUMNS) if column not in has]
    if missing:
        raise TargetTableError(f"archive table {archive.qualified} exists but lacks columns {missing}:"
                               " add them or drop the table, then run msggc migrate --archive-for again")
    if differ := [column for column, type_ in columns.items() if has[column] != type_]:
        raise TargetTableError(
            f"archive table {archive.qualified} exists but its column {differ[0]!r} is {has[differ[0]]},"
            f" where {table.qualified} has {columns[differ[0]]}: alter one of them")


def resolve(conn: Connection, table: TableSpec, target_oid: int) -> Archive:
    """The archive of ``table``; it must hold every column of the table plus its bookkeeping."""
    archive = archive_table(table)
    oid = regclass_of(conn, archive)
    if oid is None:
        raise SchemaMissing(missing_archive(table))
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
    generated = {name for (name,) in conn.execute(  # the table computes them again
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attgenerated <> ''", (target_oid,))}
    keys = sql.SQL(", ").join(map(sql.Identifier, key))
    names = {"archive": table_ident(archive.table), "table": table_ident(table),
             "restoring": sql.Identifier(RESTORING),
             "columns": sql.SQL(", ").join(sql.Identifier(c) for c in archive.columns if c not in generated),
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


def restore_with_children(conn: Connection, table: TableSpec, target_oid: int, run_id: int,
                          key: tuple[str, ...]) -> dict[str, Restored]:
    """A run's rows back: the parents first, then the child rows the run archived as they went
    with them (cascade, ``--delete-dependents``), so every foreign key holds as each lands.
    Per table restored, qualified name first."""
    restored = {table.qualified: restore(conn, table, target_oid, run_id, key)}
    for ref in referencing(conn, target_oid):
        archive = archive_table(ref.child)
        if ref.child.qualified in restored or regclass_of(conn, archive) is None:
            continue
        if not one_row(conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE run_id = %s)")
                                    .format(table_ident(archive)), (run_id,)))[0]:
            continue
        restored[ref.child.qualified] = restore(conn, ref.child, ref.child_oid, run_id,
                                                primary_key(conn, ref.child_oid))
    return restored


def purge(conn: Connection, table: TableSpec, older_than: timedelta) -> int:
    """Delete archived rows archived longer ago than ``older_than``; returns how many."""
    archive = archive_table(table)
    if regclass_of(conn, archive) is None:
        raise SchemaMissing(missing_archive(table))
    statement = sql.SQL(
        "DELETE FROM {archive} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {archive}"
        " WHERE archived_at < now() - %(age)s::interval LIMIT %(limit)s))"
    ).format(archive=table_ident(archive))
    return _move_batches(conn, statement, {"age": older_than})
