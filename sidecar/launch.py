"""Start a sidecar in its own process with a throwaway key pair (demo and bench)."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._pb.fse.v1 import guard_pb2 as pb
from .errors import GuardUnavailable
from .signing import generate_keypair

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GuardService"].full_name


class SidecarExited(GuardUnavailable):
    """A sidecar started here stopped (or never served) before it said SERVING."""


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines()[-lines:]) or "  (empty)"


def free_port() -> int:
    """A TCP port free on the loopback now (for a server started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalSidecar:
    proc: subprocess.Popen[bytes]
    target: str
    public_key: Path
    log: Path
    config: Path  # the YAML it was started with (rewrite it, then SIGHUP or ReloadPolicy)

    @property
    def socket(self) -> Path:
        return Path(self.target[len("unix:") :])

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until the sidecar's health service says SERVING; raises with its log if it exits
        first. Not merely until the socket exists: gRPC accepts connections from the bind
        on, before the socket's group and mode are applied and before the service starts."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while True:
                if self.socket.exists():
                    try:
                        status = check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0).status
                    except grpc.RpcError:
                        status = None
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                code = self.proc.poll()
                if code is not None:
                    raise SidecarExited(
                        f"the sidecar exited with status {code} before it served ({self.config}); its log:\n"
                        + _tail(self.log_text())
                    )
                if time.monotonic() > deadline:
                    raise SidecarExited(f"the sidecar did not start within {timeout:g} s; its log:\n" + _tail(self.log_text()))
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_local_sidecar(
    workdir: Path,
    config: dict[str, Any] | None = None,
    keys: tuple[Path, Path] | None = None,
    rlimits: Mapping[int, tuple[int, int]] | None = None,
) -> LocalSidecar:
    """``python -m sidecar serve`` on a Unix socket in ``workdir``; ``config`` extends the
    generated one (its ``listen`` and ``signing_key_file`` are replaced). ``keys`` is a
    (private, public) pair; a fresh one is made when it is None. ``rlimits`` (a
    ``resource.RLIMIT_*`` -> (soft, hard) map; tests give it a disk that fills up) are set on
    the child from here as soon as it exists, before it can open a session: no Python runs
    between fork and exec (a ``preexec_fn`` there can meet gRPC's fork handlers restarting
    their poller on a closed epoll descriptor, which aborts the child)."""
    priv, pub = keys if keys is not None else generate_keypair(workdir / "keys")
    sock = workdir / "fse.sock"
    cfg = {**(config or {}), "listen": f"unix://{sock}", "signing_key_file": str(priv)}
    cfg_path = workdir / "sidecar.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = workdir / "sidecar.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    for limit, values in (rlimits or {}).items():
        resource.prlimit(proc.pid, limit, values)
    return LocalSidecar(proc, f"unix:{sock}", pub, log, cfg_path)
