"""Which policies an API request may name: the operator's decision, read once at start-up
(DESIGN §10: a request may choose among them, never opt out)."""

from __future__ import annotations

import os


def operator_policies(default: str | None = None, allowed: str | None = None) -> tuple[str, frozenset[str]]:
    """(the default policy, the policies a request may name): from the arguments, else the
    environment (``FSE_POLICY``, default "default"; ``FSE_POLICIES``, comma-separated)."""
    default = (default if default is not None else os.environ.get("FSE_POLICY", "")).strip() or "default"
    listed = allowed if allowed is not None else os.environ.get("FSE_POLICIES", "")
    names = {p.strip() for p in listed.split(",") if p.strip()}
    return default, frozenset(names | {default})
