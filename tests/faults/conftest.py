"""Fixtures of the fault tests, and the figures they measured, printed at the end of the run."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import CallbackServer, Ledger, PrivateServer

LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


@pytest.fixture
def callback() -> Iterator[CallbackServer]:
    with CallbackServer() as server:
        yield server


@pytest.fixture(scope="module")
def private_server() -> Iterator[PrivateServer]:
    """A separate embedded server in a temporary MSGGC_HOME, stopped and removed afterwards."""
    server = PrivateServer(Path(tempfile.mkdtemp(prefix="msggc-faults-")))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.home, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER.counts:
        return
    terminalreporter.section("msggc reliability figures (measured by tests/faults)")
    terminalreporter.write_line("| figure | count |")
    terminalreporter.write_line("| --- | ---: |")
    for line in LEDGER.lines():
        terminalreporter.write_line(line)
    if target := os.environ.get("MSGGC_FIGURES_JSON"):
        Path(target).write_text(json.dumps(dict(LEDGER.counts), indent=2, sort_keys=True) + "\n")
