"""The new table and the copy of the live rows into it, in one snapshot; then its indexes.

The new table is made ``LIKE`` the old with everything a row needs to be the same row (defaults,
identity, CHECK and NOT NULL constraints, storage, compression, generated columns, extended
statistics, column comments) and its table options, but no index: the copy loads a bare heap,
then each index is built once (not concurrently: nobody sees the table yet) under a name of its
own. Outgoing foreign keys are added ``NOT VALID`` (the rows came from a table that held them).

A big table is copied by several connections at once, each a range of the heap's blocks (a TID
range scan), all in the one snapshot the run's transaction exports: the helpers commit their
parts first, the run's transaction commits the last part with the record that says ``copied``;
until then the record says ``capture`` and any failure drops the new table whole.
"""

from __future__ import annotations

import threading

from psycopg import sql

from engine.compact import leaf
from engine.compact.state import Compaction
from engine.db import Connection, connect, one_row, table_ident

LIKE_LEAF = sql.SQL("INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION"
                    " INCLUDING GENERATED INCLUDING STATISTICS INCLUDING COMMENTS")
"""A leaf's: its identity, if any, is its parent's, which the attach gives back."""
INDEX_MEMORY = "256MB"
SPLIT_MIN_PAGES = 16_384
"""128 MB of heap: below it, one statement (a connection's start and the snapshot's export are
a fixed cost the halves must repay; the threshold is a guess, not yet measured)."""
MAX_PARTS = 4
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


Blocks = tuple[int, int | None]
"""A range of heap blocks, ``[first, end)``; ``end`` None: to the table's end, whatever it is by then."""
WHOLE: Blocks = (0, None)


def live_rows(c: Compaction, never_null: bool) -> sql.Composable:
    """The rows that are not garbage: ``NOT (garbage)`` when the predicate is never NULL (no
    ``--where``: the planner turns it into ``processed_at IS NULL``, which an index on the column
    answers), else ``(garbage) IS NOT TRUE`` (a NULL is not garbage)."""
    return sql.SQL("NOT ({})" if never_null else "({}) IS NOT TRUE").format(c.predicate)


def parts(conn: Connection, c: Compaction, oid: int, live: sql.Composable, wanted: int) -> list[Blocks]:
    """The block ranges to copy at once: one (the whole table) when it is small, when one part is
    wanted, or when the planner finds the live rows by an index (a TID range would force a
    sequential read of every block); else ``wanted`` (at most :data:`MAX_PARTS`) equal ranges,
    the last open-ended."""
    wanted = min(wanted, MAX_PARTS)
    if wanted < 2:
        return [WHOLE]
    pages = one_row(conn.execute(
        "SELECT pg_relation_size(%s) / current_setting('block_size')::bigint", (oid,)))[0]
    if pages < SPLIT_MIN_PAGES or not _scans_sequentially(conn, c, live):
        return [WHOLE]
    step = pages // wanted
    return [(i * step, (i + 1) * step if i < wanted - 1 else None) for i in range(wanted)]


def _scans_sequentially(conn: Connection, c: Compaction, live: sql.Composable) -> bool:
    """Whether the planner reads the live rows by a sequential scan of the table."""
    plan = one_row(conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) SELECT FROM ONLY {old} WHERE {live}").format(
        old=table_ident(c.table), live=live), c.params))[0][0]["Plan"]
    while plan.get("Node Type") in ("Gather", "Gather Merge") and plan.get("Plans"):
        plan = plan["Plans"][0]
    return bool(plan.get("Node Type") == "Seq Scan")


def copy_live(conn: Connection, dsn: str, c: Compaction, names: list[str], live: sql.Composable,
              ranges: list[Blocks], lock_timeout_ms: int) -> list[int]:
    """Every row that is not garbage, in one snapshot, inside the caller's transaction (which
    records the count with it); returns the rows copied per range. One range: one statement.
    More: this transaction exports its snapshot and copies the first range; a helper connection
    per other range imports it, copies its range and commits, all at once; this one commits
    after every helper did (or fails, the helpers' rows dropped with the new table). A helper
    waits ``lock_timeout`` at most for its lock on the table: behind an application's request
    queued after this transaction's lock, it would wait for this transaction, which waits for it."""
    if ranges == [WHOLE]:
        conn.execute("SELECT set_config('statement_timeout', '0', true)")
        return [_insert(conn, c, names, live, WHOLE)]
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    snapshot = one_row(conn.execute("SELECT pg_export_snapshot()"))[0]
    conn.execute("SELECT set_config('statement_timeout', '0', true)")
    helpers = [_Helper(dsn, snapshot, c, names, live, blocks, lock_timeout_ms) for blocks in ranges[1:]]
    for helper in helpers:
        helper.start()
    try:
        own = _insert(conn, c, names, live, ranges[0])
    finally:
        for helper in helpers:
            helper.join()
    for helper in helpers:
        if helper.error is not None:
            raise helper.error
    return [own, *(helper.rows for helper in helpers)]


class _Helper(threading.Thread):
    """One range copied on a connection of its own, in the exported snapshot, committed."""

    def __init__(self, dsn: str, snapshot: str, c: Compaction, names: list[str], live: sql.Composable,
                 blocks: Blocks, lock_timeout_ms: int) -> None:
        super().__init__(name=f"msggc-copy-{blocks[0]}", daemon=True)
        self.args = (dsn, snapshot, c, names, live, blocks)
        self.lock_timeout = f"{lock_timeout_ms}ms"
        self.rows = 0
        self.error: Exception | None = None

    def run(self) -> None:
        dsn, snapshot, c, names, live, blocks = self.args
        try:
            with connect(dsn) as helper, helper.transaction():
                helper.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                helper.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                helper.execute("SELECT set_config('statement_timeout', '0', true),"
                               " set_config('lock_timeout', %s, true)", (self.lock_timeout,))
                self.rows = _insert(helper, c, names, live, blocks)
        except Exception as exc:  # the run's thread raises it
            self.error = exc


def _insert(conn: Connection, c: Compaction, names: list[str], live: sql.Composable, blocks: Blocks) -> int:
    """The live rows of ``blocks`` into the new table; returns how many."""
    cols = sql.SQL(", ").join(map(sql.Identifier, names))
    first, end = blocks
    within = [sql.SQL("ctid >= %(msggc_first)s::tid")] if first else []
    if end is not None:
        within.append(sql.SQL("ctid < %(msggc_end)s::tid"))
    statement = sql.SQL(
        "INSERT INTO {new} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM ONLY {old} WHERE {where}"
    ).format(new=table_ident(c.new), cols=cols, old=table_ident(c.table),
             where=sql.SQL(" AND ").join([*within, live]))
    params = {**c.params, "msggc_first": f"({first},0)", "msggc_end": f"({end},0)"}
    return conn.execute(statement, params).rowcount


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
