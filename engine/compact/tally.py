"""The verification's counts of the old table once swapped out (nobody writes it any more): its
garbage, the run's deleted rows, and its rows, which must equal the new table's plus the garbage.

Its rows are counted whole (an index-only scan of the primary key: a whole index read) or as its
rows that are not garbage plus the garbage, whichever the planner reads less for: where an index
finds the live rows (a btree on the processed column answers ``IS NULL``), the second reads a
backlog's few live rows instead of a 10M-entry index. Both are the same number.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from engine.db import Connection, one_row


def counts(conn: Connection, table: sql.Composable, garbage: sql.Composable, live: sql.Composable,
           params: dict[str, object]) -> tuple[int, int]:
    """(rows, garbage) of ``table``; ``live`` is the garbage predicate's negation as the copy
    wrote it (``engine.compact.copy.live_rows``)."""
    counted = _count(conn, sql.SQL("SELECT count(*) FROM ONLY {} WHERE ({})").format(table, garbage), params)
    if live_is_cheaper(conn, table, live, params):
        kept = _count(conn, _kept(table, live), params)
        return kept + counted, counted
    return _count(conn, _whole(table), params), counted


def live_is_cheaper(conn: Connection, table: sql.Composable, live: sql.Composable,
                    params: dict[str, object]) -> bool:
    """Whether the planner counts the live rows for less than the whole table."""
    return _cost(conn, _kept(table, live), params) < _cost(conn, _whole(table), params)


def sequential(conn: Connection, statement: sql.Composed, params: dict[str, object]) -> bool:
    """Whether the statement's plan reads a heap from its start (a sequential scan)."""
    return "Seq Scan" in _node_types(_plan(conn, statement, params))


def _whole(table: sql.Composable) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM ONLY {}").format(table)


def _kept(table: sql.Composable, live: sql.Composable) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM ONLY {} WHERE {}").format(table, live)


def _count(conn: Connection, statement: sql.Composed, params: dict[str, object]) -> int:
    return int(one_row(conn.execute(statement, params))[0])


def _cost(conn: Connection, statement: sql.Composed, params: dict[str, object]) -> float:
    return float(_plan(conn, statement, params)["Total Cost"])


def _plan(conn: Connection, statement: sql.Composed, params: dict[str, object]) -> dict[str, Any]:
    explained = one_row(conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement), params))[0]
    return dict(explained[0]["Plan"])


def _node_types(plan: dict[str, Any]) -> set[str]:
    return {plan["Node Type"]}.union(*(_node_types(child) for child in plan.get("Plans", [])))
