"""``deploy/``'s systemd units, environment file and sample ``msggc.toml``: the units pass
``systemd-analyze verify`` and their command line, with the environment file, starts a real
``msggc serve``; the sample documents every option msggc's config loader knows, and loads with
each of them uncommented."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from engine.service.nodes import TARGET_KEYS
from engine.service.settings import FILE_KEYS, GC_KEYS, load_settings
from tests.api_support import answers, free_port, stop
from tests.polling import wait_until
from tests.support import cli_env

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = (DEPLOY / "systemd" / "msggc-serve.service", DEPLOY / "systemd" / "msggc-worker.service")
ENV_FILE = DEPLOY / "systemd" / "msggc.env"
SAMPLE = DEPLOY / "msggc.toml"
INSTALLED = "/opt/msggc/bin/msggc"
"""Where the units expect msggc (a venv in /opt/msggc); the tests put this checkout's there."""
MSGGC = Path(sys.executable).with_name("msggc")
"""The console script of the venv running the tests (``make setup`` installs it)."""
SAMPLE_DIR = "/var/lib/msggc/archive"
OPTION = re.compile(r"^# ([a-z_0-9]+) = (.+)$")
COMPANIONS = {"archive_format": ("archive_to",)}
"""Options documented as going with another: uncommented together."""


def unit_text(unit: Path) -> str:
    return unit.read_text().replace(INSTALLED, str(MSGGC))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_the_unit_passes_systemd_analyze_verify_without_a_warning(unit, tmp_path):
    copy = tmp_path / unit.name
    copy.write_text(unit_text(unit))

    verified = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)

    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def environment(text: str) -> dict[str, str]:
    """The variables an ``EnvironmentFile=`` sets (``KEY=VALUE`` lines; ``#`` comments)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def exec_start(unit: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd runs it: ``${VAR}`` one word, ``$VAR`` split on spaces."""
    [line] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    words: list[str] = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        if (braced := re.fullmatch(r"\$\{(\w+)\}", word)) is not None:
            words.append(env.get(braced[1], ""))
        elif (bare := re.fullmatch(r"\$(\w+)", word)) is not None:
            words.extend(env.get(bare[1], "").split())
        else:
            words.append(word)
    return words


@pytest.mark.parametrize(("unit", "page", "expected"), [
    (UNITS[0], "/health", '"worker":"running"'),
    (UNITS[1], "/metrics", "# TYPE msggc_batch_duration_seconds histogram"),
], ids=["serve", "worker"])
def test_the_units_command_line_with_the_environment_file_and_the_sample_config_answers(
        unit, page, expected, dsn, tmp_path):
    config = tmp_path / "msggc.toml"
    sample_dsn = '# dsn = "postgresql://msggc@db.example/app"'
    config.write_text(SAMPLE.read_text().replace(sample_dsn, f'dsn = "{dsn}"'))
    port = str(free_port())
    env = environment(ENV_FILE.read_text()) | {"MSGGC_CONFIG": str(config), "MSGGC_LISTEN_PORT": port}
    env["MSGGC_WORKER_FLAGS"] = env["MSGGC_WORKER_FLAGS"].replace("8081", port)
    command = exec_start(unit_text(unit), env)
    url = f"http://127.0.0.1:{port}{page}"
    log = tmp_path / "msggc.log"
    with log.open("wb") as sink:
        popen = subprocess.Popen(command, env=cli_env(env), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: popen.poll() is not None or answers(url), timeout_s=30, what=f"{url} to answer")
        body = httpx.get(url).text
    finally:
        stop(popen)

    assert popen.returncode in (0, -15), log.read_text(errors="replace")
    assert expected in body
    assert command[1:] in (["serve", "--host", "127.0.0.1", "--port", port],
                           ["worker", "--metrics-port", port])


def test_the_environment_file_names_only_variables_msggc_or_its_units_read():
    """A variable spelled wrong there would be ignored without a word."""
    units = "".join(unit.read_text() for unit in UNITS)
    engine = "".join(path.read_text() for path in (DEPLOY.parent / "engine").rglob("*.py"))
    named = re.findall(r"^#?(MSGGC_\w+)=", ENV_FILE.read_text(), re.MULTILINE)

    assert len(named) >= 10
    unknown = [name for name in named
               if f'"{name}"' not in engine and f"${name}" not in units and f"${{{name}}}" not in units]
    assert unknown == []


def documented(text: str) -> dict[str, set[str]]:
    """The options the sample documents (``# key = value`` lines), by section."""
    sections: dict[str, set[str]] = {"top": set(), "gc": set(), "nodes": set()}
    section = "top"
    for line in text.splitlines():
        if line.strip() in ("[gc]", "# [nodes]"):
            section = line.strip("#[] ")
        elif (option := OPTION.match(line)) is not None:
            sections[section].add(option[1])
    return sections


def test_the_sample_config_documents_every_option_of_the_loader():
    options = documented(SAMPLE.read_text())
    node_entry = re.search(r"^# (\w+ = \{.*\})$", SAMPLE.read_text(), re.MULTILINE)

    assert options["top"] == set(FILE_KEYS) - {"gc", "nodes"}
    assert options["gc"] == set(GC_KEYS)
    assert node_entry is not None
    [entry] = tomllib.loads(node_entry[1]).values()
    assert set(entry) == {"dsn", *TARGET_KEYS}


def test_the_sample_config_loads_as_shipped_and_with_each_option_uncommented(tmp_path):
    text = SAMPLE.read_text().replace(SAMPLE_DIR, str(tmp_path))
    lines = text.splitlines()
    config = tmp_path / "msggc.toml"
    loaded = {}
    for name in [None, *sorted(set().union(*documented(text).values()))]:
        wanted = {name, *COMPANIONS.get(name or "", ())}
        chosen = [line[2:] if (m := OPTION.match(line)) and m[1] in wanted else line for line in lines]
        if name in documented(text)["nodes"]:
            chosen = [line[2:] if line == "# [nodes]" else line for line in chosen]
        config.write_text("\n".join(chosen) + "\n")
        loaded[name] = load_settings(config=str(config), default_dsn=lambda: "postgresql://msggc@db/app")

    shipped = loaded.pop(None)
    assert (shipped.multiconnect, shipped.defaults.max_seconds, shipped.schedule) == (False, 3600, None)
    assert loaded["wacore2"].nodes[0].target["table"] == "app.inbox"
    assert str(loaded["every"].schedule) == "Every(interval=datetime.timedelta(seconds=3600))"
    assert loaded["max_wal_rate"].defaults.max_wal_rate == 50 * 2**20
    assert loaded["archive_format"].defaults.archive_format == "zstd"
