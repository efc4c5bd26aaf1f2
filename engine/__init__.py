"""msggc: batched, resumable garbage collection of processed messages on PostgreSQL.

``collect(dsn, options, notifier)`` is the whole engine behind one call; the CLI and the HTTP
API are thin shells over it.
"""

from engine.collector import GcResult, Progress, collect
from engine.config import GcOptions, TableSpec
from engine.errors import MsggcError
from engine.service.notify import LogNotifier, Notifier, WebhookNotifier

__all__ = ["GcOptions", "GcResult", "LogNotifier", "MsggcError", "Notifier", "Progress", "TableSpec",
           "WebhookNotifier", "collect"]
