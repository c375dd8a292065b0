"""Committed generated files (the conformance vectors, the Grafana dashboard): write one,
or with ``--check`` say whether the committed copy is what its code generates now."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def write_or_check(out: Path, text: str, command: str, argv: Sequence[str] | None = None) -> int:
    """Exit status for a generator's ``main``: 1 with ``--check`` when ``out`` is stale."""
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run {command}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0
