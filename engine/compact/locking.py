"""One step in a transaction under ``lock_timeout``, tried again with backoff: how every phase
that takes a lock on the application's table (capture, foreign keys, undo, the swap undone)
waits for it, so the application is never queued behind msggc for longer than that."""

from __future__ import annotations

import time
from collections.abc import Callable

from psycopg import errors as pg_errors

from engine.db import Connection

ATTEMPTS = 6
BACKOFF_S = 0.1


def locking(conn: Connection, step: Callable[[], None], lock_timeout_ms: int) -> None:
    """``step`` in a transaction under ``lock_timeout``, tried again with backoff."""
    for attempt in range(ATTEMPTS):
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
                step()
            return
        except pg_errors.LockNotAvailable:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(BACKOFF_S * 2**attempt)
