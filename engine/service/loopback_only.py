"""Without a token, the API answers only requests addressed to loopback by a loopback page.

Listening on 127.0.0.1 is not enough: a page of ``evil.example`` whose name is rebound to
127.0.0.1 (DNS rebinding) reaches the service with ``Host: evil.example``, and any page can send a
cross-origin PUT that starts a GC before the browser checks CORS. So a tokenless service refuses
a Host that is not a loopback name (400, 1025 Invalid request) and a request whose ``Origin`` is
not a loopback origin (403, 1005 Access denied), in the seed's ``errors`` shape. With a token,
the token is the guard and nothing here applies.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from engine.service import contract
from engine.service.body_limit import App, Receive, Send
from engine.service.settings import is_loopback


class LoopbackOnly:
    """ASGI middleware: refuse a foreign ``Host`` or a cross-origin ``Origin``."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _refusal(Headers(scope=scope))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, answer = refusal
        await JSONResponse(answer, status_code=status)(scope, receive, send)


def _refusal(headers: Headers) -> tuple[int, dict[str, Any]] | None:
    """The status and errors body that refuse this request, or None to let it through."""
    host, origin = headers.get("host", ""), headers.get("origin")
    if not _loopback_host(host):
        return 400, contract.error_answer(
            f"host {host!r} is not accepted: without a token only loopback names are",
            code=contract.INVALID_REQUEST)
    if origin is not None and not _loopback_origin(origin):
        return 403, contract.error_answer(
            f"origin {origin!r} is not accepted: without a token only loopback pages are",
            code=contract.ACCESS_DENIED)
    return None


def _loopback_host(host: str) -> bool:
    """``127.0.0.1``, ``localhost``, ``[::1]`` or ``::1``, with or without a port."""
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
    elif host.count(":") > 1:  # a bare IPv6 address
        name = host
    else:
        name = host.partition(":")[0]
    return bool(name) and is_loopback(name.lower())


def _loopback_origin(origin: str) -> bool:
    """``http(s)://`` a loopback host; ``null`` (a sandboxed or file page) is not one."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and _loopback_host(parts.netloc)
