"""A tiny webhook receiver that prints each body it gets: for the demo and for checking a setup.

It stands in for the business's callback server; it listens on loopback only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Listens on 127.0.0.1 (port 0 = any free port) and hands each JSON body to ``on_body``."""

    def __init__(self, on_body: Callable[[object], None], port: int = 0) -> None:
        self.bodies: list[object] = []
        """Each body as parsed JSON, of whatever shape the sender posted."""
        self.received = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                self.send_response(200)
                self.end_headers()
                on_body(body)
                with receiver.received:
                    receiver.bodies.append(body)
                    receiver.received.notify_all()

            def log_message(self, format: str, *args: object) -> None:  # quiet: the body is shown
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout_s: float | None) -> bool:
        with self.received:
            return self.received.wait_for(lambda: len(self.bodies) >= count, timeout_s)
