"""Proposed engine changes, patched into ``engine`` inside a benchmark child only.

Why here and not in ``engine/``: a change to the hot path must be measured before it is
proposed, on the same copies and beside the same load as the current engine. A contender
``msggc_<strategy>+<name>`` runs the engine with the patch ``<name>`` applied; nothing else in
the process (or the repository) sees it. Each patch states the exact change it stands for.
"""

from __future__ import annotations

from collections.abc import Callable

PROTOTYPES: dict[str, Callable[[], None]] = {}
"""None pending: the last ones (``async``, ``onestmt``) became ``--async-commit`` and the index walk."""


def apply(name: str) -> None:
    """Patch the engine with prototype ``name`` (in this process only)."""
    try:
        PROTOTYPES[name]()
    except KeyError:
        raise SystemExit(f"unknown prototype {name!r}: choose one of {', '.join(PROTOTYPES)}") from None
