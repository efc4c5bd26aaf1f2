"""The new table and the copy of the live rows into it, in one snapshot; then its indexes.

The new table is made ``LIKE`` the old with everything a row needs to be the same row (defaults,
identity, CHECK and NOT NULL constraints, storage, compression, generated columns, extended
statistics, column comments) and its table options, but no index: the copy loads a bare heap,
then each index is built once (not concurrently: nobody sees the table yet) under a name of its
own. Outgoing foreign keys are added ``NOT VALID`` (the rows came from a table that held them).

The live rows are selected by ``NOT (garbage)`` where the predicate is never NULL, so an index on
the processed column finds them (a backlog's few live rows without reading the whole heap).
"""

from __future__ import annotations

from psycopg import sql

from engine.compact import leaf
from engine.compact.state import Compaction
from engine.db import Connection, one_row, table_ident
from engine.target import Target

LIKE_LEAF = sql.SQL("INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION"
                    " INCLUDING GENERATED INCLUDING STATISTICS INCLUDING COMMENTS")
"""A leaf's: its identity, if any, is its parent's, which the attach gives back."""
INDEX_MEMORY = "256MB"
LIKE = sql.SQL("INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS INCLUDING STORAGE"
               " INCLUDING COMPRESSION INCLUDING GENERATED INCLUDING STATISTICS INCLUDING COMMENTS")


def create_table(conn: Connection, c: Compaction, oid: int) -> None:
    """The new table beside the old, same persistence, table options, tablespace and access
    method (caller's transaction)."""
    unlogged, options = one_row(conn.execute(
        "SELECT relpersistence = 'u', coalesce((SELECT array_agg(array[option_name, option_value])"
        " FROM pg_options_to_table(reloptions)), '{}') FROM pg_class WHERE oid = %s", (oid,)))
    in_tablespace(conn, oid)
    conn.execute("SELECT set_config('default_table_access_method', (SELECT a.amname FROM pg_class c"
                 " JOIN pg_am a ON a.oid = c.relam WHERE c.oid = %s), true)", (oid,))  # its table AM too
    with_options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(name), sql.Literal(value)) for name, value in options)
    ) if options else sql.SQL("")
    conn.execute(sql.SQL("CREATE {unlogged}TABLE {new} (LIKE {old} {like}){options}").format(
        unlogged=sql.SQL("UNLOGGED " if unlogged else ""), new=table_ident(c.new), old=table_ident(c.table),
        like=LIKE_LEAF if c.parent else LIKE, options=with_options))
    if c.parent:
        leaf.add_bound_check(conn, c, oid)


def in_tablespace(conn: Connection, oid: int) -> None:
    """What the transaction creates from now on goes where the relation ``oid`` lies (its
    tablespace, or the database's default): created there, nothing is moved later."""
    conn.execute("SELECT set_config('default_tablespace', coalesce((SELECT spcname FROM pg_tablespace"
                 " WHERE oid = (SELECT reltablespace FROM pg_class WHERE oid = %s)), ''), true)", (oid,))


def columns(conn: Connection, oid: int) -> list[str]:
    """The columns a row is written with (generated ones are computed again by the table)."""
    return [name for (name,) in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
        " AND attgenerated = '' ORDER BY attnum", (oid,))]


def live_rows(garbage: sql.Composable, never_null: bool) -> sql.Composable:
    """The rows that are not garbage: ``NOT (garbage)`` when the predicate is never NULL (no
    ``--where``: the planner turns it into ``processed_at IS NULL``, which an index on the column
    answers), else ``(garbage) IS NOT TRUE`` (a NULL is not garbage)."""
    return sql.SQL("NOT ({})" if never_null else "({}) IS NOT TRUE").format(garbage)


def never_null(target: Target) -> bool:
    """Whether the garbage predicate is never NULL: the processed column alone, no ``--where``."""
    return target.filter is None and target.processed is not None


def copy_live(conn: Connection, c: Compaction, names: list[str], live: sql.Composable) -> int:
    """Every row that is not garbage, read in one statement's snapshot (inside the caller's
    transaction, which records the count with it); returns the rows copied."""
    cols = sql.SQL(", ").join(map(sql.Identifier, names))
    conn.execute("SELECT set_config('statement_timeout', '0', true)")
    statement = sql.SQL(
        "INSERT INTO {new} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM ONLY {old} WHERE {live}"
    ).format(new=table_ident(c.new), cols=cols, old=table_ident(c.table), live=live)
    return conn.execute(statement, c.params).rowcount


def build_indexes(conn: Connection, c: Compaction, oid: int) -> None:
    """Each index of the old table on the new one, under a name of its own (the old one's at the
    swap), a primary key or unique constraint made of it; the mapping goes into ``c.indexes``.
    ``pg_get_indexdef`` always qualifies the table, so its text past ``ON schema.table`` is the
    index's method, columns, options and predicate, as the server printed them."""
    rows = conn.execute(
        "SELECT ic.oid, ic.relname, x.indisunique, con.contype,"
        " substr(d.def, length(format('CREATE %%sINDEX %%I ON %%I.%%I ',"
        "   CASE WHEN x.indisunique THEN 'UNIQUE ' END, ic.relname, n.nspname, t.relname)) + 1)"
        " FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
        " JOIN pg_namespace n ON n.oid = t.relnamespace"
        " CROSS JOIN LATERAL (SELECT pg_get_indexdef(x.indexrelid) AS def) d"
        " LEFT JOIN pg_constraint con ON con.conindid = x.indexrelid AND con.conrelid = x.indrelid"
        " AND con.contype IN ('p', 'u')"
        " WHERE x.indrelid = %s ORDER BY x.indexrelid", (oid,)).fetchall()
    c.indexes = []
    # a sort in memory per index (nobody else builds here): 64 MB, the default, spills 2M rows
    conn.execute("SELECT set_config('maintenance_work_mem', %s, true)"
                 " WHERE pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes(%s)",
                 (INDEX_MEMORY, INDEX_MEMORY))
    conn.execute("SELECT set_config('statement_timeout', '0', true)")
    for number, (index, name, unique, constraint, tail) in enumerate(rows):
        built = f"msggc_{c.run_id}_{number}"
        in_tablespace(conn, index)
        conn.execute(sql.SQL("CREATE {unique}INDEX {name} ON {new} {tail}").format(
            unique=sql.SQL("UNIQUE " if unique else ""), name=sql.Identifier(built), new=table_ident(c.new),
            tail=sql.SQL(tail)))  # the server's own text of the index
        if constraint is not None:
            kind = sql.SQL("PRIMARY KEY" if constraint == "p" else "UNIQUE")
            conn.execute(sql.SQL("ALTER TABLE {new} ADD CONSTRAINT {name} {kind} USING INDEX {name}").format(
                new=table_ident(c.new), name=sql.Identifier(built), kind=kind))
        c.indexes.append([name, built])


def add_foreign_keys(conn: Connection, c: Compaction, oid: int) -> list[str]:
    """The old table's foreign keys onto other tables, ``NOT VALID`` (no scan, no long lock on
    the referenced table); returns those to validate after the swap (the valid ones)."""
    rows = conn.execute("SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint"
                        " WHERE conrelid = %s AND contype = 'f'"
                        " AND conparentid = 0 ORDER BY oid", (oid,)).fetchall()  # a leaf's clones: by attach
    for name, definition, _valid in rows:
        conn.execute(sql.SQL("ALTER TABLE {new} ADD CONSTRAINT {name} {definition}{not_valid}").format(
            new=table_ident(c.new), name=sql.Identifier(name), definition=sql.SQL(definition),
            not_valid=sql.SQL("" if definition.endswith("NOT VALID") else " NOT VALID")))
    return [name for name, _definition, valid in rows if valid]
