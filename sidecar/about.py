"""What this installation is, in one line: ``--version`` of every command."""

from __future__ import annotations

import argparse
import platform

from . import accel
from ._version import __version__

PROTOCOL = "fse.v1"  # the proto package every engine speaks (proto/fse/v1)


def version_line(prog: str) -> str:
    """``prog 0.2.0 (protocol fse.v1; core: compiled (mypyc, 16 modules); Python 3.11.7)``:
    what a bug report needs, including whether the compiled fast path runs."""
    return f"{prog} {__version__} (protocol {PROTOCOL}; core: {accel.status().describe()}; Python {platform.python_version()})"


def add_version_flag(parser: argparse.ArgumentParser, prog: str) -> None:
    """``--version``: print :func:`version_line` on one line and exit (argparse's own action
    would wrap it to the terminal's width, and compute it even when not asked)."""

    class _Version(argparse.Action):
        def __call__(self, p: argparse.ArgumentParser, ns: argparse.Namespace, values: object, option: str | None = None) -> None:
            print(version_line(prog))
            p.exit()

    parser.add_argument("--version", nargs=0, action=_Version, help="print the version, the protocol and the core in use")
