"""Notifiers: where a run's completion body goes.

A notifier with a ``target`` is durable: the collector stores the body in ``gc_outbox`` in the
run's last transaction and :mod:`engine.outbox` delivers it, so a callback server that is down
loses nothing. A notifier without one (the log) is told directly after the run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from typing import Any, Protocol, TextIO

import httpx

from engine.errors import DeliveryFailed

SIGNATURE_HEADER = "X-Msggc-Signature"


class Notifier(Protocol):
    target: str | None

    def send(self, body: bytes) -> None:
        """Deliver the JSON body or raise :class:`DeliveryFailed`."""


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=4).encode()


class LogNotifier:
    """Writes each body as one JSON line: for scripts, logs and the CLI without a webhook."""

    target: str | None = None

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def send(self, body: bytes) -> None:
        self.stream.write(json.dumps(json.loads(body)) + "\n")
        self.stream.flush()


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookNotifier:
    """POSTs the body to the callback URL; any answer but 2xx is a failed attempt."""

    def __init__(self, url: str, *, secret: str | None = None, timeout_s: float = 5.0) -> None:
        self.target = url
        self.secret = secret
        self.timeout_s = timeout_s

    def send(self, body: bytes) -> None:
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(body, self.secret)
        try:
            answer = httpx.post(self.target, content=body, headers=headers,
                                timeout=self.timeout_s, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"POST {self.target} failed: {exc or type(exc).__name__}") from None
        if not answer.is_success:
            raise DeliveryFailed(f"POST {self.target} answered {answer.status_code}")
