"""The compiled fast path: the pure core and the service compiled with mypyc, used only when current.

What a verdict costs past the numpy passes is Python, row by row; mypyc compiles these fully
typed modules to C extensions with the same semantics. The extensions are an *overlay*: they live
in ``sidecar/_accel/`` beside a manifest of the sha256 of every source they were compiled from,
and a finder placed first on ``sys.meta_path`` loads them only when every one of those sources
is byte for byte what was compiled (and the interpreter is the one they were built for). An
edited source, a half-built overlay, another Python, or ``FSE_PURE_PYTHON=1`` means the pure
modules run, all of them (compiled modules call each other directly, so a mix is never made);
a stale overlay says so with an :class:`AccelStaleWarning`.

This module is imported by ``sidecar/__init__.py`` before any other, so it uses the standard
library and ``sidecar.errors`` (itself standard library only). ``build()`` (``fse-sidecar accel
build``, run by ``make setup``) needs mypy, which carries mypyc, setuptools and a C compiler;
loading needs none of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from .errors import AccelBuildError

#: The modules compiled: every pure-core module a verdict passes through, and the service and
#: signing shells around them. Not the gRPC server, the ring or the lane (I/O and numpy calls:
#: the ring compiled measured no faster), nor the policy loader (run once at start-up).
COMPILED_MODULES: tuple[str, ...] = (
    "sidecar.core.batch_draw",
    "sidecar.core.canonical",
    "sidecar.core.chain",
    "sidecar.core.compact",
    "sidecar.core.evaluators",
    "sidecar.core.evidence",
    "sidecar.core.gate",
    "sidecar.core.guards",
    "sidecar.core.loops",
    "sidecar.core.metrics",
    "sidecar.core.redo",
    "sidecar.core.sampling",
    "sidecar.core.session",
    "sidecar.core.values",
    "sidecar.signing",
    "sidecar.service",
)
#: mypyc's shared library of the group (each module's extension is a shim into it); a top-level
#: name because mypyc's multi-file output cannot find a dotted group's headers. Only the overlay's
#: finder knows where it is.
RUNTIME_MODULE = "fse_accel_rt__mypyc"
_GROUP = "fse_accel_rt"
ENV_PURE = "FSE_PURE_PYTHON"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
PACKAGE_DIR = Path(__file__).resolve().parent
ACCEL_DIR = PACKAGE_DIR / "_accel"


class AccelStaleWarning(UserWarning):
    """The compiled overlay exists but does not match the sources: pure Python runs."""


class AccelStatus(NamedTuple):
    compiled: bool
    modules: tuple[str, ...]
    reason: str  # why pure Python runs; "" when compiled

    def describe(self) -> str:
        if self.compiled:
            return f"compiled (mypyc, {len(self.modules)} modules)"
        return f"pure Python ({self.reason})"


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    parts = module.split(".")
    assert parts[0] == "sidecar", module
    return package_dir.joinpath(*parts[1:]).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_path(module: str, accel_dir: Path) -> Path:
    return accel_dir.joinpath(*module.split(".")).with_name(module.rsplit(".", 1)[-1] + _ext_suffix())


def _ext_suffix() -> str:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return suffix if isinstance(suffix, str) else importlib.machinery.EXTENSION_SUFFIXES[0]


def _interpreter() -> str:
    return f"{sys.implementation.cache_tag}{_ext_suffix()}"


def check_overlay(accel_dir: Path = ACCEL_DIR, package_dir: Path = PACKAGE_DIR) -> tuple[dict[str, Path] | None, str]:
    """The extension of every module (and the runtime) when the overlay is current, else why not.

    Returns ``(paths, "")`` or ``(None, reason)``; the reason starts with ``stale:`` when an
    overlay exists but must not be used (the caller warns), else it is a plain state.
    """
    manifest_path = accel_dir / MANIFEST_NAME
    try:
        if not accel_dir.exists():
            return None, "not built: make accel, or fse-sidecar accel build"
        manifest = json.loads(manifest_path.read_text())
        version = manifest["version"]
        interpreter = manifest["interpreter"]
        sources = manifest["sources"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"stale: unreadable manifest {manifest_path} ({exc})"
    if version != MANIFEST_VERSION:
        return None, f"stale: manifest version {version!r}, this code reads {MANIFEST_VERSION}"
    if interpreter != _interpreter():
        return None, f"stale: built for {interpreter}, this interpreter is {_interpreter()}"
    if not isinstance(sources, dict) or sorted(sources) != sorted(COMPILED_MODULES):
        return None, "stale: the overlay was built for another module list"
    paths: dict[str, Path] = {}
    for module in COMPILED_MODULES:
        try:
            digest = source_digest(source_path(module, package_dir))
        except OSError as exc:
            return None, f"stale: cannot read the source of {module} ({exc})"
        if digest != sources[module]:
            return None, f"stale: {module} changed since it was compiled: rebuild with make accel"
        paths[module] = extension_path(module, accel_dir)
    paths[RUNTIME_MODULE] = extension_path(RUNTIME_MODULE, accel_dir)
    for module, path in paths.items():
        if not os.access(path, os.R_OK):
            return None, f"stale: {path.name} of {module} is missing or unreadable"
    return paths, ""


class _OverlayFinder:
    """Loads exactly the listed modules from their compiled extensions; any other name passes.
    (A meta-path finder by protocol: importlib.abc would cost ~20 ms on every import of sidecar.)"""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        where = self.paths.get(fullname)
        if where is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(where))
        return importlib.util.spec_from_file_location(fullname, where, loader=loader)


_status = AccelStatus(False, (), "not installed")


def install() -> AccelStatus:
    """Put the overlay's finder first on the import path if it is current (once per process)."""
    global _status
    if any(isinstance(finder, _OverlayFinder) for finder in sys.meta_path):
        return _status
    if os.environ.get(ENV_PURE, "") not in ("", "0"):
        _status = AccelStatus(False, (), f"{ENV_PURE} is set")
        return _status
    loaded = [name for name in COMPILED_MODULES if name in sys.modules]
    if loaded:  # never mix: those already run as pure Python
        _status = AccelStatus(False, (), f"imported before the overlay: {', '.join(loaded)}")
        return _status
    try:
        paths, reason = check_overlay()
    except OSError as exc:  # the sidecar starts whatever state the overlay is in
        paths, reason = None, f"stale: cannot read the overlay ({exc})"
    if paths is None:
        why = reason.removeprefix("stale: ")
        if why != reason:
            warnings.warn(f"compiled fast path not used, pure Python runs: {why}", AccelStaleWarning, stacklevel=2)
        _status = AccelStatus(False, (), why)
        return _status
    sys.meta_path.insert(0, _OverlayFinder(paths))
    _status = AccelStatus(True, COMPILED_MODULES, "")
    return _status


def status() -> AccelStatus:
    """Whether this process runs the compiled modules; checked against what was actually loaded."""
    if _status.compiled:
        loaded = [sys.modules[m] for m in COMPILED_MODULES if m in sys.modules]
        assert all(str(getattr(m, "__file__", "")).endswith(_ext_suffix()) for m in loaded), "an overlay module loaded as source"
    return _status


def _quiet(_: str) -> None:
    pass


@contextlib.contextmanager
def _heartbeat(progress: Callable[[str], None], what: str, every_s: float = 30.0) -> Iterator[None]:
    """``progress`` hears "still <what> (N s)" every ``every_s`` while the block runs: a
    minutes-long step that prints nothing looks hung."""
    done = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            progress(f"still {what} ({time.monotonic() - t0:.0f} s)")

    thread = threading.Thread(target=beat, name="fse-accel-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def build(
    *, jobs: int = 2, quiet: bool = True, package_dir: Path = PACKAGE_DIR, progress: Callable[[str], None] = _quiet
) -> Path:
    """Compile :data:`COMPILED_MODULES` into ``<package>/_accel`` (replaced whole, never half-written).
    ``progress`` hears each phase as it starts and ends (the whole build takes minutes).

    Raises :class:`~sidecar.errors.AccelBuildError` naming what is missing when mypyc, setuptools or the C compiler
    is not there, or when a source changed while it was being compiled.
    """
    import shutil
    import tempfile

    try:
        from mypyc.build import mypycify
        from setuptools import Distribution
    except ImportError as exc:
        raise AccelBuildError(f"building the compiled fast path needs mypy (for mypyc) and setuptools: {exc}") from exc
    if jobs < 1:
        raise AccelBuildError(f"jobs must be at least 1, not {jobs}")
    accel_dir = package_dir / "_accel"
    sources = {module: source_path(module, package_dir) for module in COMPILED_MODULES}
    staging = Path(tempfile.mkdtemp(prefix=".accel-staging-", dir=package_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the overlay from another user running the package
    cwd = Path.cwd()
    try:
        with tempfile.TemporaryDirectory(prefix="fse-accel-") as work:
            # mypyc compiles a copy of the package: installed in site-packages, the sources would
            # make mypy take site-packages itself for the project (and its modules for ours)
            copy = Path(work) / "src" / "sidecar"
            shutil.copytree(package_dir, copy, ignore=shutil.ignore_patterns("__pycache__", "_accel", ".accel-*"))
            digests = {module: source_digest(source_path(module, copy)) for module in COMPILED_MODULES}
            os.chdir(work)  # mypycify writes its C sources under the working directory
            try:
                args = [str(source_path(module, copy)) for module in COMPILED_MODULES]
                args += ["--ignore-missing-imports", "--cache-dir", str(Path(work) / "mypy-cache")]
                progress(f"type-checking {len(COMPILED_MODULES)} modules and translating them to C (mypyc)")
                t0 = time.monotonic()
                with _heartbeat(progress, "translating"):
                    extensions = mypycify(args, opt_level="3", group_name=_GROUP, multi_file=jobs > 1, strip_asserts=False)
                progress(f"translated in {time.monotonic() - t0:.0f} s; compiling the C with {jobs} job(s) (the long part)")
                t0 = time.monotonic()
                dist = Distribution({"name": "fse-accel", "ext_modules": extensions})
                dist.verbose = 0 if quiet else 1
                command = dist.get_command_obj("build_ext")
                command.build_lib = str(staging)  # type: ignore[attr-defined]
                command.build_temp = str(Path(work) / "temp")  # type: ignore[attr-defined]
                command.parallel = jobs  # type: ignore[attr-defined]
                command.ensure_finalized()
                with _heartbeat(progress, "compiling"):
                    command.run()
                progress(f"compiled in {time.monotonic() - t0:.0f} s; checking and installing the overlay")
            except SystemExit as exc:  # mypycify exits on a type error, after printing it
                raise AccelBuildError(f"mypyc refused the sources (exit {exc.code}); see the errors above") from None
            except (OSError, ValueError) as exc:  # distutils' CompileError and LinkError are these
                raise AccelBuildError(f"the C compile failed: {exc}") from exc
            finally:
                os.chdir(cwd)
        for module, path in sources.items():
            if source_digest(path) != digests[module]:
                raise AccelBuildError(f"{path} changed while it was compiled: build again")
        manifest = {"version": MANIFEST_VERSION, "interpreter": _interpreter(), "sources": digests}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        paths, reason = check_overlay(staging, package_dir)
        if paths is None:
            raise AccelBuildError(f"the compiled overlay is incomplete: {reason}")
        old = package_dir / f".accel-old-{os.getpid()}"
        try:
            if accel_dir.exists():
                accel_dir.rename(old)
            staging.rename(accel_dir)
        except OSError as exc:  # another build swapped its overlay in at the same moment
            raise AccelBuildError(f"could not install the overlay at {accel_dir} ({exc}); build again") from exc
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return accel_dir
