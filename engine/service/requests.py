"""What the HTTP API asks of each node: queue (or join) a GC, read its status.

Nodes are asked in parallel with a short connect timeout, and a node that cannot answer
becomes an error entry instead of holding the whole answer back: the seed's multiconnect
answer reports every node on its own. Each asks on a connection of its server's pool
(:mod:`engine.service.slots`), so a PUT to a hundred databases of one server does not open a
hundred connections at once. Nothing here runs a GC; the worker does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg

from engine import baseline, runs
from engine.config import AUTO_LATENCY
from engine.db import helpful_lines, primary_message, require_bookkeeping
from engine.errors import DatabaseUnreachable, MsggcError
from engine.service.nodes import Node, unreachable_details
from engine.service.settings import ServiceSettings
from engine.target import resolve as resolve_target

T = TypeVar("T")

AUTO_LATENCY_MARK = baseline.AUTO_MARK
"""Set on a queued run whose latency budget is ``auto``: its worker measures it before the run."""
REQUESTED_MARK = "requested_epoch"
"""When the request (a PUT, a scheduled time) was made, the same on every node: runs wait for
their connections in the order they were requested, a request's nodes in the configuration's
order."""
MAX_PARALLEL = 16
"""Nodes asked at once; each also waits for a connection of its server's pool."""


@dataclass(frozen=True)
class NodeResult(Generic[T]):
    """One node's answer: a value, or the details of a 1014 error."""

    node: Node
    value: T | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Started:
    run_id: int
    joined: bool


def on_every_node(settings: ServiceSettings, task: Callable[[Node], T]) -> list[NodeResult[T]]:
    """``task`` on all nodes at once; database failures become per-node errors, order kept."""

    def guarded(node: Node) -> NodeResult[T]:
        try:
            return NodeResult(node, value=task(node))
        except DatabaseUnreachable as exc:
            return NodeResult(node, error=unreachable_details(node, exc))
        except MsggcError as exc:
            return NodeResult(node, error=str(exc))
        except psycopg.Error as exc:
            return NodeResult(node, error=f"database error on {node.label}: {primary_message(exc)}"
                                          f"{helpful_lines(exc)}")

    if len(settings.nodes) == 1:
        return [guarded(settings.nodes[0])]
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(settings.nodes)),
                            thread_name_prefix="msggc-node") as pool:
        return list(pool.map(guarded, settings.nodes))


def request_gc(settings: ServiceSettings, overrides: Mapping[str, Any]) -> list[NodeResult[Started]]:
    """Queue a run on every node, or join the one already queued or running there."""
    requested = time.time()

    def start(node: Node) -> Started:
        options = settings.options_for(node, overrides)
        record = {**options.describe(), REQUESTED_MARK: requested}
        if options.max_app_latency_ms is None and settings.app_latency == AUTO_LATENCY:
            record[AUTO_LATENCY_MARK] = True
        with settings.slots_of(node).connection(node.dsn, settings.connect_timeout_s) as conn:
            require_bookkeeping(conn)
            resolve_target(conn, options.table, with_retention=options.older_than is not None)
            table = options.table.qualified
            run_id, joined = runs.enqueue_or_join(conn, table, node.name, record)
        return Started(run_id, joined)

    return on_every_node(settings, start)


def read_status(settings: ServiceSettings) -> list[NodeResult[dict[str, Any] | None]]:
    """The newest run of every node (``None`` before the first)."""

    def status(node: Node) -> dict[str, Any] | None:
        with settings.slots_of(node).connection(node.dsn, settings.connect_timeout_s) as conn:
            require_bookkeeping(conn)
            return runs.latest(conn, settings.table_name(node), node.name)

    return on_every_node(settings, status)
