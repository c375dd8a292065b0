"""The platform wheel: the compiled core (mypyc, sidecar/accel.py) inside the wheel.

Off by default, so ``pip install .`` and editable installs stay pure Python and need no C
compiler. ``make wheel`` turns it on (``HATCH_BUILD_HOOK_ENABLE_CUSTOM=true``): the hook
compiles a copy of the package's sources into ``sidecar/_accel`` exactly as ``fse-sidecar
accel build`` does (its manifest holds the hashes of the sources the wheel carries) and the
wheel is tagged for this interpreter and platform. The pure modules stay in the wheel: on
another interpreter, or with a source edited after installation, or ``FSE_PURE_PYTHON=1``,
they run instead (accel.py's loader decides, at import).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class AccelWheelHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version != "standard":  # an editable install stays pure
            return
        root = Path(self.root)
        sys.path.insert(0, str(root))
        from sidecar import accel

        work = Path(tempfile.mkdtemp(prefix="fse-wheel-accel-"))
        self._work = work
        package = work / "sidecar"
        shutil.copytree(root / "sidecar", package, ignore=shutil.ignore_patterns("__pycache__", "_accel", ".accel-*"))
        built = accel.build(package_dir=package, progress=lambda m: self.app.display_info(f"accel build: {m}"))
        build_data["force_include"][str(built)] = "sidecar/_accel"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True  # cp311-cp311-linux_x86_64: the overlay loads on this interpreter only

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        work = getattr(self, "_work", None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
