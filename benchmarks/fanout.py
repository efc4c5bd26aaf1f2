"""Fan-out (issue 22 item 5): N databases on one server, one PUT to ``msggc serve``, every webhook.

    python -m benchmarks.fanout --server postgresql://postgres@127.0.0.1:5432/postgres --nodes 100

Creates ``fanout_<i>`` databases (migrated, ``--rows`` messages each, 80% processed), starts
``msggc serve`` on them as a user would (``MSGGC_NODES``, a callback receiver of its own), sends
one PUT and reports: the PUT's answer (processing / refused), the time from the PUT to the last
webhook, each webhook's status, the peak of connections msggc held on the server
(``pg_stat_activity``, application names ``msggc%``, sampled every 10 ms) against the server's
``max_connections``, the most runs at once, and whether the server refused anyone meanwhile (the
service's log). Drops the databases at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

GC_PATH = "/v1/services/message/gc"
FILL_SQL = """
INSERT INTO messages (message_id, chat_id, direction, status, payload, created_at, processed_at)
SELECT 'wamid.' || i, 'chat' || (i %% 7), 1, 2, repeat('p', 130), now() - interval '30 days',
       CASE WHEN i %% 5 <> 0 THEN now() - interval '1 day' END
FROM generate_series(1, %s) AS i
"""


def databases(server: str, count: int, rows: int, template: str) -> list[str]:
    """``count`` databases copied from a migrated, filled template (one migration, one fill)."""
    with psycopg.connect(server, autocommit=True) as admin:
        drop(admin, [template, *(f"fanout_{i}" for i in range(count))])
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    template_dsn = make_conninfo(server, dbname=template)
    subprocess.run([sys.executable, "-m", "engine.cli", "migrate", "--dsn", template_dsn], check=True,
                   stdout=subprocess.DEVNULL)
    with psycopg.connect(template_dsn, autocommit=True) as conn:
        conn.execute(FILL_SQL, (rows,))
        conn.execute("VACUUM ANALYZE messages")
    names = [f"fanout_{i}" for i in range(count)]
    with psycopg.connect(server, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                           sql.Identifier(template)))
    return names


def drop(admin: psycopg.Connection[Any], names: list[str]) -> None:
    for name in names:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Receiver(ThreadingHTTPServer):
    """The callback server: every POST's arrival time and body."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.received.append((time.monotonic(), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def sample_connections(server: str, names: list[str], stop: threading.Event,
                       samples: list[tuple[float, int, int]]) -> None:
    """(time, msggc's connections on the fan-out's databases, all client backends) every 10 ms."""
    with psycopg.connect(server, autocommit=True) as conn:
        while not stop.is_set():
            ours, everyone = conn.execute(
                "SELECT count(*) FILTER (WHERE datname = ANY(%s) AND application_name LIKE 'msggc%%'),"
                " count(*) FILTER (WHERE backend_type = 'client backend') FROM pg_stat_activity",
                (names,)).fetchone() or (0, 0)
            samples.append((time.monotonic(), int(ours), int(everyone)))
            stop.wait(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of msggc serve, e.g. MSGGC_MAX_APP_LATENCY=off")
    parser.add_argument("--log", default="/tmp/msggc-fanout.log")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    with psycopg.connect(args.server, autocommit=True) as conn:
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
    started = time.monotonic()
    names = databases(args.server, args.nodes, args.rows, "fanout_template")
    print(f"{args.nodes} databases of {args.rows} rows made in {time.monotonic() - started:.0f}s", flush=True)
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "MSGGC_NODES": ",".join(f"n{i}={make_conninfo(args.server, dbname=name)}"
                                                 for i, name in enumerate(names)),
           "MSGGC_CALLBACK_URL": f"http://127.0.0.1:{receiver.server_address[1]}/gc",
           **dict(item.split("=", 1) for item in args.env)}
    env.pop("MSGGC_DSN", None)
    log = Path(args.log).open("w")  # noqa: SIM115 (the service's output until it stops)
    service = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    stop, samples = threading.Event(), list[tuple[float, int, int]]()
    sampler = threading.Thread(target=sample_connections, args=(args.server, names, stop, samples),
                               daemon=True)
    try:
        url = f"http://127.0.0.1:{port}{GC_PATH}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        time.sleep(1.0)  # the node threads' first polls
        sampler.start()
        put_at = time.monotonic()
        answer = httpx.put(url, timeout=120)
        answered = time.monotonic() - put_at
        gc = answer.json()["services"]["message"]["gc"]
        processing = sum(1 for entry in gc.values() if entry.get("status") == "processing")
        while len({body["services"][0]["message"]["gc"].get("node") for _at, body in receiver.received}) \
                < args.nodes and time.monotonic() - put_at < args.timeout:
            time.sleep(0.05)
        time.sleep(2.0)  # a duplicate would arrive by now
        stop.set()
        sampler.join(5)
    finally:
        service.terminate()
        service.wait(20)
        log.close()
        if not args.keep:
            with psycopg.connect(args.server, autocommit=True) as admin:
                drop(admin, ["fanout_template", *names])
    webhooks = [body["services"][0]["message"]["gc"] for _at, body in receiver.received]
    nodes_seen = [hook.get("node") for hook in webhooks]
    last = max((at for at, _body in receiver.received), default=put_at) - put_at
    text = Path(args.log).read_text()
    budgets = re.findall(r"msggc holds at most (\d+) connections there, (\d+) run", text)
    report = {
        "nodes": args.nodes, "rows_per_node": args.rows, "server_max_connections": max_connections,
        "env": args.env, "put_status": answer.status_code, "put_seconds": round(answered, 2),
        "answered_processing": processing, "refused_in_answer": args.nodes - processing,
        "webhooks": len(webhooks), "distinct_nodes": len(set(nodes_seen)),
        "complete": sum(1 for hook in webhooks if hook.get("status") == "complete"),
        "deleted": sum(hook.get("messages_deleted", 0) for hook in webhooks),
        "put_to_last_webhook_s": round(last, 1),
        "peak_msggc_connections": max((ours for _t, ours, _all in samples), default=0),
        "peak_client_backends": max((everyone for _t, _ours, everyone in samples), default=0),
        "service_budget": budgets[-1] if budgets else None,
        "too_many_clients_in_log": len(re.findall(r"too many (clients|connections)", text)),
        "interrupted_runs_in_log": text.count("interrupted, tried again"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
