"""The README's picture of the status page: a GC running under ``msggc serve``, taken in Chromium.

    python -m benchmarks.page_screenshot [--server DSN] [--rows 2000000] [--out docs/status-page.png]

Creates the database ``msggc_page_shot`` on ``--server`` (default: the embedded server), migrates
it and seeds ``--rows`` dense messages (80% processed), starts ``msggc serve`` as a user would with
two nodes (that database, and ``wacore2`` on a port nothing listens on: its 1014), asks a first GC
of ``--first-rows`` rows (it stops on that budget: a recent run), then the GC of the rest with the
service's defaults (the latency guard's ``auto`` budget), and photographs the page once the chart
has ``--points`` intervals. Stops the service and drops the database at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from engine import migrate
from engine.tools import embedded, synth

DATABASE = "msggc_page_shot"
GC_PATH = "/v1/services/message/gc"
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.2)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def latest_status(url: str) -> str | None:
    latest = httpx.get(url + "/v1/overview", timeout=10).json()["nodes"][0]["latest"]
    return latest["status"] if latest else None


def shoot(url: str, out: Path, points: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else None)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 900}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_function(
                "n => { const s = document.querySelector(\"section.node[data-node='wacore1']\");"
                " return s && s.dataset.status === 'running'"
                " && +s.querySelector('svg').dataset.points >= n; }", arg=points, timeout=600_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=None, help="maintenance DSN (default: the embedded server)")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--first-rows", type=int, default=100_000)
    parser.add_argument("--points", type=int, default=20, help="chart intervals before the picture")
    parser.add_argument("--out", type=Path, default=Path("docs/status-page.png"))
    args = parser.parse_args()

    server = args.server or embedded.ensure_running()
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    target = embedded.dsn_for_database(server, DATABASE)
    try:
        migrate.upgrade(target)
        report = synth.seed(target, args.rows, "dense")
        print(f"seeded {report.rows:,} rows, {report.garbage_rows:,} garbage", flush=True)
        port = free_port()
        env = {**os.environ, "MSGGC_NODES": f"wacore1={target},"
               f"wacore2=postgresql://postgres@127.0.0.1:{free_port()}/postgres"}
        service = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port)],
                                   env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: healthy(url), 30, "msggc serve")
            httpx.put(url + GC_PATH, json={"max_rows": args.first_rows}, timeout=30).raise_for_status()
            wait_for(lambda: latest_status(url) == "stopped", 300, "the first run to stop on its budget")
            httpx.put(url + GC_PATH, timeout=30).raise_for_status()
            shoot(url, args.out, args.points)
            print(f"wrote {args.out}", flush=True)
        finally:
            service.terminate()
            service.wait(30)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))


if __name__ == "__main__":
    main()
