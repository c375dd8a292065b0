"""The Node.js reference client (clients/node), written from proto/ alone, in CI:
its own conformance-vector tests, and a guarded session against the real sidecar."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.signing import generate_hmac_key

from .conftest import Keys

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None or not (CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("Node.js 18+ and clients/node/node_modules are needed: run `make setup-node`")
    return exe


def test_the_node_client_passes_the_conformance_vectors(node: str) -> None:
    r = subprocess.run([node, "--test", "test/"], cwd=CLIENT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "# fail 0" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def run_example(node: str, target: str, key: str, steps: int) -> subprocess.CompletedProcess[str]:
    cmd = [node, "example.js", "--target", target, "--key", key, "--steps", str(steps)]
    return subprocess.run(cmd, cwd=CLIENT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac-sha256"])
def test_the_node_client_runs_a_guarded_session_against_the_real_sidecar(node: str, start_sidecar, tmp_path, algorithm) -> None:
    if algorithm == "hmac-sha256":
        secret = generate_hmac_key(tmp_path / "hmac")
        sc = start_sidecar(signing=Keys(secret, secret))
    else:
        sc = start_sidecar()
    r = run_example(node, sc.target, str(sc.public_key), 12)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    # Greedy over rows peaked at (7 * step + 3) mod 64: every verdict verified and forced.
    assert out["steps"] == 12 and out["tokens"] == [(7 * s + 3) % 64 for s in range(12)]
    assert out["forged"] == "signature" and out["receipt"] == "verified"


def test_the_node_client_fails_closed_when_the_sidecar_signs_with_another_key(node: str, start_sidecar, other_keys) -> None:
    sc = start_sidecar()
    r = run_example(node, sc.target, str(other_keys.public), 3)
    assert r.returncode == 1 and r.stdout == "" and "not a trusted one" in r.stderr
