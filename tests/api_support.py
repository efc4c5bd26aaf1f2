"""Helpers of the API tests: the seed's examples, a real service on a free port, waiting.

The seed document is kept verbatim in ``tests/fixtures``; its JSON examples are read from it, so
the contract tests compare against the seed itself, not against a copy of our own output.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn

from engine.service.api import create_app
from engine.service.settings import ServiceSettings
from tests.data import run_rows
from tests.polling import wait_until
from tests.support import spawn_cli

SEED = Path(__file__).parent / "fixtures" / "messages-gc-endpoint.txt"
SEED_EXAMPLES = ("single_answer", "multi_answer", "single_webhook", "multi_webhook_first",
                 "multi_webhook_second", "single_error", "multi_error", "failure_webhook")
GC_PATH = "/v1/services/message/gc"
TOKEN = "e2e-token"
"""The bearer token of the services :func:`cli_process` starts."""



def _json_blocks(text: str) -> Iterator[str]:
    """Every top-level ``{...}`` block that starts a line, braces balanced."""
    for start in (m.start() for m in re.finditer(r"^\{", text, re.MULTILINE)):
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                yield text[start:end + 1]
                break


def seed_examples() -> dict[str, Any]:
    """The seed's eight JSON examples by name; its trailing commas (invalid JSON) removed."""
    blocks = [json.loads(re.sub(r",(\s*[}\]])", r"\1", block)) for block in _json_blocks(SEED.read_text())]
    assert len(blocks) == len(SEED_EXAMPLES), f"the seed has {len(blocks)} JSON examples"
    return dict(zip(SEED_EXAMPLES, blocks, strict=True))


def gc_of(body: dict[str, Any]) -> dict[str, Any]:
    """The ``gc`` object of an answer (``services.message.gc``) or a webhook (``services[0]...``)."""
    services = body["services"]
    return (services[0] if isinstance(services, list) else services)["message"]["gc"]


def assert_same_keys_in_order(ours: Any, seed: Any) -> None:
    """Recursively: same keys in the same order (a client may parse the body naively)."""
    if isinstance(seed, dict):
        assert list(ours) == list(seed)
        for key in seed:
            assert_same_keys_in_order(ours[key], seed[key])
    elif isinstance(seed, list):
        assert len(ours) == len(seed)
        for mine, theirs in zip(ours, seed, strict=True):
            assert_same_keys_in_order(mine, theirs)


def free_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def closed_port_dsn() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


@contextmanager
def running_service(settings: ServiceSettings) -> Iterator[str]:
    """The real app (and its worker) on uvicorn on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(),
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout_s=10)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def runs_of(dsn: str) -> list[dict[str, Any]]:
    return run_rows(dsn)


def garbage_left(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM messages WHERE processed_at IS NOT NULL").fetchone()[0]


def posted_bodies(httpserver: Any) -> list[dict[str, Any]]:
    """The JSON bodies the callback server answered 2xx to, in arrival order."""
    return [json.loads(request.get_data()) for request, response in list(httpserver.log)
            if 200 <= response.status_code < 300]


@dataclass
class Process:
    url: str
    popen: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def cli_process(tmp_path: Path, command: str, config: dict[str, Any], *args: str) -> Iterator[Process]:
    """``msggc <command> --config <file> ...`` in a subprocess (no MSGGC_* setting of the developer's
    shell leaks in: the config file says it all); for ``serve``, wait until healthy."""
    config_file = tmp_path / "msggc.json"
    config_file.write_text(json.dumps(config))
    port = free_port()
    extra = ["--port", str(port), "--token", TOKEN] if command == "serve" else []
    log = tmp_path / f"{command}-{port}.log"
    with log.open("wb") as sink:
        popen = spawn_cli(command, "--config", str(config_file), *extra, *args, stdout=sink,
                          stderr=subprocess.STDOUT)
    process = Process(f"http://127.0.0.1:{port}", popen, log)
    try:
        if command == "serve":
            wait_until(lambda: popen.poll() is not None or answers(process.url + "/health"), timeout_s=30)
            assert popen.poll() is None, process.output()
        yield process
    finally:
        stop(popen)


def answers(url: str) -> bool:
    """A server's health (or readiness) page answers 200; False while it cannot answer."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stop(popen: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s: a test session stops every process it starts."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
