"""Real PostgreSQL for every test: ``MSGGC_TEST_DSN`` when set, else the embedded server.

pytest-postgresql's ``postgresql_noproc`` points at that server; its template database is
migrated once per session, and each test gets a fresh copy of it (``dsn``).
"""

from __future__ import annotations

import os
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

os.environ.setdefault("MSGGC_HOME", str(Path(tempfile.gettempdir()) / f"msggc-test-{os.getuid()}"))


def _server_dsn() -> str:
    explicit = os.environ.get("MSGGC_TEST_DSN")
    if explicit:
        return explicit
    from engine.tools import embedded

    return embedded.ensure_running()


SERVER_DSN = _server_dsn()
_SERVER = conninfo_to_dict(SERVER_DSN)


def _migrate_template(**connect_kwargs: Any) -> None:
    from engine.migrate import upgrade

    keys = ("host", "port", "user", "password", "dbname")
    upgrade(make_conninfo(**{k: v for k, v in connect_kwargs.items() if k in keys and v}))


postgresql_noproc = factories.postgresql_noproc(
    host=str(_SERVER.get("host") or "127.0.0.1"),
    port=_SERVER.get("port") or 5432,
    user=str(_SERVER.get("user") or "postgres"),
    password=_SERVER.get("password") or None,
    dbname=f"msggc_tests_{os.getpid()}",  # unique: concurrent sessions never share a template
    load=[_migrate_template],
)
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def server_dsn() -> str:
    """The server's maintenance DSN (database postgres), for tests that create databases."""
    return SERVER_DSN


@pytest.fixture
def scratch_dsn() -> Iterator[str]:
    """A fresh, empty (unmigrated) database, dropped after the test."""
    from engine.tools.embedded import dsn_for_database

    name = f"msggc_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_for_database(SERVER_DSN, name)
    finally:
        with psycopg.connect(SERVER_DSN, autocommit=True) as admin:
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
def make_dsn(postgresql_noproc: Any) -> Iterator[Callable[[], str]]:
    """A factory of extra fresh, migrated databases (copies of the template), dropped after the
    test: for tests that need several nodes."""
    from pytest_postgresql.janitor import DatabaseJanitor

    from engine.tools.embedded import dsn_for_database

    janitors: list[DatabaseJanitor] = []

    def make() -> str:
        name = f"msggc_node_{uuid.uuid4().hex[:12]}"
        janitor = DatabaseJanitor(user=postgresql_noproc.user, host=postgresql_noproc.host,
                                  port=postgresql_noproc.port, password=postgresql_noproc.password,
                                  dbname=name, template_dbname=postgresql_noproc.template_dbname)
        janitor.init()
        janitors.append(janitor)
        return dsn_for_database(SERVER_DSN, name)

    yield make
    for janitor in janitors:
        janitor.drop()
