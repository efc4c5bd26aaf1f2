"""``deploy/``'s Grafana dashboard and Prometheus alert rules in a real Prometheus (Debian's
``prometheus`` package) scraping a real ``msggc serve``: every alert fires for the node that
earned it, and every dashboard panel's query and every alert expression answers with series.

The service runs four nodes, each in the state one alert watches for: ``ok`` collects and its
webhooks go to a port nobody listens on; ``failing`` has an application trigger that refuses
every delete; ``stalled`` has its table locked by the application while the lock timeout is
long; ``down`` points at a closed port. Its schedule requests a GC every 3 s. The rules are the
shipped ones with every ``N * 60`` threshold at 3 s and every ``for:`` at 1 s.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.api_support import TOKEN, answers, cli_process, closed_port_dsn, free_port, stop
from tests.data import REFUSE_DELETES, fill
from tests.polling import wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "msggc-alerts.yml"
RULES_TEST = DEPLOY / "prometheus" / "msggc-alerts.test.yml"
SAMPLE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "msggc-dashboard.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
MISSING = "not installed (Debian: apt-get install prometheus; .ci/run installs it as root)"

MINUTES = re.compile(r"\b\d+ \* 60\b")
TEST_THRESHOLD_S = "3"
DASHBOARD_VARIABLES = {"$node": ".*", "$__rate_interval": "1m"}
"""What Grafana would put in a panel's query: every node, a window over the whole test."""
EXPECTED = {("MsggcGcFailed", "failing"), ("MsggcRunStalled", "stalled"), ("MsggcWebhookUndelivered", "ok"),
            ("MsggcScheduledGcMissed", "down"), ("MsggcNodeUnreachable", "down")}


def alert_rules(text: str) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


def rules_for_test(path: Path) -> Path:
    """The shipped rules with their thresholds at seconds: the same expressions, fired in a test."""
    data = yaml.safe_load(RULES.read_text())
    for rule in (rule for group in data["groups"] for rule in group["rules"]):
        rule["expr"] = MINUTES.sub(TEST_THRESHOLD_S, rule["expr"])
        if "for" in rule:
            rule["for"] = "1s"
    path.write_text(yaml.safe_dump(data))
    return path


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, query) of every dashboard panel, its variables filled in as Grafana would."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


@contextmanager
def prometheus(workdir: Path, target: str, rules: Path) -> Iterator[str]:
    """Prometheus on a free loopback port scraping ``target`` with the shipped sample config
    (its token file, scrape job and rule file), every second; stopped on exit."""
    assert PROMETHEUS is not None
    config = yaml.safe_load(SAMPLE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    [job] = config["scrape_configs"]
    token = workdir / "msggc-token"
    token.write_text(TOKEN)
    job["authorization"]["credentials_file"] = str(token)
    job["static_configs"] = [{"targets": [target]}]
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = workdir / "prometheus.log"
    with log.open("wb") as sink:
        popen = subprocess.Popen([PROMETHEUS, f"--config.file={config_file}",
                                  f"--storage.tsdb.path={workdir / 'tsdb'}",
                                  f"--web.listen-address={url.removeprefix('http://')}"],
                                 stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: popen.poll() is not None or answers(url + "/-/ready"), timeout_s=30,
                   what="prometheus to start")
        assert popen.poll() is None, log.read_text(errors="replace")
        yield url
    finally:
        stop(popen)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """The series an instant query returns (``/api/v1/query``)."""
    answer = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def firing(url: str) -> set[tuple[str, str]]:
    alerts = httpx.get(url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("node", "")) for a in alerts if a["state"] == "firing"}


def unanswered(url: str, queries: dict[str, str]) -> list[str]:
    """The names of the queries that answer no series (yet)."""
    return [name for name, expr in queries.items() if not query(url, expr)]


def all_fired(url: str) -> set[tuple[str, str]] | None:
    """The (alert, node) pairs firing once every expected one does."""
    now = firing(url)
    return now if now >= EXPECTED else None


@pytest.mark.skipif(PROMTOOL is None, reason=f"promtool {MISSING}")
def test_promtool_accepts_the_rules_the_sample_config_and_the_rules_unit_tests_of_the_shipped_thresholds(
        tmp_path):
    """``msggc-alerts.test.yml`` fires each shipped rule on synthetic series at its own threshold
    (not before) with its annotations rendered; the live test below shortens the thresholds."""
    token = tmp_path / "msggc-token"
    token.write_text(TOKEN)
    config = tmp_path / "prometheus.yml"
    config.write_text(SAMPLE_CONFIG.read_text().replace("/etc/prometheus/msggc-token", str(token)))
    (tmp_path / "msggc-alerts.yml").write_text(RULES.read_text())

    rules = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    sample = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True)
    unit = subprocess.run([PROMTOOL, "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                          cwd=RULES_TEST.parent)

    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules(RULES.read_text()))} rules found" in rules.stdout
    assert sample.returncode == 0, sample.stdout + sample.stderr
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = {test["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for test in case["alert_rule_test"] if test["exp_alerts"]}
    assert tested == {rule["alert"] for rule in alert_rules(RULES.read_text())}


def test_every_alert_threshold_is_written_in_minutes_and_the_test_copy_shortens_each(tmp_path):
    """The test copy finds what it shortens: a rule written another way would escape the test."""
    shipped = {rule["alert"]: rule for rule in alert_rules(RULES.read_text())}
    shortened = {rule["alert"]: rule for rule in alert_rules(rules_for_test(tmp_path / "r.yml").read_text())}

    assert set(shipped) == {alert for alert, _ in EXPECTED}
    for name in ("MsggcRunStalled", "MsggcWebhookUndelivered", "MsggcScheduledGcMissed"):
        assert MINUTES.search(shipped[name]["expr"]) and not MINUTES.search(shortened[name]["expr"])
    assert shortened["MsggcNodeUnreachable"]["for"] == "1s"


@pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus {MISSING}")
def test_each_alert_fires_for_its_node_and_every_panel_and_alert_query_answers_in_a_real_prometheus(
        conn, dsn, make_dsn, tmp_path):
    failing, stalled = make_dsn(), make_dsn()
    fill(conn, [True] * 300 + [False] * 100)
    for other in (failing, stalled):
        with psycopg.connect(other, autocommit=True) as node:
            fill(node, [True] * 50 + [False] * 10)
    with psycopg.connect(failing, autocommit=True) as node:
        node.execute(REFUSE_DELETES)
    config = {"nodes": {"ok": dsn, "failing": failing, "stalled": stalled, "down": closed_port_dsn()},
              "callback_url": f"http://127.0.0.1:{free_port()}/gc",  # nobody listens there
              "every": "3s", "poll_s": 0.2, "connect_timeout_s": 1,
              "gc": {"lock_timeout_ms": 120_000, "statement_timeout_ms": 120_000, "max_app_latency_ms": 1000}}
    rules = rules_for_test(tmp_path / "msggc-alerts.yml")
    queries = {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules(rules.read_text())}
    queries |= {f"panel {title!r}: {expr}": expr for title, expr in panel_queries()}

    with psycopg.connect(stalled) as application:
        application.execute("LOCK TABLE messages IN SHARE MODE")  # held until the end
        with cli_process(tmp_path, "serve", config) as service, \
                prometheus(tmp_path, service.url.removeprefix("http://"), rules) as url:
            fired = wait_until(lambda: all_fired(url), timeout_s=60, what=f"{sorted(EXPECTED)} to fire")
            with contextlib.suppress(AssertionError):  # the assertion below names any that never answer
                wait_until(lambda: not unanswered(url, queries), timeout_s=20, interval_s=0.5)
            silent = unanswered(url, queries)
            deleted = query(url, 'msggc_messages_deleted_total{node="ok"}')

    print("firing:", sorted(fired))
    assert {alert for alert, node in fired if node == "ok"} <= {"MsggcWebhookUndelivered", "MsggcRunStalled"}
    assert {node for alert, node in fired if alert == "MsggcNodeUnreachable"} == {"down"}
    assert {node for alert, node in fired if alert == "MsggcGcFailed"} == {"failing"}
    assert silent == []
    assert float(deleted[0]["value"][1]) == 300
