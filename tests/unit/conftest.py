"""The unit tier runs with no database: here the server fixture fails the test that asks for it,
before any server is reached or started."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def server_dsn() -> str:
    pytest.fail("tests/unit runs without a database: move this test out of tests/unit", pytrace=False)
