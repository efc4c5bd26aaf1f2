"""The Grafana dashboard and the alert rules of ``deploy/`` as files, without a server: the checks
that hold where Prometheus is not installed (``tests/test_deploy_prometheus.py`` runs them)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "msggc-dashboard.json").read_text())
RULES = yaml.safe_load((ROOT / "deploy" / "prometheus" / "msggc-alerts.yml").read_text())
METRICS_SOURCE = (ROOT / "engine" / "service" / "metrics.py").read_text()
SERIES_SUFFIXES = re.compile(r"_(bucket|count|sum|total)$")
BUILTINS = {"__rate_interval"}


def panels() -> list[dict[str, Any]]:
    return [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]


def queries() -> list[str]:
    rules = [rule["expr"] for group in RULES["groups"] for rule in group["rules"]]
    return [target["expr"] for panel in panels() for target in panel["targets"]] + rules


def test_every_metric_the_dashboard_and_the_alerts_query_is_one_msggc_exports():
    names = {SERIES_SUFFIXES.sub("", name) for expr in queries() for name in re.findall(r"msggc_\w+", expr)}

    assert len(names) >= 15
    assert sorted(name for name in names if f'"{name}"' not in METRICS_SOURCE) == []


def test_every_variable_a_query_uses_is_defined_by_the_dashboard_or_grafana():
    defined = {variable["name"] for variable in DASHBOARD["templating"]["list"]} | BUILTINS
    used = {name for expr in queries() for name in re.findall(r"\$(\w+)", expr)}

    assert used - {"labels", "value"} <= defined  # $labels and $value are the alerts' templates


def test_the_panels_have_unique_ids_fit_the_grid_without_overlap_and_use_the_chosen_data_source():
    everything = DASHBOARD["panels"]
    boxes = [(p["gridPos"]["x"], p["gridPos"]["y"], p["gridPos"]["w"], p["gridPos"]["h"]) for p in everything]

    assert len({panel["id"] for panel in everything}) == len(everything)
    assert all(x >= 0 and w > 0 and x + w <= 24 for x, _, w, _ in boxes)
    overlapping = [(a, b) for a, b in itertools.combinations(boxes, 2)
                   if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]]
    assert overlapping == []
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert panel["targets"] and len(set(refs)) == len(refs), panel["title"]
