"""The embedded PostgreSQL as test sessions share it: a session that started it stops it.

Sessions may run side by side on one ``MSGGC_HOME`` (engineers running the suite in one working
tree). Each holds a shared lock on ``SESSIONS_LOCK`` while it runs. A server that came up while
a session ran (started by the session's fixture, its subprocesses, or a session beside it) is
recorded as started by the tests, by its postmaster pid, in ``STARTED_MARKER``. At its end a
session stops that server only when it is the last session out: under ``FINISH_LOCK`` it lets go of
its shared lock and tries to take it exclusively. A server that ran before the session began (a
developer's, or one left behind) and was not started by a test session is never stopped.

Nothing here starts a server: :meth:`SharedEmbeddedServer.dsn` does, and only when a test asks.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from engine.tools import embedded

SESSIONS_LOCK = ".msggc-test-sessions.lock"
FINISH_LOCK = ".msggc-test-finish.lock"
STARTED_MARKER = ".msggc-test-started"


def postmaster_pid() -> int | None:
    """The pid of the embedded server running in ``MSGGC_HOME``, or None."""
    if embedded.url() is None:
        return None
    try:
        return int((embedded.data_dir() / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


class SharedEmbeddedServer:
    """One test session's share of the embedded server in ``MSGGC_HOME``."""

    def __init__(self) -> None:
        self._home: Path | None = None
        self._sessions: IO[str] | None = None
        self._ran_before = False

    def join(self) -> None:
        """Count this session in; waits while a session that is ending stops the server."""
        self._home = embedded.home()
        self._home.mkdir(parents=True, exist_ok=True)
        self._sessions = (self._home / SESSIONS_LOCK).open("a")
        fcntl.flock(self._sessions, fcntl.LOCK_SH)
        self._ran_before = postmaster_pid() is not None

    def dsn(self) -> str:
        """The server's DSN (database postgres); starts it when it is not running."""
        return embedded.ensure_running()

    def leave(self) -> bool:
        """Count this session out; True when it stopped the server (being the last session out)."""
        if self._home is None or self._sessions is None:
            return False
        marker = self._home / STARTED_MARKER
        pid = postmaster_pid()
        if pid is not None and not self._ran_before:
            marker.write_text(f"{pid}\n")
        try:
            with embedded.exclusive(self._home / FINISH_LOCK):
                fcntl.flock(self._sessions, fcntl.LOCK_UN)
                try:
                    fcntl.flock(self._sessions, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # another session still runs: the last one out decides
                if pid is None or _marked_pid(marker) != pid:
                    return False
                embedded.stop()
                marker.unlink(missing_ok=True)
                return True
        finally:
            self._sessions.close()
            self._sessions = None


def _marked_pid(marker: Path) -> int | None:
    try:
        return int(marker.read_text().strip())
    except (OSError, ValueError):
        return None
