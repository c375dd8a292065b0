"""Shared fixtures: key pairs, a real sidecar process on a Unix socket, the real model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sidecar.signing import generate_keypair

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Keys:
    private: Path
    public: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    priv, pub = generate_keypair(tmp_path_factory.mktemp("keys"))
    return Keys(priv, pub)


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    priv, pub = generate_keypair(tmp_path_factory.mktemp("other-keys"))
    return Keys(priv, pub)


class SidecarProcess:
    """``python -m sidecar serve`` in its own process, as deployed."""

    def __init__(self, workdir: Path, keys: Keys, policies: dict | None = None) -> None:
        self.socket = workdir / "fse.sock"
        self.config = workdir / "fse.yaml"
        cfg: dict = {"listen": f"unix://{self.socket}", "signing_key_file": str(keys.private)}
        if policies:
            cfg["policies"] = policies
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "sidecar.log"
        self._log = self.log.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        self.target = f"unix:{self.socket}"
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar did not start:\n{self.log.read_text()}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def start_sidecar(tmp_path: Path, keys: Keys) -> Iterator:
    started: list[SidecarProcess] = []

    def start(policies: dict | None = None, signing: Keys | None = None) -> SidecarProcess:
        d = tmp_path / f"sidecar{len(started)}"
        d.mkdir()
        sc = SidecarProcess(d, signing or keys, policies)
        started.append(sc)
        return sc

    yield start
    for sc in started:
        sc.stop()


@pytest.fixture(scope="session")
def llama():
    """The embedded SmolLM2-135M through llama-cpp-python (installed by `make test`)."""
    from engine_adapters.llama_cpp import load_llama

    return load_llama(n_threads=2)


CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
