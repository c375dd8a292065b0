"""The guarded token loop end to end: the real SmolLM2-135M through llama.cpp, the real
sidecar process over its Unix socket, the real shared-memory ring."""

from __future__ import annotations

import time

import pytest

from engine_adapters.client import GuardClient
from engine_adapters.llama_cpp import GuardedLlama, unguarded_greedy
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
    if len(expected) < 48:  # the model's own end: a verified verdict too, never yielded
        assert done.end is not None and done.end.decision == pb.DECISION_ACCEPT
        assert done.end.token_id == llama.token_eos() and done.end.step == len(expected)
    else:
        assert done.end is None


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculating"])
def test_tripping_guard_heals_to_the_strict_sampler_and_changes_the_text(llama, guarded, speculate: bool) -> None:
    hot = SamplingParams(temperature=1.5, top_k=100, seed=11, repetition_penalty=1.0)
    free, _ = guarded(policy())
    sampled = free.complete(PROMPTS[1], max_tokens=32, sampling=hot)
    assert sampled.error is None and len(sampled.tokens) == 32  # the free run is whole, not cut short
    # any token that is not the model's top choice trips; speculating, each heal is a
    # forward pass on the sampled guess that must be rolled back. The strict sampler with no
    # repetition penalty of its own (the default's 1.2 is tests/test_redo.py's) is greedy.
    greedy_strict = policy(rank=0)
    greedy_strict["default"]["redo"] = {"strict_repetition_penalty": 1.0}
    strict, _ = guarded(greedy_strict, lane="shm" if speculate else "grpc", speculate=speculate)
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


def test_llama_cpp_swallows_processor_exceptions_so_the_guard_uses_none(llama, guarded, monkeypatch) -> None:
    """The trap from FACTS.md, reproduced on the real library: why GuardedLlama drives
    llama.cpp by hand instead of through a logits processor. With llama-cpp-python's own
    generate (and its sampler chain) made to fail, guarded generation is unchanged."""
    import sys

    from llama_cpp import LogitsProcessorList

    swallowed: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_value))

    def raising(input_ids, scores):
        raise RuntimeError("processor failed")

    ids = llama.tokenize(PROMPTS[0].encode(), add_bos=True, special=True)
    gen = llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=LogitsProcessorList([raising]))
    next(gen)  # llama.cpp went on and sampled despite the exception: fail-open
    gen.close()
    assert [str(e) for e in swallowed] == ["processor failed"]

    def not_used(*args, **kwargs):
        raise AssertionError("GuardedLlama must not go through llama-cpp-python's generate or sample")

    g, _ = guarded()
    want = reference_greedy(llama, PROMPTS[0], 12)
    monkeypatch.setattr(type(llama), "generate", not_used)
    monkeypatch.setattr(type(llama), "sample", not_used)
    done = g.complete(PROMPTS[0], max_tokens=12, sampling=GREEDY)
    assert done.error is None and done.token_ids == want


@pytest.mark.parametrize("lane", ["grpc", "shm+speculate"])
def test_llama_cpp_context_holds_only_verdict_tokens(llama, guarded, lane: str) -> None:
    """Whatever the guard did (heals, speculation rolled back), what llama.cpp's context
    holds after the prompt is exactly the tokens the caller got: nothing unsigned was kept."""
    g, _ = guarded(lane=lane.split("+")[0], speculate=lane.endswith("speculate"))
    hot = SamplingParams(temperature=1.5, top_k=200, seed=11, repetition_penalty=1.0)
    ids = llama.tokenize(PROMPTS[1].encode(), add_bos=True, special=True)
    done = g.complete(ids, max_tokens=40, sampling=hot)
    assert done.error is None and len(done.tokens) >= 20
    assert all(t.token_id == t.verdict.token_id for t in done.tokens)
    held = list(llama.input_ids[len(ids) : llama.n_tokens])
    emitted = done.token_ids
    assert held == emitted[: len(held)] and len(held) >= len(emitted) - 1  # the last one needs no forward pass
    if lane.endswith("speculate"):
        assert g.speculation["rolled_back"] > 0  # hot sampling: guesses were wrong and undone


def test_a_failed_step_evaluates_nothing(llama, guarded) -> None:
    """The sidecar dies mid-generation: the step raises, and llama.cpp's context ends with
    the last token the caller got; no token is evaluated without a verdict."""
    g, sc = guarded(step_timeout=1.0)
    ids = llama.tokenize(PROMPTS[1].encode(), add_bos=True, special=True)
    got = []
    with pytest.raises(GuardUnavailable):
        for tok in g.generate(ids, max_tokens=64, sampling=GREEDY):
            got.append(tok.token_id)
            if len(got) == 5:
                sc.kill()
    assert got and list(llama.input_ids[len(ids) : llama.n_tokens]) == got


def test_the_prompt_llama_cpp_already_holds_is_not_evaluated_again(llama, guarded) -> None:
    """A second request sharing the first's prompt keeps its KV entries (as llama-cpp-python's
    own generate does); the guarded text is the one a cold start gives."""
    g, _ = guarded()
    ids = llama.tokenize(PROMPTS[0].encode(), add_bos=True, special=True)
    llama.reset()
    first = g.complete(ids, max_tokens=8, sampling=GREEDY)
    evaluated: list[int] = []
    real = llama.eval
    llama.eval = lambda tokens: (evaluated.append(len(tokens)), real(tokens))[1]
    try:
        again = g.complete(ids, max_tokens=8, sampling=GREEDY)
    finally:
        del llama.eval
    assert first.error is None and again.token_ids == first.token_ids
    assert evaluated[0] == 1  # only the prompt's last token again, for its logits
