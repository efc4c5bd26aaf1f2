"""Notifiers: where a run's completion body goes.

A notifier with a ``target`` is durable: :class:`engine.service.notice.NoticeFinisher` stores the
body, signed, in ``gc_outbox`` in the run's last transaction and :mod:`engine.service.outbox`
delivers it, so a callback server that is down loses nothing. A notifier without one (the log)
is told directly after the run.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import sys
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from engine.errors import DeliveryFailed, UsageError

if TYPE_CHECKING:
    import httpx

SIGNATURE_HEADER = "X-Msggc-Signature"
DELIVERY_HEADER = "X-Msggc-Delivery"
"""The outbox id of a notice: the same on every retry, so a receiver can drop a duplicate
(delivery is at least once: a crash between the receiver's 2xx and our commit posts again)."""


class Notifier(Protocol):
    @property
    def target(self) -> str | None:
        """Where notices go (None: nowhere durable, e.g. a log): a target's notices are queued."""

    def signature(self, body: bytes) -> str | None:
        """This notifier's signature of ``body`` (None when it signs nothing)."""

    def send(self, body: bytes, delivery_id: str | None = None, signature: str | None = None) -> None:
        """Deliver the JSON body with the given signature, or raise :class:`DeliveryFailed`."""


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=4).encode()


class LogNotifier:
    """Writes each body as one JSON line: for scripts, logs and the CLI without a webhook."""

    target: str | None = None

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def signature(self, body: bytes) -> str | None:
        return None

    def send(self, body: bytes, delivery_id: str | None = None, signature: str | None = None) -> None:
        self.stream.write(json.dumps(json.loads(body)) + "\n")
        self.stream.flush()


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def display_url(url: str) -> str:
    """The URL with its password (if any) masked: safe for logs, errors and answers."""
    import httpx  # here: `msggc gc` without --webhook never loads the HTTP client

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    if parsed.password:
        parsed = parsed.copy_with(username=parsed.username, password="***")
    return str(parsed)


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host and a valid port, or :class:`UsageError`."""
    import httpx

    try:
        parsed = httpx.URL(url)
        valid = (parsed.scheme in ("http", "https") and bool(parsed.host)
                 and (parsed.port is None or 0 < parsed.port < 65536))
    except (httpx.InvalidURL, TypeError):
        valid = False
    if not valid:
        raise UsageError(f"invalid webhook URL {display_url(url)!r}: expected http(s)://HOST[:PORT]/PATH")
    return url


@functools.cache
def _http_client() -> httpx.Client:
    """One client for the process. Why: ``httpx.post`` builds a client, with a TLS context that
    loads the CA bundle, at every call; in ``msggc serve`` those OpenSSL allocations left glibc's
    arenas growing by about 15 MB an hour, a webhook every 20 s (the soak, BENCHMARKS.md). No
    keep-alive: each POST opens its own connection, as before."""
    import httpx

    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


class WebhookNotifier:
    """POSTs the body to the callback URL; any answer but 2xx is a failed attempt."""

    def __init__(self, url: str, *, secret: str | None = None, timeout_s: float = 5.0) -> None:
        self.target = check_url(url)
        self.secret = secret
        self.timeout_s = timeout_s

    def signature(self, body: bytes) -> str | None:
        return sign(body, self.secret) if self.secret else None

    def send(self, body: bytes, delivery_id: str | None = None, signature: str | None = None) -> None:
        import httpx

        headers = {"Content-Type": "application/json"}
        if delivery_id:
            headers[DELIVERY_HEADER] = delivery_id
        if signature:
            headers[SIGNATURE_HEADER] = signature
        try:
            answer = _http_client().post(self.target, content=body, headers=headers,
                                         timeout=self.timeout_s, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise DeliveryFailed(
                f"POST {display_url(self.target)} failed: {exc or type(exc).__name__}") from None
        if not answer.is_success:
            raise DeliveryFailed(f"POST {display_url(self.target)} answered {answer.status_code}")
