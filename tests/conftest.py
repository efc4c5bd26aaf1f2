"""Real PostgreSQL for the tests that need one: ``MSGGC_TEST_DSN`` when set, else the embedded server
(PostgreSQL 18), or with ``MSGGC_TEST_SERVER=pg16`` a private PostgreSQL 16 (:mod:`tests.pg16`).

Importing this starts nothing: the server is reached (the embedded one started) by the session
fixture ``server_dsn``, the first time a test needs a database, so tests/unit runs with none.
A session that started the embedded server stops it at its end (:mod:`tests.sessions`); a PostgreSQL
16 is the session's own, stopped and removed at its end.
``postgresql_noproc`` (pytest-postgresql's process fixture) points at that server; its template
database is migrated once per session, and each test gets a fresh copy of it (``dsn``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor
from pytest_postgresql.janitor import DatabaseJanitor

from tests.faults.helpers import PrivateServer
from tests.pg16 import Pg16Server
from tests.sessions import SharedEmbeddedServer

os.environ.setdefault("MSGGC_HOME", str(Path(tempfile.gettempdir()) / f"msggc-test-{os.getuid()}"))

EMBEDDED = SharedEmbeddedServer()
PG16 = Pg16Server()
SERVERS = ("embedded", "pg16")


def _test_server() -> str:
    """``MSGGC_TEST_SERVER``: ``embedded`` (the default) or ``pg16``; ``MSGGC_TEST_DSN`` wins over both."""
    name = os.environ.get("MSGGC_TEST_SERVER") or "embedded"
    if name not in SERVERS:
        raise pytest.UsageError(f"MSGGC_TEST_SERVER={name!r}: expected one of {', '.join(SERVERS)}")
    return name


def pytest_sessionstart(session: pytest.Session) -> None:
    _test_server()
    EMBEDDED.join()


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears down the fixtures still set up
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    PG16.stop()
    EMBEDDED.leave()


@pytest.fixture(scope="session")
def server_dsn() -> str:
    """The server's maintenance DSN (database postgres), for tests that create databases:
    ``MSGGC_TEST_DSN``, else the session's server, started now when it is not running."""
    if given := os.environ.get("MSGGC_TEST_DSN"):
        return given
    return PG16.dsn() if _test_server() == "pg16" else EMBEDDED.dsn()


def _migrate_template(**connect_kwargs: Any) -> None:
    from engine.migrate import upgrade

    keys = ("host", "port", "user", "password", "dbname")
    upgrade(make_conninfo(**{k: v for k, v in connect_kwargs.items() if k in keys and v}))


@pytest.fixture(scope="session")
def postgresql_noproc(server_dsn: str) -> Iterator[NoopExecutor]:
    """pytest-postgresql's process fixture on that server, with the session's migrated template."""
    server = conninfo_to_dict(server_dsn)
    executor = NoopExecutor(
        host=str(server.get("host") or "127.0.0.1"),
        port=server.get("port") or 5432,
        user=str(server.get("user") or "postgres"),
        password=server.get("password") or None,
        options="",
        dbname=f"msggc_tests_{os.getpid()}",  # unique: concurrent sessions never share a template
    )
    template = DatabaseJanitor(user=executor.user, host=executor.host, port=executor.port,
                               password=executor.password, dbname=executor.template_dbname,
                               as_template=True)
    with template:
        template.load(_migrate_template)
        yield executor


postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def scratch_dsn(server_dsn: str) -> Iterator[str]:
    """A fresh, empty (unmigrated) database, dropped after the test."""
    from engine.tools.embedded import dsn_for_database

    name = f"msggc_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_for_database(server_dsn, name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dsn(postgresql: psycopg.Connection[Any]) -> str:
    """A fresh, migrated database for this test."""
    info = postgresql.info
    params = {"host": info.host, "port": info.port, "user": info.user, "dbname": info.dbname}
    if info.password:
        params["password"] = info.password
    return make_conninfo(**params)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def make_dsn(postgresql_noproc: NoopExecutor, server_dsn: str) -> Iterator[Callable[[], str]]:
    """A factory of extra fresh, migrated databases (copies of the template), dropped after the
    test: for tests that need several nodes."""
    from engine.tools.embedded import dsn_for_database

    janitors: list[DatabaseJanitor] = []

    def make() -> str:
        name = f"msggc_node_{uuid.uuid4().hex[:12]}"
        janitor = DatabaseJanitor(user=postgresql_noproc.user, host=postgresql_noproc.host,
                                  port=postgresql_noproc.port, password=postgresql_noproc.password,
                                  dbname=name, template_dbname=postgresql_noproc.template_dbname)
        janitor.init()
        janitors.append(janitor)
        return dsn_for_database(server_dsn, name)

    yield make
    for janitor in janitors:
        janitor.drop()


@pytest.fixture
def role_dsn(conn: psycopg.Connection[Any], dsn: str, server_dsn: str) -> Iterator[Callable[..., str]]:
    """Make a login role with the given grants and return a DSN for it; dropped afterwards."""
    made: list[str] = []

    def make(*grants: str) -> str:
        role = f"msggc_role_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        made.append(role)
        for grant in grants:
            conn.execute(sql.SQL(grant).format(role=sql.Identifier(role)))
        return make_conninfo(dsn, user=role)

    yield make
    for role in made:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module")
def private_server() -> Iterator[PrivateServer]:
    """A separate embedded server in a temporary MSGGC_HOME, for tests that stop it; stopped and
    removed afterwards."""
    server = PrivateServer(Path(tempfile.mkdtemp(prefix="msggc-private-")))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.home, ignore_errors=True)
