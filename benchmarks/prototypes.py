"""Proposed engine changes, patched into ``engine`` inside a benchmark child only.

Why here and not in ``engine/``: a change to the hot path must be measured before it is
proposed, on the same copies and beside the same load as the current engine. A contender
``msggc_<strategy>+<name>`` runs the engine with the patch ``<name>`` applied; nothing else in
the process (or the repository) sees it. Each patch states the exact change it stands for.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg import sql


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
    "async": _async_commit,
}


def apply(name: str) -> None:
    """Patch the engine with prototype ``name`` (in this process only)."""
    try:
        PROTOTYPES[name]()
    except KeyError:
        raise SystemExit(f"unknown prototype {name!r}: choose one of {', '.join(PROTOTYPES)}") from None
