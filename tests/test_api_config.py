"""Service configuration: nodes, config files, and one clear line with exit 2 on a bad one."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.errors import DatabaseUnreachable, UsageError
from engine.service import nodes
from engine.service.settings import load_settings, require_token_beyond_loopback
from engine.service.triggers import Cron, Every

URI_1 = "postgresql://msggc@db1:5433/app"
URI_2 = "postgresql://msggc@db2a:5432,db2b:5432/app?target_session_attrs=read-write"


def test_nodes_spec_keeps_multi_host_uris_and_names_with_colons():
    spec = f"wacore1={URI_1}, wacore2:9dfe77618dba={URI_2},wacore3=host=db3 port=6252 dbname=app"
    parsed = nodes.parse_nodes(spec)
    assert parsed == {"wacore1": URI_1, "wacore2:9dfe77618dba": URI_2,
                      "wacore3": "host=db3 port=6252 dbname=app"}
    addresses = [node.address for node in nodes.build_nodes(parsed)]
    assert addresses == ["db1:5433", "db2a:5432", "db3:6252"]


@pytest.mark.parametrize("spec", ["wacore1", f"wacore1={URI_1},wacore1={URI_2}", "=postgresql://x/y"])
def test_a_bad_nodes_spec_is_a_usage_error(spec):
    with pytest.raises(UsageError):
        nodes.parse_nodes(spec)


def test_unreachable_details_end_with_the_seeds_sentence():
    node = nodes.Node("wacore2", "postgresql://u:secret@127.0.0.1:6252/app")
    exc = DatabaseUnreachable(
        "cannot connect to user=u password=*** dbname=app host=127.0.0.1 port=6252: connection failed:"
        ' connection to server at "127.0.0.1", port 6252 failed: Connection refused'
        " Is the server running on that host and accepting TCP/IP connections?")
    assert nodes.unreachable_details(node, exc) == (
        "Connection refused. Please check if wacore2 is running: 127.0.0.1:6252")


def test_a_toml_config_sets_nodes_and_default_options_and_flags_override_it(tmp_path):
    config = tmp_path / "msggc.toml"
    config.write_text(f'callback_url = "http://127.0.0.1:9/gc"\nstale_after_s = 5\n'
                      f'[nodes]\nwacore1 = "{URI_1}"\nwacore2 = "{URI_2}"\n'
                      '[gc]\nbatch_size = 500\nolder_than = "30d"\nmax_seconds = 120\n')
    settings = load_settings(config=str(config), stale_after_s=9.0)
    assert settings.multiconnect
    assert [node.name for node in settings.nodes] == ["wacore1", "wacore2"]
    assert (settings.defaults.batch_size, settings.defaults.older_than) == (500, timedelta(days=30))
    assert (settings.defaults.max_seconds, settings.stale_after_s) == (120, 9.0)
    assert settings.callback_url == "http://127.0.0.1:9/gc"


def test_a_single_instance_gets_the_default_budget_and_a_queued_run_keeps_its_options():
    settings = load_settings(dsn=URI_1)
    assert not settings.multiconnect and settings.nodes[0].name == ""
    assert settings.defaults.max_seconds == 3600
    node = settings.nodes[0]
    asked = settings.options_for(node, {"max_rows": 7, "older_than": timedelta(hours=12)})
    assert settings.options_of_run(node, asked.describe()) == asked


def test_a_service_with_no_dsn_takes_the_one_its_shell_hands_it(monkeypatch, tmp_path):
    monkeypatch.delenv("MSGGC_DSN", raising=False)
    asked: list[str] = []

    def shells_server() -> str:
        asked.append("asked")
        return URI_2

    assert load_settings(default_dsn=shells_server).nodes[0].dsn == URI_2
    assert load_settings(dsn=URI_1, default_dsn=shells_server).nodes[0].dsn == URI_1
    config = tmp_path / "msggc.toml"
    config.write_text(f'[nodes]\nwacore1 = "{URI_1}"\n')
    assert load_settings(config=str(config), default_dsn=shells_server).multiconnect
    assert asked == ["asked"]  # only when nothing names a database: nodes never start a server


def test_a_service_with_no_database_and_no_default_is_a_one_line_usage_error(monkeypatch):
    monkeypatch.delenv("MSGGC_DSN", raising=False)
    with pytest.raises(UsageError, match=r"^no database configured: give --dsn") as raised:
        load_settings()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("content", "message"), [
    ('{"nodes": {"bad name": "postgresql://x/y"}}', "invalid node name"),
    ('{"gc": {"batch_size": 0}}', "batch size must be >= 1"),
    ('{"gc": {"budget": 1}}', "unknown GC option"),
    ('{"colour": "blue"}', "unknown key"),
    ('{"callback_url": "ftp://x/y"}', "invalid webhook URL"),
    ('{"nodes": {"a": "postgresql://x/y"}, "dsn": "postgresql://z/w"}', "keep only one"),
    ("{not json", "not valid JSON"),
    ('{"archive_dir": "/nonexistent/msggc"}', "is not an existing directory"),
    ('{"gc": {"archive": true, "archive_to": "/tmp"}}', "not both"),
    ('{"every": "1h", "cron": "0 3 * * *"}', "exclude each other"),
    ('{"cron": "0 25 * * *"}', "invalid cron expression"),
    ('{"cron": 3}', "cron must be a cron expression string"),
    ('{"every": [1]}', "every must be a duration"),
    ('{"every": "0.2s"}', "at least 1s"),
    ('{"gc": {"max_app_latency_ms": "fast"}}', "invalid max_app_latency_ms 'fast': use auto, off, or a"),
    ('{"gc": {"max_app_latency_ms": 0}}', "invalid max_app_latency_ms 0"),
    ('{"gc": {"max_app_latency_ms": -5}}', "invalid max_app_latency_ms -5"),
    ('{"gc": {"max_app_latency_ms": true}}', "invalid max_app_latency_ms True"),
    ('{"gc": {"max_app_latency_ms": "nan"}}', "invalid max_app_latency_ms 'nan'"),
    ('{"max_connections": 2}', "max_connections must be at least 3"),
    ('{"max_connections": "many"}', "max_connections must be a whole number"),
    ('{"max_concurrent_gcs": 0}', "max_concurrent_gcs must be at least 1"),
    ('{"max_concurrent_gcs": 1.5}', "max_concurrent_gcs must be a whole number"),
])
def test_a_bad_config_file_is_one_usage_error(tmp_path, content, message):
    config = tmp_path / "msggc.json"
    config.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_settings(config=str(config), dsn=None if "dsn" in content or "nodes" in content else URI_1)


@pytest.mark.parametrize(("host", "allowed"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                               ("127.3.4.5", True), ("0.0.0.0", False), ("10.0.0.8", False),
                                               ("example.org", False)])
def test_listening_beyond_loopback_needs_a_token(host, allowed):
    require_token_beyond_loopback(host, "tok")
    if allowed:
        require_token_beyond_loopback(host, None)
    else:
        with pytest.raises(UsageError, match="without a token"):
            require_token_beyond_loopback(host, None)


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "--host", "0.0.0.0", "--dsn", URI_1], "refusing to listen on 0.0.0.0 without a token"),
    (["serve", "--nodes", "wacore1", "--dsn", URI_1], "invalid node entry"),
    (["worker", "--config", "/nonexistent/msggc.toml"], "cannot read config file"),
    (["worker", "--dsn", URI_1, "--cron", "0 3 * *"], "invalid cron expression '0 3 * *'"),
    (["serve", "--dsn", URI_1, "--every", "1h", "--cron", "0 3 * * *"], "exclude each other"),
    (["serve", "--dsn", URI_1, "--no-worker", "--cron", "0 3 * * *"], "need the worker"),
])
def test_serve_and_worker_exit_2_with_one_line_on_bad_config(args, message):
    result = CliRunner().invoke(main, args, env={"MSGGC_DSN": None, "MSGGC_NODES": None, "MSGGC_CONFIG": None,
                                                  "MSGGC_API_TOKEN": None})
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msggc: error: ") and message in lines[0]


def test_a_json_config_matches_the_toml_one(tmp_path):
    config = tmp_path / "msggc.json"
    config.write_text(json.dumps({"nodes": {"wacore1": URI_1}, "gc": {"sleep": 0.5, "max_wal_rate": "50MB"}}))
    settings = load_settings(config=str(config))
    assert (settings.defaults.sleep, settings.defaults.max_wal_rate) == (0.5, 50 * 1024**2)


def test_a_schedule_comes_from_the_file_unless_a_flag_sets_one(tmp_path):
    config = tmp_path / "msggc.toml"
    config.write_text(f'dsn = "{URI_1}"\ncron = "0 3 * * *"\n')
    assert load_settings(config=str(config)).schedule == Cron("0 3 * * *")
    assert load_settings(config=str(config), every=timedelta(hours=6)).schedule == Every(timedelta(hours=6))
    config.write_text(f'dsn = "{URI_1}"\nevery = 3600\n')
    assert load_settings(config=str(config)).schedule == Every(timedelta(hours=1))
    assert load_settings(dsn=URI_1).schedule is None
    assert load_settings(config=str(config), run_worker=False).schedule is None  # left to `msggc worker`


@pytest.mark.parametrize(("value", "budget", "auto"), [
    (None, None, True),  # the service's default
    ('"auto"', None, True),
    ('"AUTO"', None, True),
    ('"off"', None, False),
    ("20", 20.0, False),
    ('"15ms"', 15.0, False),
    ('"0.2s"', 200.0, False),
])
def test_the_services_latency_budget_is_auto_by_default_a_number_sets_it_off_removes_it(
        tmp_path, value, budget, auto, monkeypatch):
    monkeypatch.delenv("MSGGC_MAX_APP_LATENCY", raising=False)
    config = tmp_path / "msggc.toml"
    config.write_text(f'dsn = "{URI_1}"\n' + (f"[gc]\nmax_app_latency_ms = {value}\n" if value else ""))
    settings = load_settings(config=str(config))
    assert settings.defaults.max_app_latency_ms == budget
    assert settings.auto_app_latency is auto
    assert settings.app_latency == ("auto" if auto else budget)


def test_the_environment_sets_the_latency_budget_and_the_connection_bounds_over_the_file(
        tmp_path, monkeypatch):
    config = tmp_path / "msggc.toml"
    config.write_text(f'dsn = "{URI_1}"\nmax_connections = 30\nmax_concurrent_gcs = 2\n'
                      '[gc]\nmax_app_latency_ms = 20\n')
    settings = load_settings(config=str(config))
    assert (settings.max_connections, settings.max_concurrent_gcs, settings.app_latency) == (30, 2, 20.0)
    monkeypatch.setenv("MSGGC_MAX_APP_LATENCY", "off")
    monkeypatch.setenv("MSGGC_MAX_CONNECTIONS", "12")
    monkeypatch.setenv("MSGGC_MAX_CONCURRENT_GCS", "3")
    settings = load_settings(config=str(config))
    assert (settings.max_connections, settings.max_concurrent_gcs, settings.app_latency) == (12, 3, None)
    monkeypatch.setenv("MSGGC_MAX_APP_LATENCY", "soon")
    with pytest.raises(UsageError, match="invalid max_app_latency_ms 'soon'"):
        load_settings(config=str(config))
    monkeypatch.delenv("MSGGC_MAX_APP_LATENCY")
    monkeypatch.setenv("MSGGC_MAX_CONNECTIONS", "1")
    with pytest.raises(UsageError, match="max_connections must be at least 3"):
        load_settings(config=str(config))


def test_without_a_setting_the_connection_bounds_are_measured_on_the_server():
    settings = load_settings(dsn=URI_1)
    assert (settings.max_connections, settings.max_concurrent_gcs) == (None, None)


def test_serve_exits_2_with_one_line_on_a_bad_latency_budget_in_the_environment():
    result = CliRunner().invoke(main, ["serve", "--dsn", URI_1],
                                env={"MSGGC_NODES": None, "MSGGC_CONFIG": None, "MSGGC_API_TOKEN": None,
                                     "MSGGC_MAX_APP_LATENCY": "-3ms"})
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == ["msggc: error: invalid max_app_latency_ms '-3ms': use auto, off, or a latency such as"
                     " 20ms (more than zero)"]
