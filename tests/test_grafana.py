"""The Cognitive ECG dashboard and the alert rules, checked without a server: in sync with
their code, the structural rules of Grafana's dashboard linter, and promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from sidecar.exporter import Exporter

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD: dict[str, Any] = json.loads((ROOT / "grafana" / "cognitive-ecg.json").read_text())
ALERTS = ROOT / "deploy" / "prometheus" / "fse-alerts.yml"
PANELS = DASHBOARD["panels"]
TARGETS = [(p["title"], t) for p in PANELS for t in p["targets"]]
DS_REF = {"type": "prometheus", "uid": "${datasource}"}


def exported_names() -> set[str]:
    """Every series name the exporter exposes (histograms with their _bucket/_sum/_count)."""
    reg = CollectorRegistry()
    Exporter(reg)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
    return {fam.name + s for fam in reg.collect() for s in suffixes.get(fam.type, ("",))}


def test_the_dashboard_json_is_what_its_code_generates() -> None:
    r = subprocess.run([sys.executable, "grafana/dashboard.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_datasource_is_a_template_variable_used_by_every_panel_and_target() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "${DS_PROMETHEUS}" not in json.dumps(DASHBOARD)  # breaks file provisioning
    for p in PANELS:
        assert p["datasource"] == DS_REF, p["title"]
    for title, t in TARGETS:
        assert t["datasource"] == DS_REF, title


def test_every_panel_has_a_unit() -> None:
    for p in PANELS:
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]


def test_rates_use_the_rate_interval_and_counters_appear_only_inside_rate_or_increase() -> None:
    for title, t in TARGETS:
        expr = t["expr"]
        for window in re.findall(r"\b(?:rate|increase|irate)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", (title, expr)
        for name in re.findall(r"\bfse_\w+_(?:total|bucket)\b", expr):
            assert re.search(rf"\b(?:rate|increase)\({name}\b", expr), f"{title}: {name} outside rate()/increase()"


def test_no_query_groups_or_filters_by_anything_per_session() -> None:
    for title, t in TARGETS:
        grouped = [lab.strip() for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", t["expr"]) for lab in g.split(",")]
        matched = re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", t["expr"])
        for label in grouped + matched:
            assert label in BOUNDED_LABELS | set(SCOPE), (title, label)


SCOPE = ("namespace", "job", "pod", "instance")  # the scrape target's: one deployment
BOUNDED_LABELS = {"le", "decision", "band", "rule", "action", "guard", "from_band", "to_band", "outcome", "code"}


def test_every_metric_of_every_query_is_narrowed_to_the_chosen_deployment() -> None:
    """Two guarded deployments in one Prometheus never merge into one picture: each fse
    selector carries every scope variable's matcher."""
    for title, t in TARGETS:
        selectors = re.findall(r"\b(fse_\w+)(\{[^}]*\})?", t["expr"])
        assert selectors, title
        for name, matchers in selectors:
            for label in SCOPE:
                assert f'{label}=~"${label}"' in matchers, (title, name, label)


def test_the_scope_variables_default_to_all_and_narrow_each_other_in_order() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    for i, label in enumerate(SCOPE):
        v = variables[label]
        assert v["type"] == "query" and v["datasource"] == DS_REF
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*"  # ".*" also matches a target without the label
        m = re.fullmatch(r"label_values\(fse_build_info(?:\{(.*)\})?, (\w+)\)", v["query"])
        assert m and m.group(2) == label, v["query"]
        assert re.findall(r'(\w+)=~"\$\w+"', m.group(1) or "") == list(SCOPE[:i])


def test_every_metric_the_dashboard_and_the_alerts_read_is_one_the_exporter_exports() -> None:
    names = exported_names()
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    exprs = [t["expr"] for _, t in TARGETS] + [r["expr"] for r in rules]
    used = {n for e in exprs for n in re.findall(r"\bfse_\w+", e)}
    assert used and used <= names, sorted(used - names)


def test_the_provisioning_files_point_at_the_dashboard() -> None:
    ds = yaml.safe_load((ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((ROOT / "grafana" / "provisioning" / "dashboards" / "libfse.yaml").read_text())
    provider = dash["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/var/lib/grafana/dashboards")


def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 6 rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str) -> None:
    r = subprocess.run(
        [promtool, "test", "rules", "fse-alerts.test.yml"], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_unit_tests_catch_a_broken_alert(promtool: str, tmp_path: Path) -> None:
    (tmp_path / "fse-alerts.yml").write_text(ALERTS.read_text().replace("> 0.05", "> 0.5"))  # a halt threshold 10x too lax
    shutil.copy(ALERTS.parent / "fse-alerts.test.yml", tmp_path)
    r = subprocess.run(
        [promtool, "test", "rules", "fse-alerts.test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "FseHaltRatioHigh" in r.stdout + r.stderr
