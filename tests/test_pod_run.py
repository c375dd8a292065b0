"""The llama.cpp pod, run as the kubelet would run it, with no container engine: each image's
exact ENTRYPOINT and the manifest's args, the file layout its recipe creates, the pod's
volumes at their mountPaths, a read-only root, the pod's numeric user, one network
namespace (tests/pod_runner.py). A guarded completion goes through the engine's port and
the sidecar's metrics count it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.signing import generate_keypair
from tests.test_deploy import ROOT, container, dockerfile_final_stage, one, pod_spec, rendered

pytestmark = pytest.mark.slow

IMAGES = {"fse-sidecar": "sidecar.Dockerfile", "engine": "engine-llama-cpp.Dockerfile"}


def _plan(tmp_path: Path) -> dict[str, Any]:
    docs = rendered("llama-cpp")
    spec = pod_spec(docs)
    priv, pub = generate_keypair(tmp_path / "keys")
    volumes: dict[str, Any] = {}
    for v in spec["volumes"]:
        if "configMap" in v:
            name = v["configMap"]["name"]
            if name == "fse-public-key":  # made by the user: kubectl create configmap fse-public-key
                data = {"fse_signing.pub": pub.read_text()}
            else:
                data = one(docs, "ConfigMap", name)["data"]
            volumes[v["name"]] = {"kind": "files", "files": data, "mode": 0o444}
        elif "secret" in v:  # kubectl create secret generic fse-signing-key --from-file=fse_signing.key
            volumes[v["name"]] = {
                "kind": "files",
                "files": {"fse_signing.key": priv.read_text()},
                "mode": v["secret"]["defaultMode"],
            }
        elif v["emptyDir"].get("medium") == "Memory":
            volumes[v["name"]] = {"kind": "tmpfs", "size": v["emptyDir"]["sizeLimit"].replace("Mi", "m").replace("Gi", "g")}
        else:
            volumes[v["name"]] = {"kind": "dir"}
    containers = []
    for name, recipe in IMAGES.items():
        c = container(spec, name)
        stage = dockerfile_final_stage(recipe)
        command = c.get("command") or stage["ENTRYPOINT"]
        command = command + (c["args"] if "args" in c else stage.get("CMD", []))
        copies = [(src, dest) for *opts, src, dest in stage["COPY"] if not any(o.startswith("--from") for o in opts)]
        containers.append(
            {
                "name": name,
                "command": command,
                "env": {e["name"]: e["value"] for e in c.get("env", [])},
                "image_env": stage["ENV"],
                "image_copies": copies,
                "mounts": c["volumeMounts"],
                "startupProbe": c.get("startupProbe"),
                "readinessProbe": c.get("readinessProbe"),
            }
        )
    side = container(spec, "fse-sidecar")
    engine = container(spec, "engine")
    psc = spec["securityContext"]
    return {
        "work": str(tmp_path / "pod"),
        "repo": str(ROOT),
        "venv": sys.prefix,
        "host_paths": sorted({sys.base_prefix, str(ROOT), sys.prefix} - {"/usr", "/usr/local"}),
        "uid": psc["runAsUser"],
        "gid": psc["runAsGroup"],
        "volumes": volumes,
        "containers": containers,
        "engine_port": next(p["containerPort"] for p in engine["ports"] if p["name"] == "http"),
        "metrics_port": next(p["containerPort"] for p in side["ports"] if p["name"] == "metrics"),
        "request": {"prompt": "Why is the sky blue?", "max_tokens": 8, "seed": 5},
        "report_volumes": ["fse-run", "fse-audit", "shm"],
    }


def test_the_llama_cpp_pod_runs_its_images_exact_entrypoints_as_the_kubelet_would(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and util-linux's unshare (mount and network namespaces)")
    plan_file = tmp_path / "plan.json"
    plan = _plan(tmp_path)
    plan_file.write_text(json.dumps(plan))
    r = subprocess.run(
        ["unshare", "--mount", "--net", "--fork", sys.executable, str(ROOT / "tests" / "pod_runner.py"), str(plan_file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    logs = "\n".join(f"--- {n}\n{c.get('log', '')}" for n, c in report["containers"].items())
    assert "error" not in report, report.get("error", "") + "\n" + logs

    status, body = report["completion"]
    assert status == 200, body
    answer = json.loads(body)
    assert answer["choices"][0]["text"].strip() and answer["fse"]["receipt"]["steps"] == 8

    # the sidecar counted the verdicts (what the PodMonitor scrapes)
    status, metrics = report["metrics"]
    assert status == 200
    verdicts = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("fse_verdicts_total{"))
    assert verdicts >= 8, metrics[:2000]

    # what was written went to the pod's volumes: the sockets, the audit file, the ring
    writes = report["writes"]
    assert {"fse.sock", "fse.sock.lane"} <= set(writes["fse-run"])
    audits = [p for p in writes["fse-audit"] if p.endswith(".audit")]
    assert audits
    # as the pod's numeric user, owner-only (the socket's default mode, the audit file's)
    user = [plan["uid"], plan["gid"]]
    assert writes["fse-run"]["fse.sock"] == [*user, "0o600"]
    assert all(writes["fse-audit"][p][:2] == user for p in audits)
    # both containers stopped cleanly, the engine first
    assert {n: c.get("exit") for n, c in report["containers"].items()} == {"fse-sidecar": 0, "engine": 0}, logs
    assert "read-only file system" not in logs.lower() and "permission denied" not in logs.lower(), logs


def test_the_plan_mounts_what_the_manifest_mounts(tmp_path: Path) -> None:
    """The runner's inputs are the manifest's and the recipes' own, not a copy of them."""
    plan = _plan(tmp_path)
    side = plan["containers"][0]
    assert side["command"] == ["/opt/venv/bin/fse-sidecar", "serve", "--config", "/etc/fse/sidecar.yaml"]
    assert ("deploy/kustomize/base/sidecar.yaml", "/etc/fse/sidecar.yaml") in side["image_copies"]
    assert plan["containers"][1]["command"][0] == "/opt/venv/bin/fse-engine-llama"
    config = yaml.safe_load(plan["volumes"]["fse-config"]["files"]["sidecar.yaml"])
    assert config["signing_key_file"].startswith("/var/run/secrets/fse/")
