"""The default policy's stream-level evaluators on the real model (SmolLM2-135M, llama.cpp,
a real sidecar process): the loop guard, the gate and the drift test."""

from __future__ import annotations

import re
from typing import Any

import pytest

from engine_adapters.client import GuardClient
from engine_adapters.llama_cpp import GuardedLlama, unguarded_greedy
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.bench.quality import OFF, distinct_ratio, max_window_mean
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort

from .conftest import CHAT

pytestmark = pytest.mark.slow

LOOP = CHAT.format("Write the word 'hello' 50 times.")
HEALTHY = [CHAT.format(p) for p in ("What is photosynthesis?", "Why do we need sleep?", "How does a bicycle work?")]


@pytest.fixture
def guarded(llama, start_sidecar, keys):
    made = []

    def make(policies: dict | None = None) -> GuardedLlama:
        sc = start_sidecar({"default": {}, "off": OFF, **(policies or {})})
        client = GuardClient(sc.target, keys.public, step_timeout=5.0)
        client.wait_ready()
        g = GuardedLlama(llama, client)
        made.append((g, client))
        return g

    yield make
    for g, client in made:
        g.close()
        client.close()


def test_a_greedy_loop_is_caught_and_healed_or_halted_when_it_persists(llama, guarded) -> None:
    llama.reset()
    ids = llama.tokenize(LOOP.encode(), add_bos=True, special=True)
    unguarded = unguarded_greedy(llama, ids, 64)
    assert distinct_ratio(unguarded) < 0.2  # it loops: "Hello, hello, hello, ..."

    done = guarded().complete(LOOP, max_tokens=64, sampling=SamplingParams())
    loop_steps = [t.step for t in done.tokens if any(r.code == "loop" for r in t.verdict.reasons)]
    if isinstance(done.error, GuardAbort) and any(r.code == "loop" for r in done.error.reasons):
        loop_steps.append(len(done.tokens))
    assert loop_steps and loop_steps[0] < 64

    def loop_reasons(t: Any, action: int) -> list[Any]:
        return [r for r in t.verdict.reasons if r.code == "loop" and r.action == action]

    healed = [t for t in done.tokens if loop_reasons(t, pb.ACTION_BLOCK)]
    if isinstance(done.error, GuardAbort):  # "Hello, hello, goodbye, hello, ...": it persisted
        assert "the loop persists (8 steps healed" in done.error.reasons[0].detail
        assert len(healed) == 8
    else:
        assert done.error is None and distinct_ratio(done.token_ids) >= 0.5
    assert healed and all(t.verdict.decision == pb.DECISION_HEALED for t in healed)
    # after each heal the strict sampler decodes the band's tokens, each verdict saying so
    banded = [t for t in done.tokens if loop_reasons(t, pb.ACTION_FLAG)]
    assert banded and banded[0].step == healed[0].step + 1
    assert all(t.verdict.sampler == pb.SAMPLER_STRICT for t in banded)
    assert all("loop band" in r.detail for t in banded for r in loop_reasons(t, pb.ACTION_FLAG))
    assert {t.step for t in done.tokens if any(r.code == "loop" for r in t.verdict.reasons)} == {t.step for t in healed + banded}


def test_a_loop_the_guard_ends_is_a_heal_the_completion_reports(llama, guarded) -> None:
    """Greedy, the model writes one sentence again and again; with the loop band off (the
    default's band steers it off a third copy before one must be cut), the loop guard
    allows a sentence twice and refuses the first letter of its third copy, and the redo's
    next candidate is end-of-sequence. That verdict yields no token, yet it is the guard's
    act: the completion carries it as ``end`` and counts it, as the signed receipt does."""
    prompt = CHAT.format("Keep saying 'go go go go go'.")
    g = guarded({"default": {"loop_guard": {"band_tokens": 0}}})
    free = g.complete(prompt, max_tokens=96, sampling=SamplingParams(), policy="off")
    assert free.error is None and len(free.tokens) == 96 and free.end is None  # unguarded it runs on
    done = g.complete(prompt, max_tokens=96, sampling=SamplingParams())
    assert done.error is None and len(done.tokens) < 96
    assert done.token_ids == free.token_ids[: len(done.tokens)]  # nothing before the end was touched
    assert done.end is not None and done.end.decision == pb.DECISION_HEALED
    assert done.end.token_id == llama.token_eos() and done.end.step == len(done.tokens)
    assert [(r.code, r.action) for r in done.end.reasons] == [("loop", pb.ACTION_BLOCK)]
    # the third copy's first letter: just past twice a sentence-long unit
    past_twice = r"loop: the text repeats a \d{2,}-character unit 2\.0\d times back to back \(max 2\.00\)"
    assert re.fullmatch(past_twice, done.end.reasons[0].detail)
    assert done.receipt is not None and done.receipt.steps == len(done.tokens) + 1
    assert done.healed == done.receipt.healed == 1


def test_a_sentence_written_twice_starts_the_loop_band_so_no_third_copy_must_be_cut(llama, guarded) -> None:
    """Heal first, on a healthy prompt: greedy, the model writes a sentence a second time
    and, unguarded, a third and on. As the second copy ends, where a span of it comes a
    third time, the loop guard starts its band (the strict sampler's repetition penalty,
    every verdict flagging it), the model writes something else, and no token is refused."""
    prompt = CHAT.format("Summarize the story of Cinderella.")
    g = guarded()
    llama.reset()
    free = g.complete(prompt, max_tokens=128, sampling=SamplingParams(), policy="off")
    llama.reset()
    done = g.complete(prompt, max_tokens=128, sampling=SamplingParams())
    assert done.error is None and done.healed == 0 and all(t.verdict.decision == pb.DECISION_ACCEPT for t in done.tokens)
    banded = [t for t in done.tokens if t.verdict.sampler == pb.SAMPLER_STRICT]
    start = banded[0].step
    assert done.token_ids[:start] == free.token_ids[:start]  # untouched up to the band
    assert [t.step for t in banded] == list(range(start, min(start + 48, len(done.tokens))))
    reasons = [(r.code, r.action, r.detail) for r in banded[0].verdict.reasons]
    why = "after a 24-character span of the text recurred 3 times in the last 256 tokens"
    assert reasons == [("loop", pb.ACTION_FLAG, f"loop band: the strict sampler decodes 48 more token(s) {why}")]
    text = lambda c: b"".join(t.text for t in c.tokens).decode()  # noqa: E731
    assert text(free).count("ambition and desires") >= 3 and text(done).count("ambition and desires") == 2


def test_a_loop_halts_when_the_policy_says_halt(guarded) -> None:
    g = guarded({"default": {"loop_guard": {"action": "halt"}}})
    done = g.complete(LOOP, max_tokens=64, sampling=SamplingParams())
    assert isinstance(done.error, GuardAbort)
    assert [r.code for r in done.error.reasons] == ["loop"]
    assert len(done.tokens) < 64


def test_ordinary_greedy_text_is_untouched(llama, guarded) -> None:
    g = guarded()
    for prompt in (CHAT.format("What is the capital of France?"), HEALTHY[0]):
        llama.reset()
        done = g.complete(prompt, max_tokens=48, sampling=SamplingParams())
        llama.reset()
        assert done.error is None
        assert done.token_ids == unguarded_greedy(llama, llama.tokenize(prompt.encode(), add_bos=True, special=True), 48)
        assert all(t.verdict.decision == pb.DECISION_ACCEPT for t in done.tokens)
        assert all(t.verdict.stream.band == pb.GATE_BAND_HEALTHY for t in done.tokens)


def test_legitimate_repetition_is_not_edited(llama, guarded) -> None:
    """Code with its identifiers on every line, a count, a list with repeated quantities:
    under the default policy every token is the unguarded model's own (the token n-gram
    loop guard this replaced changed them)."""
    g = guarded()
    prompts = (
        "Write a Python class for a bank account with deposit and withdraw methods.",
        "List the numbers from 1 to 20.",
        "Write a Python function that counts the vowels in a string.",
    )
    for prompt in map(CHAT.format, prompts):
        llama.reset()
        done = g.complete(prompt, max_tokens=160, sampling=SamplingParams())
        llama.reset()
        assert done.error is None, prompt
        assert done.token_ids == unguarded_greedy(llama, llama.tokenize(prompt.encode(), add_bos=True, special=True), 160)
        assert not [r.code for t in done.tokens for r in t.verdict.reasons if r.code == "loop"], prompt


def test_a_loop_of_variants_ends_healed_or_halted_not_looping(guarded) -> None:
    """Unguarded, "beep beep beep ..." runs to the end; guarded, its variants (beeps, bep,
    BEEP) are the same loop, so the run leaves the loop, ends or halts."""
    prompt = CHAT.format("Write beep beep beep without stopping, sometimes in capitals.")
    done = guarded().complete(prompt, max_tokens=192, sampling=SamplingParams())
    loop_steps = [t.step for t in done.tokens if any(r.code == "loop" for r in t.verdict.reasons)]
    if isinstance(done.error, GuardAbort):
        assert [r.code for r in done.error.reasons] == ["loop"]
        loop_steps.append(len(done.tokens))
    assert loop_steps and loop_steps[0] < 64
    # the prompt holds "beep": four may come back to back (prompt_repeats; over min_chars), not the 48 unguarded
    assert done.text.lower().count("beep") <= 9
    if done.error is None and len(done.tokens) == 192:  # still going at the budget's end: not looping there
        assert distinct_ratio(done.token_ids[-32:]) >= 0.8
    elif done.error is None:  # the model's own end: after it left the loop, not inside it
        assert len(done.text.lower().rsplit("beep", 1)[-1].split()) >= 5, done.text


def test_temperature_3_under_the_default_policy_stays_within_the_healthy_band(guarded) -> None:
    """The healthy band of windowed surprise, measured here: the highest 16-token mean
    -log p of unguarded healthy runs (temperature 0.7); the guarded hot runs stay under it."""
    g = guarded()
    healthy = [
        g.complete(p, max_tokens=48, sampling=SamplingParams(temperature=0.7, seed=s), policy="off")
        for p in HEALTHY
        for s in (1, 2)
    ]
    band = max(max_window_mean([t.verdict.metrics.neg_logprob_nats for t in d.tokens]) for d in healthy)
    hot = [g.complete(p, max_tokens=48, sampling=SamplingParams(temperature=3.0, seed=5)) for p in HEALTHY]
    for d in hot:
        surprise = max_window_mean([t.verdict.metrics.neg_logprob_nats for t in d.tokens])
        assert surprise <= band, (d.text, surprise, band)
        assert d.error is None or isinstance(d.error, GuardAbort)
        acted = [t.step for t in d.tokens if t.verdict.decision == pb.DECISION_HEALED]
        assert (acted and acted[0] < 16) or (isinstance(d.error, GuardAbort) and len(d.tokens) < 16)
    unguarded = g.complete(HEALTHY[0], max_tokens=48, sampling=SamplingParams(temperature=3.0, seed=5), policy="off")
    assert max_window_mean([t.verdict.metrics.neg_logprob_nats for t in unguarded.tokens]) > 2 * band  # it was garbage


def test_hot_sampling_is_healed_into_whole_answers_not_stubs(guarded) -> None:
    """Heal first (issue 29): at temperature 3.0 the drift test moves the session into the
    protective band instead of aborting; every later token is the strict sampler's, each
    verdict HEALED with the drift trip saying so, and the answer runs to its end."""
    g = guarded()
    for prompt in HEALTHY:
        d = g.complete(prompt, max_tokens=64, sampling=SamplingParams(temperature=3.0, seed=5))
        assert d.error is None, (d.text, d.error)
        assert len(d.tokens) >= 32 or d.tokens[-1].step + 1 < 64, d.text  # length, or the model's own end
        band = [t for t in d.tokens if any(r.code == "drift" and "protective band" in r.detail for r in t.verdict.reasons)]
        assert band and all(t.verdict.decision == pb.DECISION_HEALED for t in band)
        assert band[0].step < 16  # entered early, then held
        assert max_window_mean([t.verdict.metrics.neg_logprob_nats for t in band]) < 3.0, d.text  # readable


def test_bench_quality_draws_each_prompt_of_a_sampled_group_with_its_own_seed() -> None:
    """One seed for every prompt drew each step's token from the same uniform number in
    every run: a far-tail draw landed on all prompts at once (seed 2: six steps in 192)."""
    from sidecar.bench.quality import groups

    for g in groups(16, 16, 9, 12):
        pairs = g.runs()
        assert [p for p, _ in pairs] == g.prompts
        seeds = [s.seed for _, s in pairs]
        if g.samplings[0].greedy:
            assert all(s == g.samplings[0] for _, s in pairs)
        else:
            assert len(set(seeds)) == len(seeds), g.name
