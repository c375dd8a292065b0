"""Render the Cognitive ECG's panels from a real Prometheus, as one PNG (the README's picture).

    python grafana/render_ecg.py --prometheus http://127.0.0.1:9090 --start UNIX --end UNIX --out grafana/ecg.png

Each subplot is one dashboard panel: its PromQL (from grafana/cognitive-ecg.json, with
``$__rate_interval`` set to ``--rate-interval`` and the scope variables to ``--job`` and
the like, "All" by default) through Prometheus's ``query_range`` API.
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent / "cognitive-ecg.json"
PANELS = (
    "Verdicts per second by decision",
    "Heal and halt ratios",
    "-log p of the committed token",
    "Entropy of the next-token distribution",
    "Guard trips by guard",
    "Policy hits by rule",
    "Sessions by health band",
    "Verdict latency",
)


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{qs}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body}")
    return list(body["data"]["result"])


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


SCOPE = ("namespace", "job", "pod", "instance")


def scoped(expr: str, scope: dict[str, str]) -> str:
    """A panel's query with each scope variable as chosen (a regex; unset: All, ``.*``)."""
    for label in SCOPE:
        expr = expr.replace(f"${label}", scope.get(label, ".*"))
    return expr


def render(
    base: str,
    start: float,
    end: float,
    out: Path,
    rate_interval: str = "1m",
    step: float = 5.0,
    scope: dict[str, str] | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    fig, axes = plt.subplots(4, 2, figsize=(13, 11), sharex=True)
    fig.suptitle("libfse Cognitive ECG: SmolLM2-135M under guard (real sidecar, real Prometheus)", fontsize=13)
    for ax, title in zip(axes.flat, PANELS, strict=True):
        panel = panels[title]
        for t in panel["targets"]:
            expr = scoped(t["expr"].replace("$__rate_interval", rate_interval), scope or {})
            for s in query_range(base, expr, start, end, step):
                xs = [(float(ts) - start) / 60 for ts, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                if all(math.isnan(y) or y == 0 for y in ys):  # a series that never moved: no line
                    continue
                ax.plot(xs, ys, label=legend(t.get("legendFormat", ""), s["metric"]), linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(panel["fieldConfig"]["defaults"]["unit"].replace("suffix: ", ""), fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--out", type=Path, default=Path("grafana/ecg.png"))
    ap.add_argument("--rate-interval", default="1m")
    for label in SCOPE:
        ap.add_argument(f"--{label}", help=f"the dashboard's {label} variable, a regex (default: All)")
    a = ap.parse_args()
    scope = {label: getattr(a, label) for label in SCOPE if getattr(a, label)}
    print(render(a.prometheus, a.start, a.end, a.out, a.rate_interval, scope=scope))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
