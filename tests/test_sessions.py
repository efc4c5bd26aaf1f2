"""A test session stops the embedded server it started, and only that one (tests/sessions.py).

Each case runs real pytest sessions in subprocesses, on a private ``MSGGC_HOME`` (one for the
module: initdb once) whose server no case leaves running.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.tools import embedded
from tests.sessions import postmaster_pid
from tests.standby import msggc_home
from tests.support import REPO, cli_env

pytestmark = pytest.mark.slow

PROBE = '''
import time

import psycopg


def test_probe(server_dsn):
    with psycopg.connect(server_dsn) as conn:
        conn.execute("SELECT 1")
    time.sleep({hold_s})
    with psycopg.connect(server_dsn) as conn:
        conn.execute("SELECT 1")
'''


@pytest.fixture(scope="module")
def shared_home() -> Iterator[Path]:
    """A private MSGGC_HOME under /tmp (short: socket paths are limited), removed after."""
    path = Path(tempfile.mkdtemp(prefix="msggc-ses-", dir="/tmp"))
    try:
        yield path
    finally:
        with msggc_home(path):
            embedded.stop()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home(shared_home: Path) -> Iterator[Path]:
    """That home, its server not running before the test, and stopped after it."""
    assert running_pid(shared_home) is None
    try:
        yield shared_home
    finally:
        with msggc_home(shared_home):
            embedded.stop()


def session(home: Path, tmp_path: Path, hold_s: float = 0) -> subprocess.Popen[str]:
    """``pytest`` on a probe that connects to the session's server (the embedded one in ``home``)."""
    probe = tmp_path / f"probe_{hold_s:g}".replace(".", "_")
    probe.mkdir()
    (probe / "test_probe.py").write_text(PROBE.format(hold_s=hold_s))
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "-p", "tests.conftest", "--rootdir", str(probe), str(probe)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**cli_env(), "MSGGC_HOME": str(home), "PYTHONPATH": str(REPO)})


def passes(process: subprocess.Popen[str]) -> None:
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output


def running_pid(home: Path) -> int | None:
    with msggc_home(home):
        return postmaster_pid()


def test_a_session_that_started_the_server_stops_it(home, tmp_path):
    passes(session(home, tmp_path))  # no server ran: the probe's connections prove the session started one
    assert running_pid(home) is None

    passes(session(home, tmp_path, hold_s=0.1))  # again, from the stopped server's data
    assert running_pid(home) is None


def test_a_server_that_ran_before_the_session_is_left_running(home, tmp_path):
    with msggc_home(home):
        embedded.ensure_running()
    before = running_pid(home)

    passes(session(home, tmp_path))

    assert before is not None
    assert running_pid(home) == before


def test_sessions_side_by_side_share_the_server_and_the_last_one_out_stops_it(home, tmp_path):
    long = session(home, tmp_path, hold_s=3)
    short = session(home, tmp_path, hold_s=0)
    passes(short)
    passes(long)  # its second connection came after the short session ended
    assert running_pid(home) is None
