"""The embedded default server: started on demand, quiet, private to its own directory."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from engine.errors import EmbeddedServerError
from engine.tools import embedded


@pytest.fixture
def msggc_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private MSGGC_HOME under /tmp (short: socket paths are limited); server stopped after."""
    path = Path(tempfile.mkdtemp(prefix="msggc-emb-", dir="/tmp"))
    monkeypatch.setenv("MSGGC_HOME", str(path))
    try:
        yield path
    finally:
        embedded.stop()
        shutil.rmtree(path, ignore_errors=True)


def test_ensure_running_is_idempotent_and_returns_a_working_dsn(msggc_home: Path) -> None:
    first = embedded.ensure_running()
    second = embedded.ensure_running()

    assert first == second
    with psycopg.connect(first) as conn:
        row = conn.execute("SELECT current_database(), current_setting('server_version_num')::int")
        assert row.fetchone() == ("postgres", pytest.approx(180000, abs=9999))


def test_url_reflects_whether_the_server_runs(msggc_home: Path) -> None:
    assert embedded.url() is None

    dsn = embedded.ensure_running()
    assert embedded.url() == dsn

    assert embedded.stop() is True
    assert embedded.url() is None
    assert embedded.stop() is False


def test_msggc_home_is_honoured(msggc_home: Path) -> None:
    dsn = embedded.ensure_running()

    assert embedded.home() == msggc_home.resolve()
    assert embedded.data_dir() == msggc_home.resolve() / "pgdata"
    assert (embedded.data_dir() / "PG_VERSION").exists()
    assert Path(conninfo_to_dict(dsn)["host"]).is_relative_to(msggc_home.resolve())


def test_server_listens_on_its_own_socket_and_no_tcp_port(msggc_home: Path) -> None:
    dsn = embedded.ensure_running()

    params = conninfo_to_dict(dsn)
    assert str(params["host"]).startswith("/")
    assert int(params["port"]) != 5432
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)


def test_first_start_applies_the_bulk_gc_settings(msggc_home: Path) -> None:
    dsn = embedded.ensure_running()

    with psycopg.connect(dsn) as conn:
        for name, value in embedded.server_settings().items():
            if re.fullmatch(r"[0-9]+[kMG]B", value):
                same = conn.execute(
                    "SELECT pg_size_bytes(%s) = pg_size_bytes(current_setting(%s))", (value, name)
                ).fetchone()
                assert same == (True,), name
            else:
                shown = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
                assert shown == (value,), name
        assert conn.execute("SHOW wal_level").fetchone() == ("replica",)


def test_settings_survive_restart_without_being_appended_twice(msggc_home: Path) -> None:
    embedded.ensure_running()
    embedded.stop()
    embedded.ensure_running()

    conf = (embedded.data_dir() / "postgresql.auto.conf").read_text()
    assert conf.count("shared_buffers") == 1


def test_concurrent_starts_share_one_server_and_print_nothing_else(msggc_home: Path) -> None:
    code = "from engine.tools import embedded; print(embedded.ensure_running())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert [err for _, err in outputs] == ["", "", ""]
    dsns = {out.strip() for out, _ in outputs}
    assert dsns == {embedded.url()}


def test_failed_start_raises_embedded_server_error_naming_the_log(msggc_home: Path) -> None:
    embedded.ensure_running()
    embedded.stop()
    with (embedded.data_dir() / "postgresql.auto.conf").open("a") as conf:
        conf.write("shared_buffers = 'lots'\n")

    with pytest.raises(EmbeddedServerError, match=str(embedded.data_dir() / "log")) as error:
        embedded.ensure_running()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://postgres@/postgres?host=/tmp/x&port=54329",
            "postgresql://postgres@/other?host=/tmp/x&port=54329",
        ),
        (
            "postgresql://u:p@db:6543/a?dbname=a&sslmode=disable",
            "postgresql://u:p@db:6543/other?sslmode=disable",
        ),
        ("postgresql+psycopg://u@db/a", "postgresql+psycopg://u@db/other"),
    ],
)
def test_dsn_for_database_keeps_a_uri_a_uri(dsn: str, expected: str) -> None:
    assert embedded.dsn_for_database(dsn, "other") == expected


@pytest.mark.parametrize("dsn", ["host=/tmp/x port=54329 dbname=postgres", "host=db user=u"])
def test_dsn_for_database_changes_only_the_database_of_a_keyword_dsn(dsn: str) -> None:
    changed = conninfo_to_dict(embedded.dsn_for_database(dsn, "other"))

    assert changed == {**conninfo_to_dict(dsn), "dbname": "other"}
