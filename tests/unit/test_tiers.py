"""The test tiers: loading the test configuration starts no server."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO, cli_env


def test_loading_the_test_configuration_starts_no_server(tmp_path):
    probe = ("import tests.conftest; from engine.tools import embedded;"
             " assert embedded.url() is None, embedded.url()")
    env = {**cli_env(), "MSGGC_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "pgdata").exists()

