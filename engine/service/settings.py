"""The service's configuration: nodes, default GC options, callback, auth and worker timings.

Sources, strongest first: a command-line flag (or its environment variable), the config file
(TOML or JSON, ``--config``/``MSGGC_CONFIG``), the built-in default. Every bad value raises
:class:`UsageError` with one line, so ``msggc serve`` exits 2 before it listens. Config file::

    callback_url = "http://127.0.0.1:9000/gc"     # completion webhooks (optional)
    webhook_secret = "..."                        # HMAC-SHA256 signature header (optional)
    token = "..."                                 # bearer token of the API (optional)
    stale_after_s = 60                            # a running run without heartbeat this long is resumed
    archive_dir = "/var/lib/msggc/archive"        # where PUT {"archive_to_file": true} writes (optional)
    cron = "0 3 * * *"                            # request a GC at these times, UTC (or every = "1h")
    table = "app.inbox"                           # the table to collect (default messages)
    key = "tenant_id,id"                          # its key columns (default: its primary key)
    processed_column = "handled_at"               # garbage once NOT NULL (default processed_at)
    where = "status = 'read'"                     # a filter the garbage must also pass (SQL)
    max_connections = 40                          # per database server, all msggc holds there
                                                  # (default: half the room the server has left)
    max_concurrent_gcs = 4                        # runs at once per database server (default 4)
    [nodes]                                       # multiconnect; omit for a single instance
    wacore1 = "postgresql://msggc@db1/app"
    [gc]                                          # default options of every run
    max_seconds = 3600
    batch_size = 2000
    sleep = 0.0
    max_app_latency_ms = "auto"                   # the default: 3x the probe's p99 measured
                                                  # before each run; 20 (or "20ms") sets it, "off"

The environment sets ``MSGGC_MAX_CONNECTIONS``, ``MSGGC_MAX_CONCURRENT_GCS`` and
``MSGGC_MAX_APP_LATENCY`` over the file. Runs of the service are gentle by default (``auto``);
``msggc gc`` on the command line keeps full speed unless given ``--max-app-latency``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.baseline import BASELINE_S
from engine.config import (
    AUTO_LATENCY,
    GcOptions,
    LatencySetting,
    TableSpec,
    given_dsn,
    parse_duration,
    parse_latency,
    parse_latency_setting,
    parse_size,
)
from engine.errors import UsageError
from engine.service import nodes as nodes_config
from engine.service.nodes import Node
from engine.service.notify import LogNotifier, Notifier, WebhookNotifier, check_url
from engine.service.slots import MIN_CONNECTIONS, ServerSlots, Slots
from engine.service.triggers import Trigger, trigger_of

DEFAULT_MAX_SECONDS = 3600.0
"""A run stops after an hour unless told otherwise; the next PUT continues where it stopped,
as the seed recommends for large tables."""

GC_KEYS = tuple(f.name for f in dataclasses.fields(GcOptions)
                if f.name not in ("table", "node", "dry_run", "latency_budget_auto"))
"""Options a config file may default and a queued run carries (table and node come from the service;
``latency_budget_auto`` from a run's ``auto`` mark, by its worker)."""
DURATION_KEYS = ("older_than", "max_replica_lag")
SIZE_KEYS = ("max_wal_rate",)
LATENCY_KEYS = ("max_app_latency_ms",)
FILE_KEYS = ("nodes", "dsn", "table", "key", "processed_column", "where", "callback_url", "webhook_secret",
             "token", "stale_after_s", "poll_s", "connect_timeout_s", "archive_dir", "every", "cron", "gc",
             "max_connections", "max_concurrent_gcs")
ENV_MAX_CONNECTIONS = "MSGGC_MAX_CONNECTIONS"
ENV_MAX_CONCURRENT_GCS = "MSGGC_MAX_CONCURRENT_GCS"
ENV_MAX_APP_LATENCY = "MSGGC_MAX_APP_LATENCY"


@dataclass(frozen=True)
class ServiceSettings:
    """Everything ``msggc serve``/``msggc worker`` need; immutable, passed explicitly."""

    nodes: tuple[Node, ...]
    multiconnect: bool = False
    defaults: GcOptions = field(default_factory=lambda: GcOptions(max_seconds=DEFAULT_MAX_SECONDS))
    callback_url: str | None = None
    webhook_secret: str | None = None
    token: str | None = None
    stale_after_s: float = 60.0
    poll_s: float = 1.0
    connect_timeout_s: float = 2.0
    run_worker: bool = True
    archive_dir: str | None = None
    """Directory of the files a request with ``archive_to_file`` writes, one per run."""
    schedule: Trigger | None = None
    """When ``serve`` and ``worker`` request a GC by themselves, if ever."""
    auto_app_latency: bool = True
    """Runs without a latency budget of their own get ``auto``: ``AUTO_FACTOR`` times the probe's
    p99 measured before the run (:mod:`engine.baseline`). Off with ``max_app_latency_ms = "off"``."""
    baseline_s: float = BASELINE_S
    max_connections: int | None = None
    """All the connections the service holds on one database server; None: half the room left."""
    max_concurrent_gcs: int | None = None
    """Runs at once on one database server; None: ``slots.DEFAULT_GCS``."""
    slots: Slots = field(default_factory=Slots, compare=False, repr=False)
    """The budgets of the servers, shared by the API and the worker (made on first use)."""

    def slots_of(self, node: Node) -> ServerSlots:
        return self.slots.of(node, self.max_connections, self.max_concurrent_gcs, self.connect_timeout_s)

    @property
    def app_latency(self) -> LatencySetting:
        """The latency budget a run gets unless its request sets one."""
        if self.defaults.max_app_latency_ms is not None:
            return self.defaults.max_app_latency_ms
        return AUTO_LATENCY if self.auto_app_latency else None

    def table_of(self, node: Node) -> TableSpec:
        """The node's own table when its entry in the config file names one (described by that
        entry alone); else the service's, with what the entry says differently."""
        own, base = node.target, self.defaults.table
        described = own.get("key"), own.get("processed_column"), own.get("where")
        if "table" in own:
            return TableSpec.parse(own["table"], *described)
        changed = TableSpec.parse(base.qualified, *described)
        return dataclasses.replace(base, key=changed.key or base.key,
                                   processed_column=changed.processed_column or base.processed_column,
                                   where=changed.where or base.where)

    def table_name(self, node: Node) -> str:
        """How the node's runs name their table in ``gc_runs`` (the queue's key, with the node)."""
        return self.table_of(node).qualified

    def options_for(self, node: Node, overrides: Mapping[str, Any]) -> GcOptions:
        """The configured defaults with a request's overrides, for one node."""
        overrides = dict(overrides)
        if "archive_to_file" in overrides:
            wanted = overrides.pop("archive_to_file")
            if wanted and not self.archive_dir:
                raise UsageError("archive_to_file: this service has no archive_dir configured")
            overrides["archive_to"] = self.archive_dir if wanted else None
        try:
            return dataclasses.replace(self.defaults, node=node.name, table=self.table_of(node), **overrides)
        except TypeError as exc:
            raise UsageError(f"invalid GC options: {exc}") from None

    def check_options(self, overrides: Mapping[str, Any]) -> None:
        """A request's options mean the same on every node: refuse bad ones once, as the client's fault."""
        self.options_for(self.nodes[0], overrides)

    def options_of_run(self, node: Node, record: Mapping[str, Any]) -> GcOptions:
        """Rebuild the options a run was queued with (``GcOptions.describe()`` of the API)."""
        return self.options_for(node, gc_values({k: v for k, v in record.items() if k in GC_KEYS}))

    def notifier(self) -> Notifier:
        """Durable webhook when a callback URL is configured, else a JSON line on stderr."""
        return self.webhook(self.callback_url) if self.callback_url else LogNotifier()

    def webhook(self, url: str) -> WebhookNotifier:
        return WebhookNotifier(url, secret=self.webhook_secret)


def gc_values(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """GC option values from a config table or a stored run: durations as ``30d`` or seconds,
    sizes as ``50MB`` or bytes, latencies as ``20ms`` or milliseconds."""
    unknown = sorted(set(mapping) - set(GC_KEYS))
    if unknown:
        raise UsageError(f"unknown GC option(s) {', '.join(unknown)}; known: {', '.join(GC_KEYS)}")
    values = dict(mapping)
    for key in DURATION_KEYS:
        if key in values:
            values[key] = _as_duration(values[key])
    for key in SIZE_KEYS:
        if isinstance(values.get(key), str):
            values[key] = parse_size(values[key])
    for key in LATENCY_KEYS:
        if isinstance(values.get(key), str):
            values[key] = parse_latency(values[key])
    return values


def _as_duration(value: Any) -> Any:
    """``30d`` or a number of seconds as a timedelta; anything else unchanged, for the caller to judge."""
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    return value


def read_config(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (anything else) config file, its keys checked."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise UsageError(f"config file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a table/object at the top level")
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise UsageError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return data


def load_settings(*, dsn: str | None = None, nodes_spec: str | None = None, config: str | None = None,
                  callback_url: str | None = None, webhook_secret: str | None = None,
                  token: str | None = None, table: str | None = None, stale_after_s: float | None = None,
                  every: timedelta | None = None, cron: str | None = None,
                  run_worker: bool = True, default_dsn: Callable[[], str] | None = None) -> ServiceSettings:
    """Merge flags over the config file over the defaults; raise UsageError on any bad value.

    ``default_dsn`` is the shell's server for a service configured with no DSN and no nodes (the
    CLI's embedded one): called only then, since the config file may name either, and handed in
    because the service layer never starts a server itself."""
    file = read_config(config) if config else {}

    def pick(flag: Any, key: str, default: Any = None) -> Any:
        return flag if flag is not None else file.get(key, default)

    gc = file.get("gc", {})
    if not isinstance(gc, dict):
        raise UsageError("config key 'gc' must be a table of GC options")
    gc = dict(gc)
    in_file = gc.pop("max_app_latency_ms", "auto")
    latency = parse_latency_setting(os.environ.get(ENV_MAX_APP_LATENCY) or in_file)
    if isinstance(latency, float):
        gc["max_app_latency_ms"] = latency
    try:
        options = GcOptions(**{"max_seconds": DEFAULT_MAX_SECONDS, **gc_values(gc),
                               "table": TableSpec.parse(pick(table, "table", "messages"), file.get("key"),
                                                        file.get("processed_column"), file.get("where"))})
    except TypeError as exc:
        raise UsageError(f"invalid [gc] options: {exc}") from None
    node_set, multiconnect = _nodes(pick(dsn, "dsn"), nodes_spec, file.get("nodes"), default_dsn)
    return ServiceSettings(
        nodes=node_set,
        multiconnect=multiconnect,
        defaults=options,
        callback_url=_callback(pick(callback_url, "callback_url")),
        webhook_secret=pick(webhook_secret, "webhook_secret") or None,
        token=pick(token, "token") or None,
        stale_after_s=_positive(pick(stale_after_s, "stale_after_s", 60.0), "stale_after_s"),
        poll_s=_positive(file.get("poll_s", 1.0), "poll_s"),
        connect_timeout_s=_positive(file.get("connect_timeout_s", 2.0), "connect_timeout_s"),
        run_worker=run_worker,
        archive_dir=_directory(file.get("archive_dir")),
        schedule=_schedule(every, cron, file, run_worker),
        auto_app_latency=latency == AUTO_LATENCY,
        max_connections=_count(os.environ.get(ENV_MAX_CONNECTIONS) or file.get("max_connections"),
                               "max_connections", MIN_CONNECTIONS,
                               "one for the service's polls, two for a run and its latency probe"),
        max_concurrent_gcs=_count(os.environ.get(ENV_MAX_CONCURRENT_GCS) or file.get("max_concurrent_gcs"),
                                  "max_concurrent_gcs", 1, "one run at a time"),
    )


def _count(value: Any, name: str, least: int, why: str) -> int | None:
    """A whole number of at least ``least`` (None, "auto": the service's default)."""
    if value is None or value == "auto":
        return None
    try:
        number = int(value) if not isinstance(value, bool | float) and str(value).strip().isdigit() else None
    except ValueError:
        number = None
    if number is None:
        raise UsageError(f"{name} must be a whole number (or auto), not {value!r}")
    if number < least:
        raise UsageError(f"{name} must be at least {least} ({why}), not {number}")
    return number


def _nodes(dsn: str | None, spec: str | None, from_file: Any,
           default_dsn: Callable[[], str] | None) -> tuple[tuple[Node, ...], bool]:
    """Nodes from the flag/env, else from the file; else the single instance on ``dsn``
    (``$MSGGC_DSN``, else ``default_dsn()``)."""
    if spec and spec.strip():
        mapping: Mapping[str, Any] = nodes_config.parse_nodes(spec)
    elif from_file is not None:
        if not isinstance(from_file, dict):
            raise UsageError("config key 'nodes' must be a table of NAME = DSN")
        mapping = from_file
    else:
        return nodes_config.single(_single_dsn(dsn, default_dsn)), False
    if dsn:
        raise UsageError("both a DSN (--dsn/MSGGC_DSN) and nodes are configured: keep only one")
    return nodes_config.build_nodes(mapping), True


def _single_dsn(dsn: str | None, default_dsn: Callable[[], str] | None) -> str:
    chosen = given_dsn(dsn) or (default_dsn() if default_dsn else None)
    if not chosen:
        raise UsageError("no database configured: give --dsn (MSGGC_DSN), --nodes (MSGGC_NODES)"
                         " or a config file with dsn or nodes")
    return chosen


def _callback(url: str | None) -> str | None:
    """Checked at start, so a typo fails ``msggc serve`` instead of every webhook later."""
    return check_url(url) if url else None


def _schedule(every: timedelta | None, cron: str | None, file: Mapping[str, Any],
              run_worker: bool) -> Trigger | None:
    """The flags' trigger, else the file's: a flag replaces the file's schedule, whichever kind.
    The worker keeps the schedule: ``serve --no-worker`` leaves a file's schedule to ``msggc
    worker`` (one config file serves both), and refuses schedule flags rather than ignore them."""
    if every is not None or cron is not None:
        if not run_worker:
            raise UsageError("--every/--cron need the worker: drop --no-worker, or give them to msggc worker")
        return trigger_of(every, cron)
    every, cron = _as_duration(file.get("every")), file.get("cron")
    if every is not None and not isinstance(every, timedelta):
        raise UsageError(f"every must be a duration such as \"1h\" or seconds, not {every!r}")
    if cron is not None and not isinstance(cron, str):
        raise UsageError(f"cron must be a cron expression string, not {cron!r}")
    trigger = trigger_of(every, cron)  # checked even when left to the worker: a typo fails at start
    return trigger if run_worker else None


def _directory(path: Any) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not Path(path).is_dir():
        raise UsageError(f"archive_dir {path!r} is not an existing directory")
    return str(Path(path).resolve())


def _positive(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number of seconds, not {value!r}") from None
    if number <= 0:
        raise UsageError(f"{name} must be > 0")
    return number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_token_beyond_loopback(host: str, token: str | None) -> None:
    """An API that deletes data must not be reachable from the network without a token."""
    if not token and not is_loopback(host):
        raise UsageError(f"refusing to listen on {host} without a token: set --token or MSGGC_API_TOKEN"
                         " (or listen on 127.0.0.1)")

