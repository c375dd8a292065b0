"""Policy files on a real sidecar process: refused at start, reloaded by RPC and SIGHUP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine_adapters.client import GuardClient, GuardedSession
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams
from sidecar.errors import StepRefused
from sidecar.launch import LocalSidecar

V = 1000
WORDS = {1: b" bad", 2: b"word", 3: b" fine"}
VOCAB = [WORDS.get(i, f"<{i}>".encode()) for i in range(V)]


def row(*best: int) -> np.ndarray:
    """Logits whose greedy order starts with ``best``."""
    x = np.full(V, -5.0, np.float32)
    for rank, i in enumerate(best):
        x[i] = 10.0 - rank
    return x


def policies(action: str) -> dict:
    return {"default": {"rules": [{"id": "no-badword", "kind": "literal", "patterns": ["badword"], "action": action}]}}


def rewrite(sc: LocalSidecar, new_policies: object) -> None:
    cfg = yaml.safe_load(sc.config.read_text())
    cfg["policies"] = new_policies
    sc.config.write_text(yaml.safe_dump(cfg))


def bad_then_word(s: GuardedSession) -> pb.Verdict:
    s.step(row(1))  # " bad"
    return s.step(row(2, 3))  # "word" first, " fine" second


@pytest.fixture
def flagging(start_sidecar, keys):
    sc = start_sidecar(policies=policies("flag"))
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    yield sc, c, c.register_vocabulary(VOCAB)
    c.close()


def test_reload_rpc_gives_new_sessions_the_new_policy_and_open_ones_keep_theirs(flagging) -> None:
    sc, c, digest = flagging
    old = c.open_session(digest, SamplingParams())
    rewrite(sc, policies("block"))
    digests = c.reload_policy()
    assert set(digests) == {"default"} and digests["default"] != old.policy_digest
    new = c.open_session(digest, SamplingParams())
    assert new.policy_digest == digests["default"]

    v_old, v_new = bad_then_word(old), bad_then_word(new)
    assert (v_old.decision, v_old.token_id, v_old.policy_digest) == (pb.DECISION_ACCEPT, 2, old.policy_digest)
    assert (v_new.decision, v_new.token_id, v_new.policy_digest) == (pb.DECISION_HEALED, 3, new.policy_digest)
    [hit] = v_new.reasons
    assert (hit.code, hit.action, hit.token_id, hit.span_start, hit.span_end) == ("no-badword", pb.ACTION_BLOCK, 2, 1, 8)
    # the old session's flag is confirmed once more text follows, and only then
    v_flag = old.step(row(3))
    assert [(r.code, r.action, r.span_start, r.span_end) for r in v_flag.reasons] == [("no-badword", pb.ACTION_FLAG, 1, 8)]


def test_sighup_reloads_the_file(flagging) -> None:
    sc, c, digest = flagging
    before = c.open_session(digest, SamplingParams()).policy_digest
    rewrite(sc, policies("halt"))
    sc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while (s := c.open_session(digest, SamplingParams())).policy_digest == before:
        s.close()
        assert time.monotonic() < deadline, sc.log_text()
        time.sleep(0.05)
    with pytest.raises(Exception, match="no-badword"):
        bad_then_word(s)
    assert "policies reloaded" in sc.log_text()


@pytest.mark.parametrize(
    "bad, message",
    [
        (policies("explode"), "policies.default.rules[0] (id 'no-badword').action: Input should be 'block', 'halt' or 'flag'"),
        (
            {"default": {"rules": [{"id": "rx", "kind": "regex", "patterns": ["ok", "(unclosed"], "action": "block"}]}},
            "policies.default.rules[0] (id 'rx').patterns[1]: not a regular expression",
        ),
        (
            {"default": {"rules": [{"id": "a", "kind": "literal", "patterns": ["x"], "action": "flag"}] * 2}},
            "rules[1] (id 'a').id: duplicate rule id, already used by rules[0]",
        ),
        (
            {"default": {"rules": [{"id": "e", "kind": "literal", "patterns": [""], "action": "flag"}]}},
            "policies.default.rules[0] (id 'e').patterns[0]: String should have at least 1 character",
        ),
    ],
    ids=["unknown-action", "invalid-regex", "duplicate-id", "empty-pattern"],
)
def test_a_bad_file_is_refused_with_the_rule_and_field_and_the_old_policy_stays(flagging, bad, message: str) -> None:
    sc, c, digest = flagging
    before = c.open_session(digest, SamplingParams()).policy_digest
    rewrite(sc, bad)
    with pytest.raises(StepRefused, match="INVALID_ARGUMENT") as err:
        c.reload_policy()
    assert message in str(err.value)
    sc.proc.send_signal(signal.SIGHUP)  # the same file by signal: refused and logged
    deadline = time.monotonic() + 10
    while sc.log_text().count("policy reload refused") < 2:
        assert time.monotonic() < deadline, sc.log_text()
        time.sleep(0.05)
    assert message in sc.log_text()
    s = c.open_session(digest, SamplingParams())
    assert s.policy_digest == before
    assert bad_then_word(s).decision == pb.DECISION_ACCEPT  # still the flag policy


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"id": "a", "kind": "literal", "patterns": ["x"], "action": "nuke"}], "rules[0] (id 'a').action"),
        (
            [{"id": "r", "kind": "regex", "patterns": [r"(a)\1"], "action": "flag"}],
            "rules[0] (id 'r').patterns[0]: invalid regular",
        ),
        (
            [{"id": "u", "kind": "regex", "patterns": ["a.*"], "action": "flag"}],
            "rules[0] (id 'u').patterns[0]: the regex can match",
        ),
    ],
)
def test_serve_refuses_to_start_on_a_bad_policy_file(tmp_path: Path, keys, rules, message: str) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": f"unix://{tmp_path / 's.sock'}",
                "signing_key_file": str(keys.private),
                "policies": {"default": {"rules": rules}},
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_reload_that_blocks_reading_the_file_times_out_and_the_next_one_works(start_sidecar, keys) -> None:
    sc = start_sidecar(policies=policies("flag"), reload_timeout_s=2)
    c = GuardClient(sc.target, keys.public, rpc_timeout=30)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    before = c.open_session(digest, SamplingParams()).policy_digest
    text = sc.config.read_text()
    sc.config.unlink()
    os.mkfifo(sc.config)  # nobody ever writes it: reading blocks
    try:
        with pytest.raises(StepRefused, match=r"reload_timeout_s \(2 s\).*compiling process was killed") as e:
            c.reload_policy()
        assert e.value.code == "RESOURCE_EXHAUSTED"
    finally:
        sc.config.unlink()
        sc.config.write_text(text)
    assert c.open_session(digest, SamplingParams()).policy_digest == before  # the old policies stay
    rewrite(sc, policies("block"))
    assert c.reload_policy()["default"] != before  # the lock was given back
    c.close()


def test_a_reload_past_its_memory_bound_fails_and_the_old_policies_stay(start_sidecar, keys) -> None:
    sc = start_sidecar(policies=policies("flag"), reload_max_memory_mb=256)
    c = GuardClient(sc.target, keys.public, rpc_timeout=120)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    rewrite(sc, policies("block"))
    small = c.reload_policy()["default"]  # a small file compiles under the bound
    # 20 000 rules, and 40 policies that alias them: 41 automata from a 1 MB file
    cfg = yaml.safe_load(sc.config.read_text())
    del cfg["policies"]
    rules = "\n".join(
        f"      - {{id: r{i}, kind: literal, patterns: [w{i}x{i * 7919 % 100003}q], action: block}}" for i in range(20_000)
    )
    aliases = "\n".join(f"  p{i}: *base" for i in range(40))
    sc.config.write_text(yaml.safe_dump(cfg) + f"policies:\n  default: &base\n    rules:\n{rules}\n{aliases}\n")
    with pytest.raises(StepRefused, match=r"needs more than reload_max_memory_mb \(256 MB\)"):
        c.reload_policy()
    assert c.open_session(digest, SamplingParams()).policy_digest == small
    c.close()


def test_with_the_reload_rpc_off_only_sighup_reloads(start_sidecar, keys) -> None:
    sc = start_sidecar(policies=policies("flag"), allow_reload_rpc=False)
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    before = c.open_session(digest, SamplingParams()).policy_digest
    rewrite(sc, policies("block"))
    with pytest.raises(StepRefused, match=r"ReloadPolicy is off on this sidecar \(allow_reload_rpc: false\)") as e:
        c.reload_policy()
    assert e.value.code == "PERMISSION_DENIED"
    assert c.open_session(digest, SamplingParams()).policy_digest == before
    sc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while c.open_session(digest, SamplingParams()).policy_digest == before:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    c.close()
