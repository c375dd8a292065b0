"""The guarded token loop end to end: the real SmolLM2-135M through llama.cpp, the real
sidecar process over its Unix socket, the real shared-memory ring."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine_adapters.client import GuardClient
from engine_adapters.llama_cpp import GuardedLlama, _Run, unguarded_greedy
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort, GuardUnavailable, VerdictRejected
from sidecar.signing import Signer

from .conftest import CHAT
from .tampering import start_tampering_server

pytestmark = pytest.mark.slow

PROMPTS = [CHAT.format("What is the capital of France?"), CHAT.format("Write a short poem about the sea.")]
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)


def reference_greedy(llama, prompt: str, n: int) -> list[int]:
    llama.reset()  # no prompt-cache reuse: batch shapes change logits in the last bits
    return unguarded_greedy(llama, llama.tokenize(prompt.encode(), add_bos=True, special=True), n)


@pytest.fixture
def guarded(llama, start_sidecar, keys):
    made = []

    def make(policies=None, step_timeout: float = 2.0, lane: str = "grpc", speculate: bool = False):
        sc = start_sidecar(policies)
        client = GuardClient(sc.target, keys.public, step_timeout=step_timeout)
        client.wait_ready()
        g = GuardedLlama(llama, client, lane=lane, speculate=speculate)
        made.append((g, client))
        return g, sc

    yield make
    for g, client in made:
        g.close()
        client.close()


# The stream-level evaluators off: these tests pin the per-token path (forcing, the strict
# redo, the double fault). The loop guard heals the poem's third "a place where the" and
# the drift test halts hot sampling; those are pinned in test_stateful_e2e.py.
PER_TOKEN = {"gate": {"enabled": False}, "loop_guard": {"enabled": False}, "drift": {"enabled": False}}


def policy(**guards: float) -> dict:
    return {"default": {"guards": {k: {"enabled": True, "threshold": v} for k, v in guards.items()}, **PER_TOKEN}}


@pytest.mark.parametrize("lane", ["grpc", "shm", "shm+speculate"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["france", "poem"])
def test_greedy_guarded_generation_equals_unguarded_token_for_token(llama, guarded, prompt: str, lane: str) -> None:
    g, _ = guarded(policy(), lane=lane.split("+")[0], speculate=lane.endswith("speculate"))
    llama.reset()
    done = g.complete(prompt, max_tokens=48, sampling=GREEDY)
    assert done.error is None
    expected = reference_greedy(llama, prompt, 48)
    assert len(expected) > 5
    assert done.token_ids == expected
    assert all(t.verdict.decision == pb.DECISION_ACCEPT for t in done.tokens)


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculating"])
def test_tripping_guard_heals_to_the_strict_sampler_and_changes_the_text(llama, guarded, speculate: bool) -> None:
    hot = SamplingParams(temperature=1.5, top_k=100, seed=11, repetition_penalty=1.0)
    free, _ = guarded(policy())
    sampled = free.complete(PROMPTS[1], max_tokens=32, sampling=hot)
    assert sampled.error is None and len(sampled.tokens) == 32  # the free run is whole, not cut short
    # any token that is not the model's top choice trips; speculating, each heal is a
    # forward pass on the sampled guess that must be rolled back
    strict, _ = guarded(policy(rank=0), lane="shm" if speculate else "grpc", speculate=speculate)
    llama.reset()
    healed = strict.complete(PROMPTS[1], max_tokens=32, sampling=hot)
    assert healed.error is None
    decisions = [t.verdict.decision for t in healed.tokens]
    assert pb.DECISION_HEALED in decisions
    for t in healed.tokens:
        if t.verdict.decision == pb.DECISION_HEALED:
            assert "rank" in [r.code for r in t.verdict.reasons]
            assert all(r.sampler == pb.SAMPLER_NORMAL for r in t.verdict.reasons)  # the redo passed
            assert t.verdict.sampler == pb.SAMPLER_STRICT and t.verdict.metrics.rank == 0
    # every emitted token is now the model's top choice: the text is the greedy text
    assert healed.token_ids == reference_greedy(llama, PROMPTS[1], 32)[: len(healed.token_ids)]
    assert healed.token_ids != sampled.token_ids
    if speculate:
        assert strict.speculation["rolled_back"] == decisions.count(pb.DECISION_HEALED) > 0


def test_double_fault_aborts_and_the_text_stops(guarded) -> None:
    g, _ = guarded(policy(entropy=1.0))  # no sampler can lower the model's entropy
    done = g.complete(PROMPTS[1], max_tokens=32, sampling=SamplingParams(temperature=0.8, seed=1))
    assert isinstance(done.error, GuardAbort)
    aborted_at = done.error.step
    assert len(done.tokens) == aborted_at  # nothing from the aborted step on
    assert [r.code for r in done.error.reasons] == ["entropy", "entropy"]
    assert all(t.verdict.metrics.entropy_nats <= 1.0 for t in done.tokens)


def test_killing_the_sidecar_mid_generation_stops_within_the_deadline(guarded) -> None:
    g, sc = guarded(step_timeout=1.0)
    got, after_kill = [], []
    t_kill = None
    with pytest.raises(GuardUnavailable):
        for tok in g.generate(PROMPTS[1], max_tokens=64, sampling=GREEDY):
            (after_kill if t_kill else got).append(tok)
            if len(got) == 5 and t_kill is None:
                sc.kill()
                t_kill = time.monotonic()
    assert time.monotonic() - t_kill < 1.0 + 1.0
    assert len(got) == 5 and after_kill == []
    assert all(t.verdict.signature for t in got)


@pytest.mark.parametrize(
    "mode, from_step, message",
    [("stale_step", 3, "stale or reordered"), ("other_key", 2, "does not trust"), ("other_token", 4, "chain hash")],
)
def test_replayed_forged_or_altered_verdict_stops_generation(llama, tmp_path, keys, other_keys, mode, from_step, message) -> None:
    trusted = Signer.from_file(keys.private)
    server, target = start_tampering_server(tmp_path, trusted, Signer.from_file(other_keys.private), mode, from_step)
    client = GuardClient(target, keys.public)
    try:
        with GuardedLlama(llama, client) as g:
            done = g.complete(PROMPTS[0], max_tokens=20, sampling=GREEDY)
        assert isinstance(done.error, VerdictRejected) and message in str(done.error)
        assert len(done.tokens) == from_step  # every token before the bad verdict, none after
    finally:
        client.close()
        server.stop(0)


def test_llama_cpp_swallows_processor_exceptions_and_the_boundary_still_refuses(llama, guarded, monkeypatch) -> None:
    """The trap from FACTS.md, reproduced on the real library, and why the boundary exists."""
    import sys

    from llama_cpp import LogitsProcessorList

    swallowed: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_value))

    def raising(input_ids, scores):
        raise RuntimeError("processor failed")

    ids = llama.tokenize(PROMPTS[0].encode(), add_bos=True, special=True)
    gen = llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=LogitsProcessorList([raising]))
    token = next(gen)  # llama.cpp went on and sampled despite the exception: fail-open
    gen.close()
    assert [str(e) for e in swallowed] == ["processor failed"]
    g, _ = guarded()
    session = g.client.open_session(g.vocab_digest, GREEDY, ring=g.ring)
    run = _Run(session)
    with pytest.raises(VerdictRejected, match="without a verdict; not emitted"):
        run.admit(0, int(token))

    def one_token() -> int:
        gen = llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=LogitsProcessorList([run.processor]))
        t = next(gen)
        gen.close()
        return int(t)

    forced = one_token()
    assert run.failure is None
    allowed = run.verdicts[0].token_id
    assert forced == allowed  # the processor forced the verdict's token
    # With a verified verdict in hand, a token other than the one it allows is refused too
    # (what a processor that failed to force would let llama.cpp emit).
    with pytest.raises(VerdictRejected, match=f"the verdict allows {allowed}; not emitted"):
        run.admit(0, (allowed + 1) % len(g.vocab))
    again = one_token()
    assert run.admit(1, again).token_id == again  # the forced token passes the boundary
    session.close()


def test_processor_failure_is_recorded_and_blanks_the_scores(guarded) -> None:

    g, sc = guarded()
    session = g.client.open_session(g.vocab_digest, GREEDY, ring=g.ring)
    run = _Run(session)
    sc.kill()
    scores = np.zeros(len(g.vocab), np.float32)
    out = run.processor(np.array([1]), scores)  # must not raise (llama-cpp would swallow it)
    assert np.isneginf(out).all()
    assert isinstance(run.failure, GuardUnavailable)
    assert run.stopping(None, None) is True
    with pytest.raises(GuardUnavailable):
        run.admit(0, 0)


def test_a_token_llama_cpp_produced_against_its_verdict_never_reaches_the_caller(llama, guarded, monkeypatch) -> None:
    """Mutation audit: the boundary runs before a token is handed over. A processor that
    fails to force (what the trap would do) lets llama.cpp's greedy pick differ from the
    sidecar's seeded draw; that token is refused, and every token the caller got is the
    one its verdict allows."""

    def not_forcing(self: _Run, input_ids, scores):
        v = self.session.step(scores)
        self.verdicts[self.step] = v  # recorded, but the scores left as they were
        self.step += 1
        return scores

    monkeypatch.setattr(_Run, "processor", not_forcing)
    g, _ = guarded()
    llama.reset()
    hot = SamplingParams(temperature=1.5, top_k=200, seed=11, repetition_penalty=1.0)
    done = g.complete(PROMPTS[1], max_tokens=48, sampling=hot)
    assert isinstance(done.error, VerdictRejected) and "the verdict allows" in str(done.error), done.error
    assert all(t.token_id == t.verdict.token_id for t in done.tokens)
    refused_step = int(str(done.error).split()[1].rstrip(":"))
    assert len(done.tokens) == refused_step  # nothing at or after the refused step was handed over


def test_the_processor_sends_llama_cpps_contiguous_row_only_once_it_equals_the_scores(guarded) -> None:
    """The contiguous logits (a cheaper copy into the ring than the processor's strided
    view) are sent only after the first step found them equal to the scores llama.cpp
    samples from; a row that differs is dropped and the scores are sent, for the whole run.
    The verdict's token alone is raised to +inf: greedy picks exactly it."""
    g, _ = guarded()
    rng = np.random.default_rng(5)
    scores = rng.standard_normal(len(g.vocab)).astype(np.float32)
    scores[42] = 25.0  # a confident row: the guard accepts its greedy token
    other = scores.copy()
    other[7] += 1.0
    for raw, kept in ((scores.copy(), True), (other, False)):
        session = g.client.open_session(g.vocab_digest, GREEDY, ring=g.ring)
        run = _Run(session, lambda raw=raw: raw)
        out = run.processor(np.array([1]), scores.copy())
        assert run.failure is None
        want = int(np.argmax(scores))  # greedy on the row the sidecar judged: the scores' argmax either way
        assert run.admit(0, want).token_id == want
        assert out[want] == np.inf and np.isfinite(np.delete(out, want)).all()
        assert (run.row is not None, run.row_checked) == (kept, kept)
        session.close()
