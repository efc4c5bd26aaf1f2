"""``msggc restore --run ID`` for a compaction kept with ``--archive``: its old table holds
exactly the garbage it collected; the rows go back into the table, each once, and the old table
is dropped once empty. A row whose key (or another unique value) the table holds now stays."""

from __future__ import annotations

from psycopg import sql

from engine.archive import Restored
from engine.compact.copy import columns
from engine.compact.state import Compaction, load
from engine.db import Connection, one_row, regclass_of, table_ident


def kept(conn: Connection, run_id: int) -> Compaction | None:
    """The run's compaction, if it kept its old table as the archive and it is still there."""
    c = load(conn, run_id)
    if c is None or not c.archive or c.phase != "done" or regclass_of(conn, c.old) is None:
        return None
    return c


def restore(conn: Connection, c: Compaction) -> Restored:
    """One transaction: insert what does not conflict, delete it from the archive."""
    oid = regclass_of(conn, c.table)
    assert oid is not None  # locate() found it
    cols = sql.SQL(", ").join(map(sql.Identifier, columns(conn, oid)))
    keys = sql.SQL(", ").join(map(sql.Identifier, c.key))
    with conn.transaction():
        restored = conn.execute(sql.SQL(
            "WITH back AS (INSERT INTO {table} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {old}"
            " ON CONFLICT DO NOTHING RETURNING {keys})"
            " DELETE FROM {old} WHERE ({keys}) IN (SELECT {keys} FROM back)").format(
                table=table_ident(c.table), cols=cols, old=table_ident(c.old), keys=keys)).rowcount
        left = int(one_row(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_ident(c.old))))[0])
        if left == 0:
            conn.execute(sql.SQL("DROP TABLE {}").format(table_ident(c.old)))
    return Restored(restored, left)
