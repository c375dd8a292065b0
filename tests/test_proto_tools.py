"""The proto passes buf lint (STANDARD) and buf breaking (FILE) against the v1 baseline.

buf comes from proto/package.json (``make setup-node`` runs ``npm ci`` there). The
baseline, proto/fse-v1-baseline.json, is the v1 API as released (``buf build
--exclude-source-info -o fse-v1-baseline.json``); replace it only with a new major version.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROTO = Path(__file__).resolve().parents[1] / "proto"
BUF = PROTO / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def buf() -> Path:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: run `make setup-node` (npm install in proto/)")
    return BUF


def run(buf: Path, *args: str, cwd: Path = PROTO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_proto_passes_buf_lint_standard(buf: Path) -> None:
    r = run(buf, "lint")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_proto_has_no_breaking_change_against_the_v1_baseline(buf: Path) -> None:
    r = run(buf, "breaking", "--against", "fse-v1-baseline.json")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "change",
    [
        ("  bool fast_lane = 8;\n", ""),  # a field removed
        ("  uint64 step = 2;\n  Decision decision = 3;", "  uint64 step = 2;\n  int32 decision = 3;"),  # a type changed
        ("  rpc Step(StepRequest) returns (StepResponse);\n", ""),  # an RPC removed
    ],
    ids=["removed-field", "changed-type", "removed-rpc"],
)
def test_buf_breaking_catches_a_breaking_change(buf: Path, tmp_path: Path, change: tuple[str, str]) -> None:
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy, ignore=shutil.ignore_patterns("node_modules"))
    proto = copy / "fse" / "v1" / "guard.proto"
    text = proto.read_text()
    assert change[0] in text
    proto.write_text(text.replace(change[0], change[1], 1))
    r = run(buf, "breaking", "--against", str(PROTO / "fse-v1-baseline.json"), cwd=copy)
    assert r.returncode != 0 and "guard.proto" in r.stdout, r.stdout + r.stderr
