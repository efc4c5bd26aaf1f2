"""Prometheus metrics of the service (``GET /metrics``).

What the databases know (runs by status, rows deleted, undelivered webhooks, node reachable)
is read from every node at scrape time, so the answer is true whichever process did the work
(an in-service worker, a separate ``msggc worker``, a CLI run) and survives restarts. Batch
latency exists only where the batches run, so it is a histogram of this process's worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import probe_record, runs
from engine.db import connect
from engine.result import GcResult, Progress
from engine.service import outbox
from engine.service.nodes import Node
from engine.service.requests import on_every_node
from engine.service.settings import ServiceSettings
from engine.status import FINISHED

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RUN_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
SCHEDULE_OUTCOMES = ("queued", "joined", "failed")


class DatabaseCollector(Collector):
    """Reads each node's ``gc_runs``/``gc_outbox`` when Prometheus scrapes."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("msggc_node_up", "1 when the node's database answered this scrape",
                               labels=["node"])
        by_status = GaugeMetricFamily("msggc_runs", "GC runs by status", labels=["node", "status"])
        deleted = CounterMetricFamily("msggc_messages_deleted", "Rows deleted by all GC runs",
                                      labels=["node"])
        backlog = GaugeMetricFamily("msggc_outbox_backlog", "Completion webhooks not delivered yet",
                                    labels=["node"])
        latency = GaugeMetricFamily(
            "msggc_app_latency_ms", "The latency guard's probe: commit latency of a tiny synchronous"
            " write beside the latest guarded run (live while it runs)", labels=["node", "quantile"])
        held_back = GaugeMetricFamily("msggc_held_back_seconds",
                                      "Time the latency guard paused the latest guarded run", labels=["node"])
        share = GaugeMetricFamily("msggc_rate_share", "The WAL rate the latency guard grants the latest"
                                  " guarded run, as a share of its full speed (1: not slowed)",
                                  labels=["node"])
        rates = GaugeMetricFamily("msggc_guard_wal_bytes_per_second", "The latest guarded run's WAL rate:"
                                  " granted by the guard, or written by the server", labels=["node", "kind"])
        checkpoints = GaugeMetricFamily("msggc_guard_checkpoints_requested", "Checkpoints the server"
                                        " requested since the latest guarded run began", labels=["node"])
        before = GaugeMetricFamily("msggc_app_latency_before_ms", "The probe's commit p99 in the second"
                                   " before the latest guarded run (the application alone)", labels=["node"])
        writes = GaugeMetricFamily("msggc_guard_backend_writes", "Buffers client backends wrote themselves"
                                   " (dirty pages evicted) since the latest guarded run began, as its"
                                   " series last said (live while it runs)", labels=["node"])
        guard_families = (latency, held_back, share, rates, checkpoints, before, writes)
        alerting = AlertFamilies()
        for result in on_every_node(self.settings, self._read):
            label = result.node.label
            up.add_metric([label], 1 if result.value is not None else 0)
            if result.value is None:
                continue
            totals, pending, probe, signals = result.value
            for status, (count, _) in sorted(totals.items()):
                by_status.add_metric([label, status], count)
            deleted.add_metric([label], sum(rows for _, rows in totals.values()))
            backlog.add_metric([label], pending.pending)
            if probe is not None:
                _add_probe(label, probe, *guard_families)
            alerting.add(label, signals, pending)
        yield from (up, by_status, deleted, backlog, *guard_families, *alerting.families())

    def _read(self, node: Node) -> tuple[dict[str, tuple[int, int]], outbox.Backlog, dict[str, Any] | None,
                                         dict[str, Any]]:
        """One node's run totals and backlog; ``on_every_node`` asks all nodes at once, so an
        unreachable node costs the scrape one connect timeout, not one per node."""
        with connect(node.dsn, timeout_s=self.settings.connect_timeout_s) as conn:
            table = self.settings.table_name(node)
            return (runs.totals(conn, table, node.name), outbox.backlog(conn, node.name),
                    probe_record.latest_figures(conn, table, node.name), runs.signals(conn, table, node.name))


def _add_probe(label: str, probe: dict[str, Any], latency: GaugeMetricFamily, held_back: GaugeMetricFamily,
               share: GaugeMetricFamily, rates: GaugeMetricFamily, checkpoints: GaugeMetricFamily,
               before: GaugeMetricFamily, writes: GaugeMetricFamily) -> None:
    """The probe row's figures as gauges (a figure not measured yet is left out)."""
    for quantile, column in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
        if probe[column] is not None:
            latency.add_metric([label, quantile], probe[column])
    held_back.add_metric([label], probe["held_back_seconds"])
    share.add_metric([label], probe["rate_share"])
    for kind, column in (("granted", "rate_bytes_per_s"), ("written", "wal_bytes_per_s")):
        if probe[column] is not None:
            rates.add_metric([label, kind], probe[column])
    checkpoints.add_metric([label], probe["checkpoints_requested"])
    if probe["before_p99_ms"] is not None:
        before.add_metric([label], probe["before_p99_ms"])
    if probe["backend_writes"] is not None:
        writes.add_metric([label], probe["backend_writes"])


class AlertFamilies:
    """The series the alert rules (``deploy/prometheus/msggc-alerts.yml``) watch, per node. Times
    are timestamps, not ages, so that a rule compares them with ``time()`` whenever it runs."""

    def __init__(self) -> None:
        self.last_status = GaugeMetricFamily(
            "msggc_last_run_status", "1 for the status the node's newest finished run ended with"
            " (complete, stopped or failed), 0 for the others", labels=["node", "status"])
        self.last_finished = GaugeMetricFamily(
            "msggc_last_run_finished_timestamp_seconds", "When the node's newest finished run ended",
            labels=["node"])
        self.progress = GaugeMetricFamily(
            "msggc_run_last_progress_timestamp_seconds", "The last checkpoint of the node's running run"
            " (absent while none runs): every batch advances it, a stalled run does not", labels=["node"])
        self.oldest = GaugeMetricFamily(
            "msggc_outbox_oldest_timestamp_seconds", "Since when the oldest undelivered completion"
            " webhook waits (absent while none waits)", labels=["node"])
        self.throttled = CounterMetricFamily(
            "msggc_throttled_seconds", "Time finished runs spent paused by the WAL-rate, replica-lag"
            " and vacuum throttles", labels=["node"])
        self.pauses = CounterMetricFamily(
            "msggc_throttle_pauses", "Pauses of finished runs by those throttles", labels=["node"])

    def add(self, label: str, signals: dict[str, Any], pending: outbox.Backlog) -> None:
        if signals["last_status"] is not None:
            for status in FINISHED:
                self.last_status.add_metric([label, status], 1 if status == signals["last_status"] else 0)
            self.last_finished.add_metric([label], signals["last_finished"])
        if signals["progress"] is not None:
            self.progress.add_metric([label], signals["progress"])
        if pending.oldest_at is not None:
            self.oldest.add_metric([label], pending.oldest_at)
        self.throttled.add_metric([label], signals["throttled_seconds"])
        self.pauses.add_metric([label], signals["throttle_pauses"])

    def families(self) -> tuple[Metric, ...]:
        return (self.last_status, self.last_finished, self.progress, self.oldest, self.throttled, self.pauses)


class Metrics:
    """One registry per service instance (tests run several in one process). ``from_databases``
    off: only this process's own series (``msggc worker``'s, :mod:`engine.service.metrics_server`)."""

    def __init__(self, settings: ServiceSettings, from_databases: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.batch_seconds = Histogram(
            "msggc_batch_duration_seconds", "Duration of one delete batch and its checkpoint",
            ["node"], buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.run_seconds = Histogram(
            "msggc_run_duration_seconds", "Duration of the runs this process executed, by how they ended",
            ["node", "status"], buckets=RUN_BUCKETS, registry=self.registry,
        )
        if from_databases:
            self.registry.register(DatabaseCollector(settings))
        self.scheduled = Counter(
            "msggc_scheduled_requests", "GC requests this process's schedule made, by node and outcome"
            " (queued, joined, or failed: that node missed its scheduled GC)", ["node", "outcome"],
            registry=self.registry,
        )

    def watch_schedule(self, nodes: Iterable[Node], next_at: Callable[[], datetime | None]) -> None:
        """Export the schedule's next time, and its request counters at 0 from the start: a
        counter that first appears at 1 shows no ``increase()``, so the first miss would not alert."""
        for node in nodes:
            for outcome in SCHEDULE_OUTCOMES:
                self.scheduled.labels(node.label, outcome)
        gauge = Gauge("msggc_schedule_next_timestamp_seconds", "When this process's schedule requests"
                      " the next GC (long past: the schedule missed it)", registry=self.registry)
        gauge.set_function(lambda: when.timestamp() if (when := next_at()) is not None else math.nan)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def batch_observer(self, node: Node) -> Callable[[Progress], None]:
        """An ``on_progress`` callback feeding the batch latency histogram."""
        histogram = self.batch_seconds.labels(node.label)
        return lambda progress: histogram.observe(progress.batch_s)

    def observe_run(self, node: Node, result: GcResult) -> None:
        self.run_seconds.labels(node.label, str(result.status)).observe(result.elapsed_s)
