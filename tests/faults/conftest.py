"""Fixtures of the fault tests, and the figures they measured, printed at the end of the run."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import CallbackServer, Ledger

LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


@pytest.fixture
def callback() -> Iterator[CallbackServer]:
    with CallbackServer() as server:
        yield server


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
