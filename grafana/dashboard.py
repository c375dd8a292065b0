"""The "Cognitive ECG" Grafana dashboard, as code: ``python grafana/dashboard.py`` writes
grafana/cognitive-ecg.json (``--check``: exit 1 when the committed JSON is stale).

Built with grafana-foundation-sdk: Grafana Labs generates its typed builders from
Grafana's own dashboard schema, so a field this file sets is a field Grafana reads
(grafanalib, the alternative, is hand-written and trails the schema). Only this build step
depends on it; Grafana reads the committed JSON.

Every panel and query names the ``datasource`` template variable (never a fixed uid, never
``${DS_PROMETHEUS}``, which file provisioning does not resolve); counters appear only inside
``rate``/``increase`` over ``$__rate_interval``; every panel has a unit; no query groups by
anything per-session (the exporter has no such label).

Several guarded deployments share one Prometheus: the ``namespace``, ``job``, ``pod`` and
``instance`` variables (each "All" by default, read from ``fse_build_info``) filter every
metric of every query, so each deployment can be looked at alone. "All" is ``.*``, which
also matches a target without that label (a sidecar scraped outside Kubernetes has no
namespace or pod).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, Threshold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sidecar.generated import write_or_check  # noqa: E402

OUT = Path(__file__).resolve().parent / "cognitive-ecg.json"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# The scrape target's labels the variables filter on, in the order they narrow each other.
SCOPE = ("namespace", "job", "pod", "instance")
MATCHERS = ", ".join(f'{label}=~"${label}"' for label in SCOPE)
_METRIC = re.compile(r"\b(fse_\w+)(\{)?")


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def scoped(expr: str) -> str:
    """``expr`` with every fse metric selector narrowed to the variables' scope."""
    return _METRIC.sub(lambda m: f"{m.group(1)}{{{MATCHERS}" + (", " if m.group(2) else "}"), expr)


def q(expr: str, legend: str) -> Query:
    return Query(scoped(expr), legend)


def scope_variables() -> list[dashboard.QueryVariable]:
    """One variable per scope label, each listing the values left by the ones before it."""
    from grafana_foundation_sdk.models.dashboard import VariableRefresh

    out = []
    for i, label in enumerate(SCOPE):
        before = ", ".join(f'{b}=~"${b}"' for b in SCOPE[:i])
        selector = f"fse_build_info{{{before}}}" if before else "fse_build_info"
        out.append(
            dashboard.QueryVariable(label)
            .label(label)
            .datasource(DS)
            .query(f"label_values({selector}, {label})")
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(1)
        )
    return out


def quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[Query]:
    return [q(f"histogram_quantile({x}, sum by (le) (rate({metric}_bucket[{RATE}])))", f"p{int(x * 100)}") for x in qs]


def ratio(decision: str) -> str:
    return f'sum(rate(fse_verdicts_total{{decision="{decision}"}}[{RATE}])) / sum(rate(fse_verdicts_total[{RATE}]))'


def steps(*pairs: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    from grafana_foundation_sdk.models.dashboard import ThresholdsMode

    return dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(value=v, color=c) for v, c in pairs])


def series(
    title: str, unit: str, queries: list[Query], pos: tuple[int, int, int, int], description: str = ""
) -> timeseries.Panel:
    p = timeseries.Panel().title(title).description(description).unit(unit).datasource(DS).grid_pos(GridPos(*pos))
    for i, query in enumerate(queries):
        p = p.with_target(prometheus.Dataquery().datasource(DS).expr(query.expr).legend_format(query.legend).ref_id(chr(65 + i)))
    return p


def single(
    title: str, unit: str, query: Query, pos: tuple[int, int, int, int], th: dashboard.ThresholdsConfig, description: str = ""
) -> stat.Panel:
    target = prometheus.Dataquery().datasource(DS).expr(query.expr).legend_format(query.legend).ref_id("A").instant()
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DS)
        .grid_pos(GridPos(*pos))
        .thresholds(th)
        .with_target(target)
    )


def build() -> dashboard.Dashboard:
    green, yellow, red = "green", "yellow", "red"
    panels = [
        single(
            "Health band (median windowed perplexity)",
            "none",
            q(f"histogram_quantile(0.5, sum by (le) (rate(fse_window_perplexity_bucket[{RATE}])))", "windowed PPL"),
            (4, 6, 0, 0),
            steps((None, green), (200, yellow), (400, red)),
            "Seed 001's bands: healthy below 200, drifting 200-400, halt above 400.",
        ),
        single("Live sessions", "short", q("sum(fse_live_sessions)", "live"), (4, 6, 6, 0), steps((None, green))),
        single(
            "Halt ratio",
            "percentunit",
            q(ratio("abort"), "abort"),
            (4, 6, 12, 0),
            steps((None, green), (0.01, yellow), (0.05, red)),
        ),
        single(
            "Heal ratio",
            "percentunit",
            q(ratio("healed"), "healed"),
            (4, 6, 18, 0),
            steps((None, green), (0.05, yellow), (0.2, red)),
        ),
        series(
            "Sessions by health band",
            "short",
            [q("sum by (band) (fse_sessions_by_health_band)", "{{band}}")],
            (8, 8, 0, 4),
            "Open sessions by the running-perplexity band of their last verdict.",
        ),
        series(
            "Verdicts per second by decision",
            "ops",
            [q(f"sum by (decision) (rate(fse_verdicts_total[{RATE}]))", "{{decision}}")],
            (8, 8, 8, 4),
        ),
        series("Heal and halt ratios", "percentunit", [q(ratio("healed"), "healed"), q(ratio("abort"), "halted")], (8, 8, 16, 4)),
        series("Entropy of the next-token distribution", "suffix: nats", quantiles("fse_token_entropy_nats"), (8, 8, 0, 12)),
        series("-log p of the committed token", "suffix: nats", quantiles("fse_token_neg_logprob_nats"), (8, 8, 8, 12)),
        series(
            "Margin: p(committed) - max p(other)", "percentunit", quantiles("fse_token_margin", (0.1, 0.5, 0.9)), (8, 8, 16, 12)
        ),
        series(
            "Policy hits by rule",
            "ops",
            [q(f"sum by (rule, action) (rate(fse_policy_hits_total[{RATE}]))", "{{rule}} ({{action}})")],
            (8, 8, 0, 20),
        ),
        series(
            "Guard trips by guard",
            "ops",
            [q(f"sum by (guard) (rate(fse_guard_trips_total[{RATE}]))", "{{guard}}")],
            (8, 8, 8, 20),
        ),
        series(
            "Gate band transitions",
            "short",
            [q(f"sum by (from_band, to_band) (increase(fse_gate_transitions_total[{RATE}]))", "{{from_band}} → {{to_band}}")],
            (8, 8, 16, 20),
        ),
        series("Verdict latency", "s", quantiles("fse_verdict_latency_seconds", (0.5, 0.99)), (8, 8, 0, 28)),
        series(
            "Sessions opened and ended",
            "ops",
            [
                q(f"sum(rate(fse_sessions_opened_total[{RATE}]))", "opened"),
                q(f"sum by (outcome) (rate(fse_sessions_closed_total[{RATE}]))", "ended: {{outcome}}"),
            ],
            (8, 8, 8, 28),
        ),
        series(
            "Steps refused by status code",
            "ops",
            [q(f"sum by (code) (rate(fse_steps_refused_total[{RATE}]))", "{{code}}")],
            (8, 8, 16, 28),
        ),
    ]
    d = (
        dashboard.Dashboard("Cognitive ECG")
        .uid("fse-cognitive-ecg")
        .description(
            "libfse: how confused the models are, how often the guard heals or halts, which rules fire, what the guard costs"
        )
        .tags(["libfse", "llm", "guard"])
        .refresh("10s")
        .time("now-30m", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for v in scope_variables():
        d = d.with_variable(v)
    for p in panels:
        d = d.with_panel(p)
    return d


def render() -> str:
    model = json.loads(JSONEncoder().encode(build().build()))
    for panel in model["panels"]:  # the SDK writes "options": null for a panel with none set
        if panel.get("options") is None:
            panel.pop("options", None)
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    return write_or_check(OUT, render(), "python grafana/dashboard.py")


if __name__ == "__main__":
    raise SystemExit(main())
