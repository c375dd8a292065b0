"""A real Prometheus scrapes a real sidecar while the embedded model generates under guard;
every PromQL expression of the dashboard and of the alert rules must return data.

The same run renders the dashboard's panels to a PNG (grafana/render_ecg.py). The README's
picture comes from this test run longer:
``FSE_ECG_SECONDS=150 FSE_ECG_OUT=grafana/ecg.png .venv/bin/python -m pytest tests/test_prometheus_e2e.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from engine_adapters.client import GuardClient
from engine_adapters.llama_cpp import GuardedLlama
from sidecar.bench.quality import LOOPS
from sidecar.core.sampling import SamplingParams
from sidecar.demo import CHAT
from sidecar.errors import StepRefused

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "grafana"))
from render_ecg import render, scoped  # noqa: E402

pytestmark = pytest.mark.slow
ALERTS = ROOT / "deploy" / "prometheus" / "fse-alerts.yml"
POLICY = {
    "guards": {"neg_logprob": {"enabled": True, "threshold": 6.0}, "rank": {"enabled": True, "threshold": 50}},
    "rules": [{"id": "says-the", "kind": "literal", "patterns": [" the "], "action": "flag"}],
}
STORIES = (
    "Write a long story about a dragon who learns to paint.",
    "Describe a busy market in the morning, stall by stall.",
    "Explain how a bicycle works to a child.",
)


DEPLOYMENTS = {
    "fse-sidecar": {"namespace": "team-a", "pod": "guard-a-0"},
    "fse-sidecar-b": {"namespace": "team-b", "pod": "guard-b-0"},
}


def api(base: str, path: str, **params: Any) -> dict[str, Any]:
    qs = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{base}{path}?{qs}", timeout=30) as r:
        return json.load(r)


@pytest.fixture
def prometheus(tmp_path: Path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is missing: run `make setup-prometheus` (Debian's prometheus package)")
    metrics_port, web_port = free_port(), free_port()
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        # One sidecar scraped as two deployments (their namespace and pod labels as the
        # Prometheus Operator would set them): the dashboard's variables must tell them apart.
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": labels}]}
            for job, labels in DEPLOYMENTS.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{web_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "prometheus.log").read_text(errors="replace")) from None
            time.sleep(0.2)
    yield base, metrics_port
    proc.terminate()
    proc.wait(20)
    log.close()


def guarded_traffic(g: GuardedLlama, client: GuardClient, seconds: float) -> int:
    """Healthy prompts at T=0.7, a hot one at T=2.0 (heals), a looping one; one refused step."""
    tokens, i = 0, 0
    end = time.monotonic() + seconds
    while True:
        prompt = STORIES[i % len(STORIES)]
        for text, t in ((prompt, 0.7), (prompt, 2.0), (LOOPS[i % len(LOOPS)], 0.0)):
            done = g.complete(CHAT.format(text), max_tokens=48, sampling=SamplingParams(temperature=t, seed=i))
            tokens += len(done.tokens)
        i += 1
        if time.monotonic() > end:
            break
    s = client.open_session(g.vocab_digest, SamplingParams())
    s.next_step = 3
    with pytest.raises(StepRefused):
        s.step(np.zeros(len(g.vocab), "float32"))
    return tokens


def without_threshold(expr: str) -> str:
    """An alert's expression as a query that returns its data whether or not it fires."""
    expr = " ".join(expr.split())
    m = re.fullmatch(r"absent\((.*)\)", expr)
    if m:
        return m.group(1)
    return re.sub(r"\s*(?:>|<|==|!=|>=|<=)\s*[0-9.e+-]+$", "", expr)


def test_every_dashboard_and_alert_expression_returns_data_from_a_real_scrape(llama, start_sidecar, keys, prometheus, tmp_path):
    base, metrics_port = prometheus
    sc = start_sidecar(policies={"default": POLICY}, metrics={"listen": f"127.0.0.1:{metrics_port}"})
    client = GuardClient(sc.target, keys.public, step_timeout=5.0)
    client.wait_ready()
    g = GuardedLlama(llama, client)
    deadline = time.monotonic() + 60  # Prometheus hands new targets to its scrapers every 5 s
    while not any(t["health"] == "up" for t in api(base, "/api/v1/targets")["data"]["activeTargets"]):
        assert time.monotonic() < deadline, api(base, "/api/v1/targets")
        time.sleep(0.5)
    start = time.time()
    tokens = guarded_traffic(g, client, float(os.environ.get("FSE_ECG_SECONDS", "0")))
    assert tokens > 0
    time.sleep(4)  # a few more scrapes: every rate window holds the traffic
    end = time.time()

    dashboard = json.loads((ROOT / "grafana" / "cognitive-ecg.json").read_text())
    exprs = {f"panel {p['title']!r}": t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]:
        exprs[f"alert {rule['alert']}"] = without_threshold(rule["expr"])
    window = f"{max(int(end - start) + 10, 20)}s"  # the whole run
    for what, expr in exprs.items():
        q = expr.replace("$__rate_interval", window).replace("[5m]", f"[{window}]").replace("[10m]", f"[{window}]")
        body = api(base, "/api/v1/query", query=scoped(q, {}), time=end)
        assert body["status"] == "success", (what, q, body)
        assert body["data"]["result"], f"{what}: no data for {q}"
        if what.startswith("panel"):  # one deployment alone has data; one that does not exist has none
            assert api(base, "/api/v1/query", query=scoped(q, {"namespace": "team-b"}), time=end)["data"]["result"], what
            assert not api(base, "/api/v1/query", query=scoped(q, {"namespace": "team-z"}), time=end)["data"]["result"], what
    # Chosen one deployment, a counter reads half of "All" (the same sidecar scraped twice).
    both = {
        v: float(
            api(base, "/api/v1/query", query=scoped(f'sum(fse_verdicts_total{{job=~"{v}"}})', {}), time=end)["data"]["result"][0][
                "value"
            ][1]
        )
        for v in (".*", "fse-sidecar")
    }
    assert both[".*"] == 2 * both["fse-sidecar"] > 0
    # The variables' own queries list both deployments, each narrowed by the ones before it.
    variables = {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"}
    for label, chosen, want in (
        ("namespace", {}, {"team-a", "team-b"}),
        ("job", {"namespace": "team-b"}, {"fse-sidecar-b"}),
        ("pod", {}, {"guard-a-0", "guard-b-0"}),
        ("instance", {"job": "fse-sidecar"}, {f"127.0.0.1:{metrics_port}"}),
    ):
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", scoped(variables[label], chosen))
        assert m and m.group(2) == label
        got = api(base, f"/api/v1/label/{label}/values", **{"match[]": m.group(1), "start": start, "end": end})["data"]
        assert set(got) == want, (label, m.group(1), got)
    # The alert rules load and evaluate (none should fire on this healthy run but the ratios' own).
    groups = api(base, "/api/v1/rules")["data"]["groups"]
    assert {r["name"] for grp in groups for r in grp["rules"]} >= {"FseSidecarDown", "FseHaltRatioHigh"}
    assert all(r["health"] == "ok" for grp in groups for r in grp["rules"]), groups

    out = Path(os.environ.get("FSE_ECG_OUT", tmp_path / "ecg.png"))
    render(base, start, end, out, rate_interval="30s" if end - start > 60 else "10s", step=2.0, scope={"job": "fse-sidecar"})
    assert out.stat().st_size > 20_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client.close()
