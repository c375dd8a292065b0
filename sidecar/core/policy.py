"""A policy compiled for the step path: its guards, its matcher, its bounds, its digest.

Compiled once per configuration load (at start-up and on every reload, off the step
path) and shared by every session opened under it; a session keeps the policy it was
opened with until it closes, whatever is reloaded meanwhile.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import DriftConfig, GateConfig, GuardSet, LoopGuardConfig, Policy, RedoBounds
from .fse import Matcher, compile_rules


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    digest: str  # hex SHA-256 of the policy's canonical JSON (guards, rules, redo bounds)
    guards: GuardSet
    matcher: Matcher | None  # None when the policy has no rules
    redo: RedoBounds
    gate: GateConfig
    loop_guard: LoopGuardConfig
    drift: DriftConfig
    source_json: str = ""  # the canonical JSON the digest is over (a recording keeps it)


def policy_json(policy: Policy) -> str:
    """The policy as JSON with sorted keys, no spaces, defaults written out."""
    return json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def policy_digest(policy: Policy) -> str:
    """SHA-256 over :func:`policy_json`."""
    return hashlib.sha256(policy_json(policy).encode("utf-8")).hexdigest()


def compile_policy(name: str, policy: Policy) -> CompiledPolicy:
    """Raises ConfigError naming ``policies.NAME.rules[i] (id ...)`` and the field."""
    matcher = compile_rules(policy.rules, where=f"policies.{name}.rules")
    text = policy_json(policy)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return CompiledPolicy(name, digest, policy.guards, matcher, policy.redo, policy.gate, policy.loop_guard, policy.drift, text)


def compile_policies(policies: Mapping[str, Policy]) -> dict[str, CompiledPolicy]:
    return {name: compile_policy(name, p) for name, p in policies.items()}
