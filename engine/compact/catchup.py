"""The catch-up: re-sync every key the capture logged from the table's current row.

One round is one transaction: take (delete) the oldest logged keys, delete those rows from the
new table and insert again the ones that are present and not garbage in the old, so the new
table holds for each of those keys what the old one holds now. A change committed after the
round's read logs its key again, for a later round; the log is consumed only with the sync it
triggered, so a crash loses no change. The rows inserted and deleted keep ``c.live`` exact.

``back``: the other way, once the swap is to be undone: the keys the application changed in the
new table (in place under the table's name) are synced into the old one, garbage included (the
old table must hold again everything the application's table holds), and a truncate logged
there takes the whole table back.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg import errors as pg_errors
from psycopg import sql

from engine.compact.state import Compaction, save
from engine.db import Connection, one_row, table_ident
from engine.errors import MsggcError

ROUND_KEYS = 50_000
SHORT_LOG = 1_000
"""A log this short is synced inside the swap's lock: a round of it takes milliseconds."""
ROUND_RETRIES = 5


def sync_round(conn: Connection, c: Compaction, names: list[str],
               limit: int | None = ROUND_KEYS, back: bool = False) -> int:
    """One round (``limit`` None: the whole log) inside the caller's transaction; returns the
    log entries consumed. Its count of live rows is recorded with it (not ``back``: the old
    table's rows are counted by nobody)."""
    keys = sql.SQL(", ").join(map(sql.Identifier, c.key))
    picked = sql.SQL("") if limit is None else sql.SQL(
        " WHERE msggc_seq IN (SELECT msggc_seq FROM {log} ORDER BY msggc_seq LIMIT {n})").format(
            log=table_ident(c.log), n=sql.Literal(limit))
    consumed = conn.execute(sql.SQL(
        "CREATE TEMP TABLE msggc_keys ON COMMIT DROP AS WITH taken AS (DELETE FROM {log}{picked}"
        " RETURNING {keys}) SELECT DISTINCT {keys} FROM taken").format(
            log=table_ident(c.log), picked=picked, keys=keys)).rowcount
    if consumed == 0:
        conn.execute("DROP TABLE msggc_keys")
        return 0
    truncated = bool(one_row(conn.execute(sql.SQL(
        "SELECT EXISTS (SELECT FROM msggc_keys WHERE {} IS NULL)").format(sql.Identifier(c.key[0]))))[0])
    if truncated and not back:
        raise MsggcError(f"the application truncated {c.table.qualified} during the compaction;"
                         " it was undone, nothing changed")
    inserted, deleted = _resync(conn, c, names, back, everything=truncated)
    conn.execute("DROP TABLE msggc_keys")
    if not back:
        c.live += inserted - deleted
        save(conn, c)
    return consumed


def _resync(conn: Connection, c: Compaction, names: list[str], back: bool,
            everything: bool) -> tuple[int, int]:
    """The rows of the keys taken (``everything``: of all keys, after a truncate) deleted from the
    table synced into and inserted again from ``c.table`` as it is now (forward: the live ones);
    returns (inserted, deleted)."""
    keys = sql.SQL(", ").join(map(sql.Identifier, c.key))
    into = table_ident(c.old if back else c.new)
    match = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier("r", k), sql.Identifier("k", k))
                                  for k in c.key)
    taken = sql.SQL(" r USING msggc_keys k WHERE {}").format(match)
    deleted = conn.execute(sql.SQL("DELETE FROM {}{}").format(
        into, sql.SQL("") if everything else taken)).rowcount
    which = [] if everything else [sql.SQL("({keys}) IN (SELECT {keys} FROM msggc_keys)").format(keys=keys)]
    live = [] if back else [sql.SQL("({}) IS NOT TRUE").format(c.predicate)]
    where = sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(which + live)) if which + live else sql.SQL("")
    cols = sql.SQL(", ").join(map(sql.Identifier, names))
    inserted = conn.execute(sql.SQL(
        "INSERT INTO {into} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM ONLY {table}{where}").format(
            into=into, cols=cols, table=table_ident(c.table), where=where), c.params).rowcount
    return inserted, deleted


def catch_up(conn: Connection, c: Compaction, names: list[str],
             check: Callable[[], None] = lambda: None, back: bool = False) -> None:
    """Rounds until one leaves the log short. A round that meets a unique violation (a row
    whose other unique value moved to a key of a later round) is tried again: the retry takes
    the later change with it. ``check`` is called before each round (it raises to stop)."""
    while True:
        check()
        for attempt in range(ROUND_RETRIES):
            try:
                with conn.transaction():
                    consumed = sync_round(conn, c, names, back=back)
                break
            except pg_errors.UniqueViolation:  # raised before the round counted anything
                if attempt == ROUND_RETRIES - 1:
                    raise
        if consumed < SHORT_LOG:
            return
