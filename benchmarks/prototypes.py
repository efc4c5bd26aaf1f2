"""Proposed engine changes, patched into ``engine`` inside a benchmark child only.

Why here and not in ``engine/``: a change to the hot path must be measured before it is
proposed, on the same copies and beside the same load as the current engine. A contender
``msggc_<strategy>+<name>`` runs the engine with the patch ``<name>`` applied; nothing else in
the process (or the repository) sees it. Each patch states the exact change it stands for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg import sql


def _index_one_statement() -> None:
    """Index strategy in one round trip: pick the keys and delete them in one statement.

    Today ``IndexStrategy.run_batch`` fetches up to ``size`` keys into Python and sends them
    back as an array parameter (two statements, every key over the wire twice). Proposed:
    ``Statements.delete_next_garbage`` below, executed once per batch; it keeps the
    ``key = ANY(ARRAY(...))`` primary-key plan (stable whatever the statistics) and returns the
    count deleted, the count of keys picked and the last key (the new position).
    """
    from engine import strategies
    from engine.queries import Statements

    original = strategies.IndexStrategy.run_batch

    def delete_next_garbage(st: Statements) -> sql.Composed:
        return st._format(
            "WITH picked AS MATERIALIZED ("
            " SELECT {k} FROM {t} WHERE {garbage} AND {k} > %(lo)s AND {k} <= %(end)s"
            " ORDER BY {k} LIMIT %(size)s),"
            " gone AS (DELETE FROM {t} WHERE {k} = ANY(ARRAY(SELECT {k} FROM picked))"
            " AND {garbage} RETURNING 1)"
            " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM picked),"
            " (SELECT max({k}) FROM picked)"
        )

    def run_batch(self: Any, conn: Any, st: Statements, part: Any, size: int,
                  params: dict[str, Any], skip_locked: bool) -> Any:
        if skip_locked:
            return original(self, conn, st, part, size, params, skip_locked)
        probe = {**params, "lo": part.position, "end": part.end, "size": size}
        deleted, picked, last = conn.execute(delete_next_garbage(st), probe).fetchone()
        position = last if picked == size else part.end
        return strategies.BatchOutcome(deleted, 0, position)

    strategies.IndexStrategy.run_batch = run_batch  # type: ignore[method-assign]


def _async_commit() -> None:
    """Batch transactions commit with ``synchronous_commit = off``.

    Proposed: ``engine.queries.SET_TIMEOUTS`` gains
    ``set_config('synchronous_commit', 'off', true)`` (transaction-local, so only the batch
    transactions use it; the run's final report transaction stays synchronous, and flushing
    its commit flushes every earlier batch with it). Why it is safe: a batch's DELETE and its
    checkpoint commit together, so a crash that loses the last async commits loses both: the
    resumed run deletes those rows again and counts them once. Why it may pay: each batch no
    longer waits for its WAL flush; the WAL writer flushes in the background.
    """
    from engine import collector

    collector.SET_TIMEOUTS = sql.SQL(
        "SELECT set_config('lock_timeout', %(lock_timeout)s, true),"
        " set_config('statement_timeout', %(statement_timeout)s, true),"
        " set_config('synchronous_commit', 'off', true)"
    )


PROTOTYPES: dict[str, Callable[[], None]] = {
    "onestmt": _index_one_statement,
    "async": _async_commit,
}


def apply(name: str) -> None:
    """Patch the engine with prototype ``name`` (in this process only)."""
    try:
        PROTOTYPES[name]()
    except KeyError:
        raise SystemExit(f"unknown prototype {name!r}: choose one of {', '.join(PROTOTYPES)}") from None
