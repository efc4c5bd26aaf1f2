"""How a run ends: one decision of its final status, one way to close it, for every path.

A run is closed by the collector when its walk ends, by the collector when an error meets it
after its row exists, and by the service's worker when a queued run cannot even start: all go
through :func:`close`. What the outside world hears of it (a webhook, a log line) is the
:class:`Finisher`'s business, handed in by the caller: the core knows no contract and no outbox.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psycopg

from engine import runs
from engine.db import Connection
from engine.errors import MsggcError
from engine.status import RunStatus


@dataclass(frozen=True)
class Outcome:
    """A closed run: ``failure`` says why whenever the status is not ``complete``."""

    run_id: int
    node: str
    status: RunStatus
    messages_deleted: int
    failure: str | None = None

    def __post_init__(self) -> None:
        if (self.status is RunStatus.COMPLETE) != (self.failure is None):
            raise ValueError(f"a {self.status} outcome {'needs' if self.failure is None else 'has no'}"
                             " failure details")


class Finisher(Protocol):
    """Told of every run's end: ``record`` inside the closing transaction, ``deliver`` after it."""

    def record(self, conn: Connection, outcome: Outcome) -> None:
        """Write what must commit with the run's end (a notice in the outbox)."""

    def deliver(self, conn: Connection | None, outcome: Outcome) -> str | None:
        """Deliver after the commit (``conn`` is None when the database is gone and nothing was
        recorded); returns why a notice is not delivered yet, or None."""


class SilentFinisher:
    """For callers who read the result and want no notice."""

    def record(self, conn: Connection, outcome: Outcome) -> None:
        return None

    def deliver(self, conn: Connection | None, outcome: Outcome) -> str | None:
        return None


def decide(walked_to_end: bool, error: str | None, stop_reason: str | None) -> tuple[RunStatus, str | None]:
    """The final status and its failure details; ``complete`` only when no error met the run and
    every slice of the walk reached its end."""
    if error:
        return RunStatus.FAILED, error
    if walked_to_end:
        return RunStatus.COMPLETE, None
    reason = stop_reason or "a worker ended before its slices"
    return RunStatus.STOPPED, (f"GC stopped ({reason}) before the end of the table;"
                               " run it again to continue from its checkpoint")


@dataclass(frozen=True)
class Closed:
    outcome: Outcome
    recorded: bool
    """False when the database went away: the run stays resumable at its last checkpoint."""
    notification_error: str | None
    conn: Connection
    """The connection the run was closed on (a fresh one when the first had gone away)."""


Decision = Callable[[], tuple[RunStatus, str | None]]
"""The run's final status and failure, asked again after a reconnect (the server may have lost
batches that looked committed)."""


def close(conn: Connection, run_id: int, node: str, decision: Decision, finisher: Finisher, *,
          reconnect: Callable[[], Connection] | None = None, deleted_so_far: int = 0,
          throttle_pauses: int = 0, throttled_s: float = 0.0) -> Closed:
    """Close the run and record its notice in one transaction, then deliver the notice. If the
    connection went away (killed, failover), close it on a new one when ``reconnect`` gives one;
    only when the database stays gone is the run left resumable and its notice sent directly."""
    counts = (throttle_pauses, throttled_s)
    try:
        return _closed_on(conn, run_id, node, decision, finisher, counts)
    except psycopg.OperationalError as exc:
        lost = f"database connection lost: {exc}".strip()
    if reconnect is not None:
        try:
            return _closed_on(reconnect(), run_id, node, decision, finisher, counts)
        except (psycopg.OperationalError, MsggcError) as exc:
            lost = f"database connection lost: {exc}".strip()
    failure = decision()[1]
    outcome = Outcome(run_id, node, RunStatus.FAILED, deleted_so_far,
                      f"{failure}; {lost}" if failure else lost)
    return Closed(outcome, False, finisher.deliver(None, outcome), conn)


def _closed_on(conn: Connection, run_id: int, node: str, decision: Decision, finisher: Finisher,
               counts: tuple[int, float]) -> Closed:
    status, failure = decision()
    with conn.transaction():
        deleted = runs.finish(conn, run_id, status, failure, *counts)
        outcome = Outcome(run_id, node, status, deleted, failure)
        finisher.record(conn, outcome)
    return Closed(outcome, True, finisher.deliver(conn, outcome), conn)
