"""Start a sidecar in its own process with a throwaway key pair (demo and bench)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .signing import generate_keypair


@dataclass
class LocalSidecar:
    proc: subprocess.Popen[bytes]
    target: str
    public_key: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_local_sidecar(workdir: Path, config: dict[str, Any] | None = None) -> LocalSidecar:
    """``python -m sidecar serve`` on a Unix socket in ``workdir``; ``config`` extends the
    generated one (its ``listen`` and ``signing_key_file`` are replaced)."""
    priv, pub = generate_keypair(workdir / "keys")
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
    return LocalSidecar(proc, f"unix:{sock}", pub, log)
