"""msggc: batched, resumable garbage collection of processed messages on PostgreSQL.

``collect(dsn, options, finisher)`` is the whole engine behind one call; the CLI and the HTTP
API are thin shells over it. A webhook for each run's end comes from the service layer:
``collect(dsn, options, NoticeFinisher(WebhookNotifier(url)))`` (``engine.service.notice``).
"""

from engine.collector import collect
from engine.config import GcOptions, TableSpec
from engine.errors import MsggcError
from engine.finish import Finisher, Outcome
from engine.result import GcResult, Progress
from engine.status import RunStatus

__all__ = ["Finisher", "GcOptions", "GcResult", "MsggcError", "Outcome", "Progress", "RunStatus", "TableSpec",
           "collect"]
