"""Test tables with known garbage, built row by row so every expectation is exact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql


def fill(conn: psycopg.Connection[Any], garbage: Sequence[bool], table: str = "messages",
         processed_days_ago: Sequence[float] | None = None) -> None:
    """One row per flag (ids 1..n in order); a True flag makes the row garbage."""
    ages = processed_days_ago or [1.0] * len(garbage)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (message_id, chat_id, direction, status, payload, created_at, processed_at)"
            " SELECT 'wamid.' || g.i, 'chat' || (g.i %% 7), 1, 2, repeat('p', 130),"
            " now() - interval '30 days',"
            " CASE WHEN g.flag THEN now() - make_interval(secs => g.age * 86400) END"
            " FROM unnest(%s::bool[], %s::float8[]) WITH ORDINALITY AS g(flag, age, i) ORDER BY g.i"
        ).format(sql.Identifier(table)),
        (list(garbage), list(ages)),
    )
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))


def surviving_ids(conn: psycopg.Connection[Any], table: str = "messages") -> list[int]:
    query = sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(table))
    return [row[0] for row in conn.execute(query)]


def live_ids(garbage: Sequence[bool]) -> list[int]:
    """The ids that must survive a complete GC of a table made by :func:`fill`."""
    return [i for i, flag in enumerate(garbage, start=1) if not flag]


RUN_COLUMNS = ("id", "node", "status", "messages_deleted", "batches", "error")


def run_rows(dsn: str, columns: Sequence[str] = RUN_COLUMNS) -> list[dict[str, Any]]:
    """The ``gc_runs`` rows as dicts, oldest first."""
    selected = sql.SQL(", ").join(map(sql.Identifier, columns))
    query = sql.SQL("SELECT {} FROM gc_runs ORDER BY id").format(selected)
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query)
        return [dict(zip(columns, row, strict=True)) for row in cur]


REFUSE_DELETES = """
CREATE FUNCTION refuse_deletes() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN RAISE EXCEPTION 'the application refuses this delete'; END$$;
CREATE TRIGGER refuse_deletes BEFORE DELETE ON messages FOR EACH ROW EXECUTE FUNCTION refuse_deletes();
"""
"""An application's trigger that fails every GC of ``messages`` (``DROP TRIGGER refuse_deletes
ON messages`` lets the next one through)."""
