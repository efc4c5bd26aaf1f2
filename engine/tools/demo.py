"""``msggc demo``: the main job end to end on a fresh machine, in about a minute.

Embedded database -> migrate -> seed an aged table -> GC with a webhook to a local receiver
that prints the completion body -> summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
from psycopg import sql

from engine import migrate
from engine.collector import collect
from engine.config import GcOptions
from engine.result import GcResult, Progress
from engine.service.notice import NoticeFinisher
from engine.service.notify import WebhookNotifier
from engine.tools import embedded, synth
from engine.tools.embedded import resolve_dsn
from engine.tools.receiver import Receiver

DEMO_DATABASE = "msggc_demo"


def fresh_database(dsn: str, name: str) -> str:
    """Drop and create ``name`` next to ``dsn``'s database; returns its DSN."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return embedded.dsn_for_database(dsn, name)


def run_demo(rows: int, say: Callable[[str], None],
             on_seed: Callable[[str, float], None] | None,
             on_progress: Callable[[Progress], None] | None, dsn: str | None = None) -> GcResult:
    server = resolve_dsn(dsn)
    say(f"1/4 database: {server}")
    target = fresh_database(server, DEMO_DATABASE)
    migrate.upgrade(target)
    say(f"2/4 migrated {DEMO_DATABASE} to revision {migrate.head()}")
    report = synth.seed(target, rows, "aged", on_progress=on_seed)
    say(f"3/4 seeded {report.rows:,} messages, {report.garbage_rows:,} processed (garbage),"
        f" in {report.total_seconds():.1f}s")
    with Receiver(lambda body: say("webhook received:\n" + json.dumps(body, indent=4))) as receiver:
        say(f"4/4 collecting, completion webhook -> {receiver.url}")
        result = collect(target, GcOptions(), NoticeFinisher(WebhookNotifier(receiver.url)),
                         on_progress=on_progress)
        receiver.wait_for(1, timeout_s=10)
    return result
