"""Generate deploy/'s derived files; ``--check``: fail when a committed one is stale.

- deploy/kustomize/base/prometheusrule.yaml: deploy/prometheus/fse-alerts.yml as a
  Prometheus Operator PrometheusRule (the same rule groups, checked by promtool in CI);
- deploy/kustomize/base/cognitive-ecg.json: grafana/cognitive-ecg.json, for the dashboard
  ConfigMap (kustomize loads files only from inside the kustomization);
- deploy/rendered/<overlay>.yaml: ``kubectl kustomize`` of each overlay, for users without
  kustomize and for the offline schema checks. Needs kubectl (its built-in kustomize).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.generated import write_or_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kustomize" / "base"
OVERLAYS = sorted(p.name for p in (DEPLOY / "kustomize" / "overlays").iterdir() if p.is_dir())
COMMAND = "python scripts/gen_deploy.py"


def prometheus_rule() -> str:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "fse-alerts.yml").read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "fse-sidecar"},
        "spec": groups,
    }
    head = "# Generated from deploy/prometheus/fse-alerts.yml by scripts/gen_deploy.py: edit that file.\n"
    return head + yaml.safe_dump(doc, sort_keys=False, width=120)


def render(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit("kubectl is needed to render the overlays (its built-in kustomize)")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kustomize" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return f"# Rendered from deploy/kustomize/overlays/{overlay} by scripts/gen_deploy.py: edit those files.\n" + out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rc = write_or_check(BASE / "prometheusrule.yaml", prometheus_rule(), COMMAND, args)
    rc |= write_or_check(BASE / "cognitive-ecg.json", (ROOT / "grafana" / "cognitive-ecg.json").read_text(), COMMAND, args)
    if "--no-render" not in args:
        (DEPLOY / "rendered").mkdir(exist_ok=True)
        for overlay in OVERLAYS:
            rc |= write_or_check(DEPLOY / "rendered" / f"{overlay}.yaml", render(overlay), COMMAND, args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
