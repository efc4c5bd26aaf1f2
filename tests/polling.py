"""Bounded waiting for tests that watch another process or thread make progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout_s: float = 15.0, what: str = "the condition",
               interval_s: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what} (last {value!r})")
        time.sleep(interval_s)
