"""The capture: a trigger that logs the key of every row the application changes from now on.

Creating it waits for the application's writers of the moment (the trigger's lock conflicts with
theirs), so once it commits, every change is either committed already (the copy's snapshot,
taken after, sees it) or fires the trigger: nothing falls between the two (pg_repack's way).
The function is ``SECURITY DEFINER``: the application's role needs no privilege on the log.

The swap moves the triggers onto the new table (the log is empty then): until the verification
after it passes, the keys the application changes there are logged, so that a swap undone takes
them back into the old table (:mod:`engine.compact.unswap`).
"""

from __future__ import annotations

from psycopg import sql

from engine.compact.state import TRIGGER, TRUNCATED, Compaction
from engine.db import Connection, table_ident


def create(conn: Connection, c: Compaction) -> None:
    """The log (the key columns, typed as in the table, in arrival order), its function and
    the trigger; inside the caller's transaction."""
    keys = sql.SQL(", ").join(map(sql.Identifier, c.key))
    log, table = table_ident(c.log), table_ident(c.table)
    conn.execute(sql.SQL("CREATE TABLE {log} AS SELECT {keys} FROM {t} WITH NO DATA").format(
        log=log, keys=keys, t=table))
    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN msggc_seq bigint GENERATED ALWAYS AS IDENTITY"
                         " PRIMARY KEY").format(log))
    conn.execute(sql.SQL(
        "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp AS {body}").format(
            f=sql.Identifier(*c.function), body=sql.Literal(_body(conn, c))))
    attach(conn, c)


def attach(conn: Connection, c: Compaction) -> None:
    """The triggers on the table named ``c.table`` now (the new one, once swapped)."""
    table = table_ident(c.table)
    conn.execute(sql.SQL("CREATE TRIGGER {tg} AFTER INSERT OR UPDATE OR DELETE ON {t}"
                         " FOR EACH ROW EXECUTE FUNCTION {f}()").format(
        tg=sql.Identifier(TRIGGER), t=table, f=sql.Identifier(*c.function)))
    # a TRUNCATE logs a key of NULLs (a key is NOT NULL): the catch-up that meets it undoes the run
    # (and a swap undone takes the whole table back)
    conn.execute(sql.SQL("CREATE TRIGGER {tg} AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
                         ).format(tg=sql.Identifier(TRUNCATED), t=table, f=sql.Identifier(*c.function)))
    # writes applied by logical replication (session_replication_role = replica) are changes too
    for name in (TRIGGER, TRUNCATED):
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(table, sql.Identifier(name)))


def _body(conn: Connection, c: Compaction) -> str:
    """Log the new key of an insert or update, and the old one of a delete or of an update
    that changed it (that key's row is gone); a truncate logs a key of NULLs."""
    keys = sql.SQL(", ").join(map(sql.Identifier, c.key))

    def row(alias: str) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(alias, name) for name in c.key)

    return sql.SQL(
        "BEGIN\n"
        "  IF TG_OP = 'TRUNCATE' THEN INSERT INTO {log} DEFAULT VALUES; RETURN NULL; END IF;\n"
        "  IF TG_OP <> 'DELETE' THEN INSERT INTO {log} ({keys}) VALUES ({new}); END IF;\n"
        "  IF TG_OP = 'DELETE' THEN INSERT INTO {log} ({keys}) VALUES ({old});\n"
        "  ELSIF TG_OP = 'UPDATE' AND ({old}) IS DISTINCT FROM ({new}) THEN\n"
        "    INSERT INTO {log} ({keys}) VALUES ({old});\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END"
    ).format(log=table_ident(c.log), keys=keys, new=row("new"), old=row("old")).as_string(conn)


def drop(conn: Connection, c: Compaction) -> None:
    """Trigger, function and log, whichever exist (inside the caller's transaction)."""
    present = [name for (name,) in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s)",
        (table_ident(c.table).as_string(conn), [TRIGGER, TRUNCATED]))]
    for name in present:  # only these: even IF EXISTS locks the table
        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name), table_ident(c.table)))
    conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(*c.function)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table_ident(c.log)))
