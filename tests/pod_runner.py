"""Run a rendered pod's containers the way the kubelet would, without a container engine.

Started by tests/test_pod_run.py as ``unshare --mount --net --fork python pod_runner.py
PLAN.json`` (root, private mount and network namespaces). For each container it builds the
root filesystem its image recipe creates (the COPY lines; the build stage's /opt/venv is
this checkout's venv, the base image is this machine's /usr), mounts the pod's volumes at
the manifest's mountPaths (one tmpfs for a Memory emptyDir, shared by both containers),
makes the root read-only, and runs the image's exact ENTRYPOINT (with the manifest's args)
as the pod's numeric user. Native sidecar order: the sidecar starts and its startup probe
(gRPC health on TCP, as the kubelet dials it) passes before the engine starts; on stop the
engine gets SIGTERM first, the sidecar after it. Prints one JSON report on stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# What a slim Python base image brings that the chroot takes from this machine (read-only).
HOST_DIRS = ["/usr", "/proc", "/dev"]
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
HOST_ETC = ["ld.so.cache", "passwd", "group", "hosts", "nsswitch.conf", "localtime"]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def build_root(plan: dict[str, Any], c: dict[str, Any], work: Path, volumes: dict[str, Path]) -> Path:
    root = work / c["name"] / "root"
    root.mkdir(parents=True)
    sh("mount", "--bind", str(root), str(root))
    for link in ("bin", "sbin", "lib", "lib64"):
        if Path("/" + link).is_symlink():
            (root / link).symlink_to(os.readlink("/" + link))
    (root / "etc").mkdir()
    for name in HOST_ETC:
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), root / "etc" / name, follow_symlinks=True)
    # the image's own files (COPY from the build context)
    for src, dest in c["image_copies"]:
        target = root / dest.lstrip("/")
        source = Path(plan["repo"]) / src
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # mount points, then mounts: the host's base system, the build stage's venv, the volumes
    binds: list[tuple[Path, str, bool]] = [(Path(d), d, True) for d in HOST_DIRS]
    binds += [(Path(p), p, True) for p in plan["host_paths"]]  # the interpreter, the checkout
    binds.append((Path(plan["venv"]), "/opt/venv", True))
    for m in c["mounts"]:
        binds.append((volumes[m["name"]], m["mountPath"], bool(m.get("readOnly"))))
    binds.sort(key=lambda b: b[1].count("/"))  # parents before children
    for source, dest, read_only in binds:
        target = root / dest.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        sh("mount", "--rbind" if dest in ("/dev", "/proc") else "--bind", str(source), str(target))
        if read_only and dest not in ("/dev", "/proc"):
            sh("mount", "-o", "remount,ro,bind", str(target))
    sh("mount", "-o", "remount,ro,bind", str(root))  # readOnlyRootFilesystem
    return root


def start(c: dict[str, Any], root: Path, uid: int, gid: int, log: Path) -> subprocess.Popen[bytes]:
    env = {"PATH": "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin", **c["image_env"], **c["env"]}
    cmd = [CHROOT, f"--userspec={uid}:{gid}", f"--groups={gid}", str(root), *c["command"]]
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd="/")


def grpc_health(port: int, service: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def http(method: str, port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def _owners(d: Path) -> dict[str, list[Any]]:
    return {str(p.relative_to(d)): [p.stat().st_uid, p.stat().st_gid, oct(p.stat().st_mode & 0o7777)] for p in d.rglob("*")}


def until(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[bytes]]) -> float:
    t0 = time.monotonic()
    while not check():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a container exited while waiting for {what}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    work = Path(plan["work"])
    sh("ip", "link", "set", "lo", "up")
    volumes: dict[str, Path] = {}
    for name, v in plan["volumes"].items():
        d = work / "volumes" / name
        d.mkdir(parents=True)
        if v["kind"] == "tmpfs":
            sh("mount", "-t", "tmpfs", "-o", f"size={v['size']},mode=1777", "tmpfs", str(d))
        for fname, text in v.get("files", {}).items():
            (d / fname).write_text(text)
            os.chown(d / fname, 0, plan["gid"])
            os.chmod(d / fname, v.get("mode", 0o444))
        if v["kind"] != "files":  # writable emptyDir: the fsGroup owns it
            os.chown(d, 0, plan["gid"])
            os.chmod(d, 0o2777 if v["kind"] == "tmpfs" else 0o2775)
        volumes[name] = d
    report: dict[str, Any] = {"containers": {}}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        side, engine = plan["containers"]
        root = build_root(plan, side, work, volumes)
        procs[side["name"]] = start(side, root, plan["uid"], plan["gid"], work / f"{side['name']}.log")
        probe = side["startupProbe"]["grpc"]
        report["sidecar_started_s"] = until(
            "the sidecar's startup probe",
            lambda: grpc_health(probe["port"], probe["service"]) == "SERVING",
            60,
            list(procs.values()),
        )
        root = build_root(plan, engine, work, volumes)
        procs[engine["name"]] = start(engine, root, plan["uid"], plan["gid"], work / f"{engine['name']}.log")
        ready = engine["readinessProbe"]["httpGet"]
        report["engine_ready_s"] = until(
            "the engine's readiness probe",
            lambda: http("GET", plan["engine_port"], ready["path"])[0] == 200,
            120,
            list(procs.values()),
        )
        report["completion"] = http("POST", plan["engine_port"], "/v1/completions", plan["request"])
        report["metrics"] = http("GET", plan["metrics_port"], "/metrics")
        # what the containers wrote, and as whom: [uid, gid, mode]
        report["writes"] = {name: _owners(volumes[name]) for name in plan["report_volumes"]}
        # stopping: the engine first, then the native sidecar (the kubelet's order)
        for name in (engine["name"], side["name"]):
            p = procs[name]
            p.send_signal(signal.SIGTERM)
            try:
                report["containers"][name] = {"exit": p.wait(30)}
            except subprocess.TimeoutExpired:
                p.kill()
                report["containers"][name] = {"exit": "killed after 30 s"}
    except Exception as exc:  # noqa: BLE001 - reported with the logs
        report["error"] = str(exc)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for name in procs:
            report["containers"].setdefault(name, {})["log"] = (work / f"{name}.log").read_text(errors="replace")[-4000:]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
