"""msggc's CLI as a real process, the way a user runs it: the one way every test starts it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent

_WITH_RECONNECT_WINDOW = (
    "import sys, engine.walk as c; c.RECONNECT_WINDOW_S = float(sys.argv.pop(1));"
    " from engine.cli import main; main(prog_name='msggc')"
)

Output = int | IO[Any] | None


def cli_command(*args: str, reconnect_window_s: float | None = None) -> list[str]:
    """``python -m engine.cli ARGS``; with a reconnect window, the same CLI with that one constant
    shortened (so an outage longer than the window fits in a test)."""
    if reconnect_window_s is None:
        return [sys.executable, "-m", "engine.cli", *args]
    return [sys.executable, "-c", _WITH_RECONNECT_WINDOW, str(reconnect_window_s), *args]


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment with no ``MSGGC_*`` setting inherited from the developer's shell
    (``MSGGC_HOME`` excepted: it names the test session's embedded server), plus ``env``.
    Every call names its database, nodes and config itself."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MSGGC_") or k == "MSGGC_HOME"}
    return {**inherited, **(env or {})}


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout_s: float = 120,
            reconnect_window_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``msggc ARGS`` to its end; stdout and stderr captured as text."""
    return subprocess.run(cli_command(*args, reconnect_window_s=reconnect_window_s), capture_output=True,
                          text=True, timeout=timeout_s, env=cli_env(env), cwd=REPO, check=False)


def spawn_cli(*args: str, env: Mapping[str, str] | None = None, reconnect_window_s: float | None = None,
              stdout: Output = subprocess.PIPE, stderr: Output = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start ``msggc ARGS`` and return at once; stdout and stderr piped as text unless redirected.
    The caller waits for it (``communicate``) or ends it."""
    return subprocess.Popen(cli_command(*args, reconnect_window_s=reconnect_window_s), stdout=stdout,
                            stderr=stderr, text=True, env=cli_env(env), cwd=REPO)
