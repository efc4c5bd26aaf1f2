"""Proposed engine changes, patched into ``engine`` inside a benchmark child only.

Why here and not in ``engine/``: a change to the hot path must be measured before it is
proposed, on the same copies and beside the same load as the current engine. A contender
``msggc_<strategy>+<name>`` runs the engine with the patch ``<name>`` applied; nothing else in
the process (or the repository) sees it. Each patch states the exact change it stands for.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any


def xactcount() -> None:
    """Count the child rows PostgreSQL deletes by ON DELETE CASCADE from the batch transaction's
    own statistics: ``pg_stat_get_xact_tuples_deleted(child)`` read before and after the batch's
    DELETE, instead of ``SELECT count(*) FROM child WHERE (fk) IN (SELECT key FROM t WHERE range
    AND garbage)`` before it (a second pass over the range and one index probe per child row).

    Exact: the counter holds the rows of that table this transaction deleted, the cascade's
    included, and a batch transaction deletes nothing else there. Only for a CASCADE key whose
    child table is not the table itself, has no other foreign key onto it and is not archived
    (``--archive`` reads the child rows anyway); every other key is counted as before.
    """
    from engine import strategies
    from engine.db import one_row

    original = strategies._delete_range

    def by_statistics(st: Any) -> list[Any]:
        per_table = Counter(ref.child_oid for ref in st.target.references)
        return [ref for ref in st.changes_children
                if ref.removes_children and ref.name not in st.child_archives
                and per_table[ref.child_oid] == 1 and ref.child_oid != st.target.oid]

    def delete_range(conn: Any, st: Any, range_: Any, params: dict[str, Any], skip_locked: bool,
                     by_ctid: bool) -> Any:
        counted = by_statistics(st)
        if not counted:
            return original(conn, st, range_, params, skip_locked, by_ctid)
        query = "SELECT " + ", ".join("pg_stat_get_xact_tuples_deleted(%s)" for _ in counted)
        oids = [ref.child_oid for ref in counted]
        before = one_row(conn.execute(query, oids))
        others = tuple(ref for ref in st.target.references if ref not in counted)
        target = dataclasses.replace(st.target, references=others)
        outcome = original(conn, dataclasses.replace(st, target=target), range_, params, skip_locked, by_ctid)
        after = one_row(conn.execute(query, oids))
        outcome.references.update((ref.name, int(a - b))
                                  for ref, b, a in zip(counted, before, after, strict=True))
        return outcome

    strategies._delete_range = delete_range  # type: ignore[assignment]


def slices() -> None:
    """A plain table walked by several workers is cut into four slices per worker, taken from
    the one queue, instead of one slice each: where garbage is uneven (``aged``: the oldest 80%),
    a worker whose slice ends early takes the next instead of idling while the other walks on
    (100M aged rows, two workers: backends idle in 19% of the samples with a slice each)."""
    from engine import collector

    original = collector._planned_slices

    def planned(plans: dict[Any, Any], workers: int) -> list[Any]:
        return original(plans, workers * 4 if len(plans) == 1 and workers > 1 else workers)

    collector._planned_slices = planned  # type: ignore[assignment]


def probe() -> None:
    """The key walk of a dense key probes for where each range ends (``ORDER BY key OFFSET size
    LIMIT 1``) instead of cutting it by arithmetic: the engine before db63cff, kept to measure on
    the same copies what the arithmetic ranges gain."""
    from engine import strategies

    strategies.DenseKeyStrategy.run_batch = strategies.KeyStrategy.run_batch  # type: ignore[method-assign]


PROTOTYPES: dict[str, Callable[[], None]] = {"xactcount": xactcount, "slices": slices, "probe": probe}
"""Pending: ``xactcount`` (cascaded child rows counted from pg_stat_get_xact_tuples_deleted).
Earlier ones became ``--async-commit`` (``async``), the index walk (``onestmt``) and the key walk's
arithmetic ranges (``arith``); ``probe`` is the engine before the last."""


def apply(name: str) -> None:
    """Patch the engine with prototype ``name`` (in this process only)."""
    try:
        PROTOTYPES[name]()
    except KeyError:
        raise SystemExit(f"unknown prototype {name!r}: choose one of {', '.join(PROTOTYPES)}") from None
