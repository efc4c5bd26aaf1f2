"""msggc: batched, resumable garbage collection of processed messages on PostgreSQL.

``collect(dsn, options, finisher)`` is the whole engine behind one call; the CLI and the HTTP
API are thin shells over it. A webhook for each run's end comes from the service layer:
``collect(dsn, options, NoticeFinisher(WebhookNotifier(url)))`` (``engine.service.notice``).

``collect``, ``Finisher``, ``Outcome``, ``GcResult`` and ``Progress`` are imported on first use
(module ``__getattr__``): importing ``engine`` or ``engine.cli`` stays cheap, and psycopg is loaded
only when a command needs the database (``msggc --help`` never does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.config import GcOptions, TableSpec
from engine.errors import MsggcError
from engine.status import RunStatus

if TYPE_CHECKING:
    from engine.collector import collect
    from engine.finish import Finisher, Outcome
    from engine.result import GcResult, Progress

__all__ = ["Finisher", "GcOptions", "GcResult", "MsggcError", "Outcome", "Progress", "RunStatus", "TableSpec",
           "collect"]

_LAZY = {"collect": "engine.collector", "Finisher": "engine.finish", "Outcome": "engine.finish",
         "GcResult": "engine.result", "Progress": "engine.result"}


def __getattr__(name: str) -> Any:
    """The public names whose modules need psycopg, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
