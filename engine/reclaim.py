"""Space reclaim: what a run left behind (dead tuples, bloat, sizes) and, on request, VACUUM.

DELETE only marks rows dead; the space returns to the table (not the OS) when VACUUM runs.
Reporting the dead tuples and sizes before and after lets an operator see what a run cost and
what ``--vacuum`` gave back.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
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


_NOT_VACUUMABLE = """
SELECT c.oid = %(oid)s, c.oid::regclass::text
  FROM (SELECT %(oid)s::oid AS relid, 0 AS level
        UNION SELECT relid, level FROM pg_partition_tree(%(oid)s::regclass)) t  -- none: a plain table
  JOIN pg_class c ON c.oid = t.relid
 WHERE NOT pg_has_role(c.relowner, 'USAGE')
   AND NOT (pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE')
            AND NOT c.relisshared)
 ORDER BY t.level, 2
"""
"""The table, or those of its partitions, the role may not VACUUM: PostgreSQL's rule up to 16 is
the owner (or a member of its role), the database's owner or a superuser; 17 adds the MAINTAIN
privilege, checked apart."""


def vacuum(conn: Connection, table: TableSpec, oid: int) -> dict[str, Any]:
    """``VACUUM (ANALYZE)`` the table (outside a transaction): the seconds it took and the table
    after it, or ``vacuum_skipped`` with the reason when the role may not vacuum it.

    PostgreSQL does not refuse a VACUUM the role may not run: it skips the table with a WARNING
    and succeeds, so a report of 0.0 s and the same dead tuples would read as "nothing to
    reclaim". The rule is checked first; a WARNING the server still raises is reported too.
    """
    if (why := _why_not_vacuumable(conn, table, oid)) is not None:
        return {"vacuum_skipped": why}
    warnings: list[str] = []

    def keep_warning(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING" and diag.message_primary:
            warnings.append(diag.message_primary)

    conn.add_notice_handler(keep_warning)
    began = time.monotonic()
    try:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table_ident(table)))
    finally:
        conn.remove_notice_handler(keep_warning)
    report: dict[str, Any] = {"vacuum_s": time.monotonic() - began, "after_vacuum": health(conn, oid)}
    if warnings:
        report["vacuum_warnings"] = warnings
    return report


def _why_not_vacuumable(conn: Connection, table: TableSpec, oid: int) -> str | None:
    if conn.info.server_version >= 170000 and one_row(conn.execute(
            "SELECT has_table_privilege(%s::oid, 'MAINTAIN')", (oid,)))[0]:
        return None
    refused = conn.execute(_NOT_VACUUMABLE, {"oid": oid}).fetchall()
    if not refused:
        return None
    role = one_row(conn.execute("SELECT current_user"))[0]
    itself, first = refused[0]
    which = (f"table {table.qualified}" if itself
             else f"{len(refused):,} partitions of {table.qualified} ({first}...)")
    return (f"role {role} does not own {which}: only its owner, the database's owner or a superuser"
            " may VACUUM it (PostgreSQL skips it with a warning)")
