"""``/metrics`` of ``msggc worker`` (``--metrics-port``), a process without the HTTP API.

It serves what only that process knows: the batch and run duration histograms of the runs it
executes and its schedule's series. What the databases know is ``msggc serve``'s to export, so
that a dashboard summing over instances counts each run once. Secured as the API's
``/metrics``: the bearer token when one is configured, loopback only without one.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from engine.errors import UsageError
from engine.service.settings import require_token_beyond_loopback

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is no news for the worker's log."""


def _bearer(app: WsgiApp, token: str | None) -> WsgiApp:
    """``app`` behind ``Authorization: Bearer <token>`` (401 otherwise), or as is without a token."""
    if not token:
        return app
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(), expected):
            start_response("401 Unauthorized",
                           [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"missing or wrong bearer token\n"]
        return app(environ, start_response)

    return guarded


def serve_metrics(registry: CollectorRegistry, host: str, port: int, token: str | None) -> Callable[[], None]:
    """Serve ``registry`` at ``/metrics`` on a thread; returns the function that stops it.
    A host beyond loopback without a token, or an address that cannot be bound, is a UsageError."""
    require_token_beyond_loopback(host, token)
    try:
        server = make_server(host, port, _bearer(make_wsgi_app(registry), token), server_class=_Server,
                             handler_class=_Quiet)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    thread = threading.Thread(target=server.serve_forever, name="msggc-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop
