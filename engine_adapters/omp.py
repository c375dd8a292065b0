"""How llama.cpp's OpenMP workers wait between the parallel regions of a forward pass.

libgomp reads its wait settings once, when it loads (with ``llama_cpp``): set them before.
``default`` is libgomp's own (spin about 300,000 iterations, then sleep), ``bounded`` a
short spin (``GOMP_SPINCOUNT=1000``) then sleep, ``passive`` sleep at once, ``active`` spin
on. On a busy node spinning workers take the CPU the other workers, the sidecar and the
neighbours need; sleeping at once costs a wake-up per region on a quiet one (README
"Troubleshooting: a busy node"; ``fse-sidecar bench contention`` measures all of them).
"""

from __future__ import annotations

import os
import sys

from sidecar.errors import ConfigError

POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "bounded": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
DEFAULT = "bounded"
_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
LIBGOMP_OWN = "libgomp's own"


def apply_wait_policy(name: str, environ: dict[str, str] | None = None) -> str:
    """Set ``name``'s variables for libgomp unless the operator set either already (theirs
    win); returns what applies, for the start-up log. ConfigError once llama_cpp is loaded."""
    env = os.environ if environ is None else environ
    if name not in POLICIES:
        raise ConfigError(f"the OpenMP wait policy must be one of {sorted(POLICIES)}, got {name!r}")
    given = {k: env[k] for k in _KEYS if k in env}
    if given:
        return "operator's " + " ".join(f"{k}={v}" for k, v in given.items())
    if "llama_cpp" in sys.modules and environ is None:
        raise ConfigError("the OpenMP wait policy must be set before llama_cpp is imported (libgomp reads it once)")
    env.update(POLICIES[name])
    settings = " ".join(f"{k}={v}" for k, v in POLICIES[name].items()) or LIBGOMP_OWN
    return f"{name} ({settings})"
