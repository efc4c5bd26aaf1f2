"""Start fast, end to end: a real `msggc gc` that deletes rows loads none of the packages only other
commands need (tests/unit/test_imports.py checks the same with ``collect`` stubbed, without a
database; this one also sees what the run imports on its way)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.data import fill, surviving_ids
from tests.support import REPO, cli_env
from tests.unit.test_imports import NOT_FOR_GC

# The console script's code, with the process's top-level packages written out at exit.
_GC_RECORDING_IMPORTS = (
    "import atexit, json, sys; out = sys.argv.pop(1); atexit.register(lambda: open(out, 'w').write("
    "json.dumps(sorted({m.partition('.')[0] for m in sys.modules}))));"
    " from engine.cli import main; main(prog_name='msggc')"
)


def _gc_loading(out: Path, *args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _GC_RECORDING_IMPORTS, str(out), *args], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(out.read_text()))


def test_a_gc_that_deletes_rows_loads_only_the_driver_and_the_core(conn, dsn, tmp_path):
    fill(conn, [i % 2 == 0 for i in range(200)])
    loaded = _gc_loading(tmp_path / "modules.json", "gc", "--dsn", dsn, "--batch-size", "50")
    assert len(surviving_ids(conn)) == 100
    assert {"engine", "psycopg"} <= loaded
    assert not loaded & NOT_FOR_GC, sorted(loaded & NOT_FOR_GC)


def test_a_gc_with_a_where_filter_adds_pglast_and_nothing_else(conn, dsn, tmp_path):
    fill(conn, [True] * 20)
    loaded = _gc_loading(tmp_path / "modules.json", "gc", "--dsn", dsn, "--where", "status = 2")
    assert surviving_ids(conn) == []
    assert "pglast" in loaded
    assert not loaded & (NOT_FOR_GC - {"pglast"}), sorted(loaded & NOT_FOR_GC)
