"""The compiled fast path (sidecar/accel.py): built from the sources, used only while current.

The overlay is built once here into a copy of the package (a real mypyc and gcc build), so
these tests hold whatever state the working tree's own overlay is in. The rest of the suite
runs on whichever core the working tree has (its header line says which); ``make test`` runs
it compiled and then runs the pure core's tests again with ``FSE_PURE_PYTHON=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import accel

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys, warnings
warnings.simplefilter("always")
import sidecar
from sidecar import accel
import sidecar.service, sidecar.core.batch_draw, sidecar.core.canonical, sidecar.core.chain, sidecar.core.compact
import sidecar.core.evaluators, sidecar.core.evidence, sidecar.core.gate, sidecar.core.guards, sidecar.core.loops
import sidecar.core.metrics, sidecar.core.redo, sidecar.core.sampling, sidecar.core.session, sidecar.signing
s = accel.status()
print(json.dumps({"compiled": s.compiled, "reason": s.reason,
                  "files": {m: sys.modules[m].__file__ for m in accel.COMPILED_MODULES}}))
"""


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "_accel", ".accel-*", "node_modules")
    for part in ("sidecar", "scripts", "proto"):
        shutil.copytree(ROOT / part, dest / part, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _run(tree: Path, *args: str, pure: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != accel.ENV_PURE}
    env["PYTHONPATH"] = str(tree)  # the copy wins over the editable install
    if pure:
        env[accel.ENV_PURE] = "1"
    return subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=600)


def _probe(tree: Path, *, pure: bool = False) -> tuple[dict[str, object], str]:
    r = _run(tree, "-c", PROBE, pure=pure)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package with its overlay built by the real command."""
    tree = tmp_path_factory.mktemp("accel") / "tree"
    _copy_tree(tree)
    r = _run(tree, "-m", "sidecar", "accel", "build")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiled 16 modules" in r.stdout
    # it says what it is doing as it goes: the build takes minutes
    phases = [line for line in r.stdout.splitlines() if line.startswith("accel build: ")]
    assert phases[0] == "accel build: type-checking 16 modules and translating them to C (mypyc)"
    assert "compiling the C with 2 job(s)" in phases[1] and "checking and installing the overlay" in phases[-1]
    return tree


@pytest.fixture
def tree(built: Path, tmp_path: Path) -> Iterator[Path]:
    """A disposable copy of the built tree (its overlay included) for a test that spoils it."""
    copy = tmp_path / "tree"
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("__pycache__"))
    yield copy


@pytest.mark.slow
def test_a_current_overlay_loads_every_listed_module_compiled(built: Path) -> None:
    state, err = _probe(built)
    assert state["compiled"] is True, state
    files = state["files"]
    assert isinstance(files, dict) and sorted(files) == sorted(accel.COMPILED_MODULES)
    for module, file in files.items():
        assert Path(file).is_relative_to(built / "sidecar" / "_accel"), (module, file)
        assert Path(file).suffix == ".so", (module, file)
    assert "AccelStaleWarning" not in err


@pytest.mark.slow
def test_compiled_and_pure_write_the_committed_conformance_vectors(built: Path) -> None:
    # every verdict, seal, chain frame and ring frame of proto/fse/v1/vectors.json, byte for byte
    for pure in (False, True):
        r = _run(built, "scripts/gen_vectors.py", "--check", pure=pure)
        assert r.returncode == 0, ("pure" if pure else "compiled", r.stdout + r.stderr)
    state, _ = _probe(built)
    assert state["compiled"] is True  # the check above ran the overlay, not a fallback


@pytest.mark.slow
def test_an_edited_source_makes_everything_run_pure_with_a_warning(tree: Path) -> None:
    gate = tree / "sidecar" / "core" / "gate.py"
    original = gate.read_text()
    gate.write_text(original + "\n# edited after the build\n")
    state, err = _probe(tree)
    assert state["compiled"] is False
    assert "sidecar.core.gate changed since it was compiled" in str(state["reason"])
    assert "AccelStaleWarning" in err and "pure Python runs" in err
    files = state["files"]
    assert isinstance(files, dict)
    assert all(str(f).endswith(".py") for f in files.values()), files  # none of them compiled, not only gate
    gate.write_text(original)  # the same bytes again: current again
    state, _ = _probe(tree)
    assert state["compiled"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda t: (t / "sidecar/_accel/manifest.json").write_text("{not json"), "unreadable manifest"),
        (lambda t: _edit_manifest(t, interpreter="cpython-99.so"), "built for cpython-99.so"),
        (lambda t: _edit_manifest(t, version=0), "manifest version 0"),
        (lambda t: _edit_manifest(t, drop="sidecar.service"), "another module list"),
        (lambda t: accel.extension_path("sidecar.core.redo", t / "sidecar/_accel").unlink(), "of sidecar.core.redo is missing"),
        (lambda t: accel.extension_path(accel.RUNTIME_MODULE, t / "sidecar/_accel").unlink(), "is missing"),
    ],
    ids=["garbled-manifest", "other-interpreter", "other-version", "other-module-list", "missing-module", "missing-runtime"],
)
def test_a_spoiled_overlay_is_refused_whole_with_a_warning(tree: Path, spoil, reason: str) -> None:  # type: ignore[no-untyped-def]
    spoil(tree)
    state, err = _probe(tree)
    assert state["compiled"] is False
    assert reason in str(state["reason"]), state
    assert "AccelStaleWarning" in err


def _edit_manifest(tree: Path, *, drop: str = "", **fields: object) -> None:
    path = tree / "sidecar" / "_accel" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    manifest["sources"].pop(drop, None)
    path.write_text(json.dumps(manifest))


@pytest.mark.slow
def test_the_opt_out_runs_pure_without_a_warning(built: Path) -> None:
    state, err = _probe(built, pure=True)
    assert state["compiled"] is False
    assert state["reason"] == f"{accel.ENV_PURE} is set"
    assert "AccelStaleWarning" not in err


@pytest.mark.slow
def test_build_again_is_a_no_op_when_current_and_status_says_which_core_runs(tree: Path) -> None:
    manifest = tree / "sidecar" / "_accel" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    r = _run(tree, "-m", "sidecar", "accel", "build")
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    assert manifest.stat().st_mtime_ns == before
    r = _run(tree, "-m", "sidecar", "accel", "status", "--require")
    assert r.returncode == 0 and r.stdout.startswith("compiled (mypyc, 16 modules)"), r.stdout
    r = _run(tree, "-m", "sidecar", "accel", "status", "--require", pure=True)
    assert r.returncode == 1 and "pure Python (FSE_PURE_PYTHON is set)" in r.stdout, r.stdout


def test_without_an_overlay_pure_python_runs_and_says_how_to_build_it(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "sidecar", tree / "sidecar", ignore=shutil.ignore_patterns("__pycache__", "_accel", ".accel-*"))
    state, err = _probe(tree)
    assert state["compiled"] is False
    assert "not built" in str(state["reason"]) and "make accel" in str(state["reason"])
    assert "AccelStaleWarning" not in err  # nothing stale: simply not built


def test_a_build_without_a_usable_jobs_count_is_refused_before_any_work() -> None:
    from sidecar.errors import AccelBuildError

    with pytest.raises(AccelBuildError, match="jobs must be at least 1"):
        accel.build(jobs=0)
