"""The seed's completion webhook for every run's end: the service's :class:`engine.finish.Finisher`.

The body is built from the run's :class:`~engine.finish.Outcome` alone, so its ``status`` is the
run's. With a callback URL the notice is queued in ``gc_outbox`` inside the run's closing
transaction, signed there once (a later deliverer with another secret sends it unchanged), and
delivered after the commit; a notice that cannot be queued (the database is gone) is sent directly.
"""

from __future__ import annotations

from engine.db import Connection
from engine.errors import MsggcError
from engine.finish import Outcome
from engine.service import outbox
from engine.service.contract import completion
from engine.service.notify import Notifier, encode


def body_of(outcome: Outcome) -> bytes:
    return encode(completion(outcome.messages_deleted, node=outcome.node or None, failure=outcome.failure))


class NoticeFinisher:
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def record(self, conn: Connection, outcome: Outcome) -> None:
        if self.notifier.target:
            body = body_of(outcome)
            outbox.enqueue(conn, outcome.run_id, self.notifier.target, body, self.notifier.signature(body))

    def deliver(self, conn: Connection | None, outcome: Outcome) -> str | None:
        if conn is not None and self.notifier.target:
            return outbox.deliver_run(conn, self.notifier, outcome.run_id)
        body = body_of(outcome)
        try:
            self.notifier.send(body, signature=self.notifier.signature(body))
        except MsggcError as exc:
            return str(exc)
        return None
