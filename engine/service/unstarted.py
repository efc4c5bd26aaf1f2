"""A GC the service requests by itself (its schedule) on a node where none can start still gets
that node's webhook: ``failed``, with the 1014 error and the reason, as the seed's completion
failure says.

Why not in the node's own outbox: its database is what cannot be reached. The failure is recorded
as a failed run of that node (``gc_runs.node`` names it) with its notice, in one transaction, in
the database of the first node of the same request that did start; that node's delivery loop
posts it with the retries and backoff of any notice, so it is as durable as the others while the
node is down. With no such node (a single instance, every node down) it is posted at once, once,
as the notice of a run whose database went away is (:func:`engine.finish.close`). The node's runs
resume with the next request that reaches its database.

A PUT gets no such webhook: its answer already carries the node's 1014 (the seed's "Errors
Returned in Response"), and a second word on it would read as a GC that ran and failed.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from engine import runs
from engine.errors import MsggcError
from engine.finish import Outcome
from engine.service import outbox
from engine.service.nodes import Node
from engine.service.notice import NoticeFinisher
from engine.service.requests import NodeResult
from engine.service.settings import ServiceSettings
from engine.status import RunStatus

log = logging.getLogger("msggc.unstarted")


def notify(settings: ServiceSettings, results: list[NodeResult[Any]]) -> None:
    """A failure webhook for every node of the request that could not start, kept by a node that
    did (else posted directly)."""
    keepers = [result.node for result in results if result.ok]
    for result in results:
        if result.error is None:
            continue
        finisher = NoticeFinisher(settings.notifier())
        if not any(_kept(settings, keeper, result.node, result.error, finisher) for keeper in keepers):
            outcome = Outcome(0, result.node.name, RunStatus.FAILED, 0, result.error)
            if (error := finisher.deliver(None, outcome)) is not None:
                log.warning("node %s: its failure webhook is lost, no database can keep it: %s",
                            result.node.label, error)
            else:
                log.info("node %s: failure webhook posted directly (no database can keep it)",
                         result.node.label)


def _kept(settings: ServiceSettings, keeper: Node, node: Node, details: str,
          finisher: NoticeFinisher) -> bool:
    """The failed run of ``node`` and its notice recorded in ``keeper``'s database; a notifier
    that keeps nothing (the log) is told at once."""
    try:
        pool = settings.slots_of(keeper)
        with pool.connection(keeper.dsn, settings.connect_timeout_s) as conn, conn.transaction():
            run_id = runs.record_unstarted(conn, settings.table_name(node), node.name, details,
                                           {outbox.KEPT_BY: keeper.name})
            outcome = Outcome(run_id, node.name, RunStatus.FAILED, 0, details)
            finisher.record(conn, outcome)
    except (MsggcError, psycopg.Error) as exc:
        log.warning("node %s: cannot keep the failure notice of node %s: %s", keeper.label, node.label, exc)
        return False
    if finisher.notifier.target is None:
        finisher.deliver(None, outcome)
    log.info("node %s: failure webhook of run %s queued in node %s's outbox",
             node.label, run_id, keeper.label)
    return True
