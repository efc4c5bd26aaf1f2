"""Space reclaim: what a run left behind (dead tuples, bloat, sizes) and, on request, VACUUM.

DELETE only marks rows dead; the space returns to the table (not the OS) when VACUUM runs.
Reporting the dead tuples and sizes before and after lets an operator see what a run cost and
what ``--vacuum`` gave back.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg import sql

from engine.config import TableSpec
from engine.db import Connection, one_row, table_ident


def flush_stats(conn: Connection) -> None:
    """Publish this session's pending table statistics now (PostgreSQL 15+; autocommit only).

    A backend adds its inserts and deletes to ``pg_stat_user_tables`` at most once a second, when
    idle. Without this, a report read right after a run shows none of its dead tuples, and a
    ``VACUUM`` then resets the counts before the run's deletes arrive: measured, the table was left
    claiming 0 live and 20,000 dead tuples after vacuuming a 40,000-row table of 20,000 garbage.
    The flush happens before the server answers, so the next statement sees the counts.
    """
    if conn.info.server_version >= 150000:
        conn.execute("SELECT pg_stat_force_next_flush()")


def health(conn: Connection, oid: int) -> dict[str, Any]:
    """Table and index sizes, live/dead tuples, and pgstattuple's free space when installed.

    The counts include what this session did (it flushes its statistics first); what other
    sessions did in the last second may still be missing.
    """
    flush_stats(conn)
    row = one_row(conn.execute(
        "SELECT pg_table_size(c.oid), pg_indexes_size(c.oid), s.n_live_tup, s.n_dead_tup,"
        " s.last_autovacuum, s.last_vacuum"
        " FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = %s",
        (oid,),
    ))
    report: dict[str, Any] = {
        "table_bytes": row[0], "index_bytes": row[1], "live_tuples": row[2], "dead_tuples": row[3],
        "last_autovacuum": row[4].isoformat() if row[4] else None,
        "last_vacuum": row[5].isoformat() if row[5] else None,
    }
    if one_row(conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pgstattuple')"))[0]:
        approx = one_row(conn.execute(
            "SELECT approx_free_percent, dead_tuple_percent FROM pgstattuple_approx(%s::oid::regclass)",
            (oid,),
        ))
        report["free_percent"], report["dead_tuple_percent"] = approx
    return report


def vacuum(conn: Connection, table: TableSpec) -> float:
    """``VACUUM (ANALYZE)`` the table (outside a transaction); returns the seconds it took."""
    began = time.monotonic()
    conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table_ident(table)))
    return time.monotonic() - began
