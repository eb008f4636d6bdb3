"""dashboards/metrics.txt is the complete list of the metrics the Grafana dashboard and the alert
rules use: every name they use is listed, with its type, and every listed name is used.

The names are the contract with the services: a test that scrapes the running services checks
each one against what they expose (see ``listed_metrics`` and tests/test_ops_prometheus.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS_TXT = ROOT / "dashboards" / "metrics.txt"
DASHBOARD = ROOT / "dashboards" / "rlhf-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"

TYPES = {"counter", "gauge", "histogram"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels added by the scrape configuration, not by the processes.
SCRAPE_LABELS = {"rlhf_component"}
NAME = re.compile(r"\brlhf_[a-z0-9_]+\b")


def listed_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """metrics.txt as {name: (type, labels)}; names as exposed (counters end in _total)."""
    listed: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in METRICS_TXT.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, labels = line.split()
        assert name not in listed, f"{name} listed twice"
        listed[name] = (kind, () if labels == "-" else tuple(labels.split(",")))
    return listed


def exposed_sample_names(name: str, kind: str) -> tuple[str, ...]:
    """The sample names a metric of metrics.txt shows up as in a scrape."""
    if kind == "histogram":
        return tuple(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return (name,)


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']!r}", variable["definition"]


def rule_expressions() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


def used_metrics() -> dict[str, set[str]]:
    """{sample name: where it is used} over the dashboard and the rules."""
    used: dict[str, set[str]] = {}
    for where, expr in [*dashboard_expressions(), *rule_expressions()]:
        for name in set(NAME.findall(expr)) - SCRAPE_LABELS:
            used.setdefault(name, set()).add(where)
    return used


def test_metrics_txt_is_well_formed() -> None:
    listed = listed_metrics()
    assert len(listed) > 20
    for name, (kind, _labels) in listed.items():
        assert kind in TYPES, f"{name}: unknown type {kind}"
        assert name.split("_")[1] in {"policy", "reward", "feedback", "trainer"}, name
        assert name.endswith("_total") == (kind == "counter"), f"{name} ({kind})"
        if kind == "histogram":
            assert not name.endswith(HISTOGRAM_SUFFIXES), name


def test_every_used_metric_is_listed_and_every_listed_one_used() -> None:
    listed = listed_metrics()
    by_sample = {
        sample: name
        for name, (kind, _) in listed.items()
        for sample in exposed_sample_names(name, kind)
    }
    used = used_metrics()
    unlisted = {name: sorted(where) for name, where in used.items() if name not in by_sample}
    assert not unlisted, f"used but not in metrics.txt: {unlisted}"
    # A histogram is only meaningful through its series; a bare name selects nothing.
    bare = [name for name in used if listed.get(name, ("",))[0] == "histogram"]
    assert not bare, f"histograms used without _bucket/_sum/_count: {bare}"
    unused = set(listed) - {by_sample[name] for name in used}
    assert not unused, f"in metrics.txt but used nowhere: {sorted(unused)}"


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "rlhf-service"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])
