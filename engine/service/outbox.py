"""``gc_outbox``: completion notices written with the run's last transaction, delivered after.

Each row is retried with exponential backoff until the callback server answers 2xx; a row is
marked delivered once, under a row lock, so two deliverers never post the same notice twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.db import Connection, one_row
from engine.errors import MsggcError
from engine.service.notify import Notifier

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0


def enqueue(conn: Connection, run_id: int, target: str, body: bytes, signature: str | None) -> int:
    """Queue a notice with the signature of the process that queued it (see the column)."""
    row = one_row(conn.execute(
        "INSERT INTO gc_outbox (run_id, target_url, body, signature) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (run_id, target, body.decode(), signature),
    ))
    return int(row[0])


def backoff_s(attempts: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** max(attempts - 1, 0))


def deliver_due(conn: Connection, notifier_for: Callable[[str], Notifier],
                run_id: int | None = None, target: str | None = None) -> tuple[int, int]:
    """Try every due notice once (or only the run's, or only those for ``target``), oldest first;
    returns (delivered, still pending)."""
    delivered = pending = 0
    after = 0
    while True:
        with conn.transaction():
            row = conn.execute(
                "SELECT id, target_url, body, signature, attempts FROM gc_outbox"
                " WHERE delivered_at IS NULL AND next_attempt_at <= now() AND id > %(after)s"
                " AND (%(run)s::bigint IS NULL OR run_id = %(run)s)"
                " AND (%(target)s::text IS NULL OR target_url = %(target)s)"
                " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                {"run": run_id, "after": after, "target": target},
            ).fetchone()
            if row is None:
                return delivered, pending
            after, url, body, signature, attempts = row
            try:
                notifier_for(url).send(body.encode(), delivery_id=str(after), signature=signature)
            except MsggcError as exc:  # DeliveryFailed, or a stored URL that is not valid
                # backoff counted from the end of the attempt (clock_timestamp), not from the
                # transaction's start: a slow server's timeout must not use the backoff up
                conn.execute(
                    "UPDATE gc_outbox SET attempts = attempts + 1, last_error = %s,"
                    " next_attempt_at = clock_timestamp() + make_interval(secs => %s) WHERE id = %s",
                    (str(exc), backoff_s(attempts + 1), after),
                )
                pending += 1
            else:
                conn.execute(
                    "UPDATE gc_outbox SET attempts = attempts + 1, delivered_at = now(),"
                    " last_error = NULL WHERE id = %s",
                    (after,),
                )
                delivered += 1


def deliver_run(conn: Connection, notifier: Notifier, run_id: int, attempts: int = 3) -> str | None:
    """Deliver one run's notice with a few quick retries; returns the last error if still queued.

    Once the target has answered, the notices still due for it go too, oldest first: those of a
    collector that died after its last transaction but before delivering, or of a server that
    was down when their run ended.
    """
    error = _deliver_with_retries(conn, notifier, run_id, attempts)
    if error is None and notifier.target:
        deliver_due(conn, lambda _url: notifier, target=notifier.target)
    return error


def _deliver_with_retries(conn: Connection, notifier: Notifier, run_id: int, attempts: int) -> str | None:
    for attempt in range(attempts):
        _, pending = deliver_due(conn, lambda _url: notifier, run_id)
        if not pending:
            return None
        if attempt + 1 < attempts:
            time.sleep(backoff_s(attempt + 1))
            conn.execute("UPDATE gc_outbox SET next_attempt_at = now() WHERE run_id = %s"
                         " AND delivered_at IS NULL", (run_id,))
    row = conn.execute("SELECT last_error FROM gc_outbox WHERE run_id = %s"
                       " AND delivered_at IS NULL ORDER BY id DESC LIMIT 1", (run_id,)).fetchone()
    return row[0] if row else None


@dataclass(frozen=True)
class Backlog:
    """Notices of a node's runs not delivered yet, and since when the oldest waits (epoch seconds:
    its run's end, when it was queued), for the metrics and the undelivered-webhook alert."""

    pending: int
    oldest_at: float | None


KEPT_BY = "notice_kept_by"
"""In ``gc_runs.options`` of a failed run of an unreachable node recorded in another node's
database (:mod:`engine.service.unstarted`): that node, whose outbox holds and delivers its notice."""
NODES_NOTICES = "o.delivered_at IS NULL AND (r.node = %(node)s OR r.options ->> %(kept_by)s = %(node)s)"
"""A node's notices waiting in its database: its runs', and those it keeps for a node that was down."""


def backlog(conn: Connection, node: str) -> Backlog:
    row = one_row(conn.execute(
        "SELECT count(*), extract(epoch FROM min(r.finished_at))::float8 FROM gc_outbox o"
        " JOIN gc_runs r ON r.id = o.run_id WHERE " + NODES_NOTICES,
        {"node": node, "kept_by": KEPT_BY},
    ))
    return Backlog(int(row[0]), row[1])


def waiting(conn: Connection, node: str) -> dict[str, Any]:
    """This node's notices not delivered yet: how many, the most attempts one has had, the last
    error of the oldest, when the next is due (the status page's outbox)."""
    cur = conn.execute(
        "SELECT count(*) AS waiting, coalesce(max(o.attempts), 0) AS attempts,"
        " (array_agg(o.last_error ORDER BY o.id) FILTER (WHERE o.last_error IS NOT NULL))[1] AS last_error,"
        " min(o.next_attempt_at) AS next_attempt_at"
        " FROM gc_outbox o JOIN gc_runs r ON r.id = o.run_id WHERE " + NODES_NOTICES,
        {"node": node, "kept_by": KEPT_BY},
    )
    row = one_row(cur)
    return dict(zip([c.name for c in cur.description or []], row, strict=True))
