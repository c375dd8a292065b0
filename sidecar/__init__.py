"""libfse: the fail-closed inference guard sidecar."""

from . import accel as _accel

# before any compiled module can be imported: the compiled fast path, when built and current
_accel.install()

from ._version import __version__  # noqa: E402 - after the overlay is in place

__all__ = ["__version__"]
