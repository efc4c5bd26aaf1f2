"""The flags more than one ``msggc`` command takes, and the types that parse their values.

Kept apart from :mod:`engine.cli`, which holds the commands: declared once here, an option reads
the same under every command that takes it (``serve`` and ``worker`` share a whole list). Like the
CLI, it imports nothing heavy at import time (``msggc --help`` loads no database driver).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from engine.config import parse_duration, parse_latency, parse_size, parse_workers
from engine.errors import MsggcError

F = TypeVar("F", bound=Callable[..., Any])


def resolve_dsn(dsn: str | None) -> str:
    """An explicit DSN, else ``$MSGGC_DSN``, else the embedded server (started on demand)."""
    from engine.tools.embedded import resolve_dsn as resolve

    return resolve(dsn)


dsn_option = click.option(
    "--dsn", envvar="MSGGC_DSN", default=None,
    help="PostgreSQL DSN (env MSGGC_DSN). Default: the embedded server, started on demand.",
)
table_option = click.option(
    "--table", "table", default="messages", show_default=True, help="Table to collect (or SCHEMA.TABLE)."
)
key_option = click.option("--key", default=None, metavar="COLUMN[,COLUMN]",
                          help="The table's key columns (default: its primary key).")


class Parsed(click.ParamType):  # type: ignore[type-arg]  # generic only since click 8.2
    """A flag value read by one of engine.config's parsers; its UsageError becomes click's."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except MsggcError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Parsed("duration", parse_duration)
SIZE = Parsed("size", parse_size)
LATENCY = Parsed("latency", parse_latency)
WORKERS = Parsed("workers", parse_workers)


service_options = (
    dsn_option,
    click.option("--nodes", "nodes_spec", envvar="MSGGC_NODES", default=None,
                 help="Multiconnect nodes NAME=DSN,NAME=DSN (env MSGGC_NODES); else one database."),
    click.option("--config", envvar="MSGGC_CONFIG", default=None, type=click.Path(dir_okay=False),
                 help="TOML or JSON config: nodes, [gc] default options, callback... (env MSGGC_CONFIG)."),
    click.option("--callback-url", envvar="MSGGC_CALLBACK_URL", default=None,
                 help="Where completion webhooks are POSTed (env MSGGC_CALLBACK_URL)."),
    click.option("--webhook-secret", envvar="MSGGC_WEBHOOK_SECRET", default=None,
                 help="HMAC-SHA256 secret for the X-Msggc-Signature header (env MSGGC_WEBHOOK_SECRET)."),
    click.option("--table", default=None, help="Table to collect (default messages)."),
    click.option("--stale-after", "stale_after_s", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Seconds without heartbeat after which a running run is resumed (default 60)."),
    click.option("--every", type=DURATION, default=None,
                 help="The worker also requests a GC on every node now and then at this interval (e.g. 1h)."),
    click.option("--cron", default=None, metavar="EXPR",
                 help='The worker also requests a GC at the times a cron expression matches, in UTC'
                      ' (e.g. "0 3 * * *"; a sixth, leading field counts seconds).'),
)


def with_service_options(func: F) -> F:
    """``serve`` and ``worker`` read the same configuration: one list, so they never drift."""
    for option in reversed(service_options):
        func = option(func)
    return func
