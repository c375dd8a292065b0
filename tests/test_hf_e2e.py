"""The transformers adapter end to end: the embedded SmolLM2 through transformers' GGUF
loader on the CPU, a batch of prompts guarded by a real sidecar, FULL and COMPACT rows."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

from engine_adapters.client import GuardClient
from engine_adapters.hf import FseLogitsProcessor, GuardedRequest, generate_guarded, vocabulary_of
from sidecar.core.sampling import SamplingParams
from sidecar.ring import RingWriter

from .conftest import CHAT

pytestmark = pytest.mark.slow

PROMPTS = [
    CHAT.format("What is the capital of France?"),
    CHAT.format("Name three colours."),
    CHAT.format("Write one sentence about the sea."),
    CHAT.format("What is 2 + 2?"),
]
N = 12


@pytest.fixture
def hf(hf_model):
    return hf_model


@pytest.fixture
def client(start_sidecar, keys):
    def make(**config):
        sc = start_sidecar(**config)
        c = GuardClient(sc.target, keys.public, step_timeout=10.0)
        c.wait_ready()
        made.append(c)
        return c

    made: list[GuardClient] = []
    yield make
    for c in made:
        c.close()


def unguarded(model, tokenizer, prompts: list[str], n: int = N) -> list[list[int]]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)
    rows = []
    for r in out[:, enc["input_ids"].shape[1] :].tolist():
        rows.append(r[: r.index(eos)] if eos in r else [t for t in r if t != tokenizer.pad_token_id])
    return rows


def test_the_vocabulary_bytes_spell_the_tokenizers_text(hf) -> None:
    model, tokenizer = hf
    vocab = vocabulary_of(tokenizer, model.config.vocab_size)
    ids = tokenizer("Hello wörld, ünïcode ✓ and  spaces")["input_ids"]
    assert b"".join(vocab[i] for i in ids).decode() == tokenizer.decode(ids)
    assert vocab[tokenizer.eos_token_id] == b"<|im_end|>"


def test_guarded_greedy_of_a_batch_equals_unguarded_greedy_with_full_and_with_compact_rows(hf, client) -> None:
    model, tokenizer = hf
    want = unguarded(model, tokenizer, PROMPTS)
    c = client()
    for capacity in (0, 64):  # FULL rows only, then COMPACT rows
        done = generate_guarded(model, tokenizer, PROMPTS, c, max_new_tokens=N, compact_capacity=capacity)
        assert [d.token_ids for d in done] == want, capacity
        assert all(d.finish_reason in ("stop", "length") and d.receipt is not None for d in done)
        assert all(len(d.verdicts) == len(d.token_ids) + (d.finish_reason == "stop") for d in done)
    assert "Paris" in tokenizer.decode(want[0])


def test_the_compact_path_ships_compact_rows_for_greedy_and_top_k_and_full_for_plain_temperature(hf, client) -> None:
    model, tokenizer = hf
    c = client()
    prompts = PROMPTS[:3]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=5), SamplingParams(temperature=0.8, seed=6)]
    vocab = vocabulary_of(tokenizer, model.config.vocab_size)
    digest = c.register_vocabulary(vocab)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with RingWriter.create(slots=2, rows=3, vocab_size=len(vocab), topk=64) as ring:
        reqs = [GuardedRequest(c.open_session(digest, p, ring=ring), p, []) for p in params]
        proc = FseLogitsProcessor(c, reqs, ring, tokenizer.eos_token_id)
        config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList([proc]))
        for r in reqs:
            r.session.close()
    assert all(r.finish_reason in (None, "stop") and r.error is None for r in reqs), [r.error for r in reqs]
    live_steps = sum(len(r.verdicts) for r in reqs)
    assert proc.rows_sent == {"compact": live_steps - len(reqs[2].verdicts), "full": len(reqs[2].verdicts)}


def test_seeded_sampling_gives_the_same_text_from_full_and_compact_rows_and_unguarded_rows_pass_untouched(hf, client) -> None:
    model, tokenizer = hf
    c = client()
    params = [SamplingParams(temperature=0.9, top_k=10, seed=11), None, SamplingParams(temperature=0.7, top_k=5, seed=12)]
    prompts = PROMPTS[:3]
    full = generate_guarded(model, tokenizer, prompts, c, params, max_new_tokens=N, compact_capacity=0)
    comp = generate_guarded(model, tokenizer, prompts, c, params, max_new_tokens=N, compact_capacity=64)
    assert [d.token_ids for d in full] == [d.token_ids for d in comp]
    assert full[1].verdicts == [] and full[1].token_ids == unguarded(model, tokenizer, prompts)[1]


def test_an_abort_ends_only_its_own_row_with_the_reason(hf, client) -> None:
    model, tokenizer = hf
    want = unguarded(model, tokenizer, PROMPTS)
    halt = {"default": {"rules": [{"id": "no-paris", "kind": "literal", "patterns": ["Paris"], "action": "halt"}]}}
    c = client(policies=halt)
    done = generate_guarded(model, tokenizer, PROMPTS, c, max_new_tokens=N, compact_capacity=64)
    assert done[0].finish_reason == "guard_abort" and "no-paris" in done[0].error
    assert "Paris" not in tokenizer.decode(done[0].token_ids)
    assert want[0][: len(done[0].token_ids)] == done[0].token_ids  # everything before the word was the model's
    assert [d.token_ids for d in done[1:]] == want[1:]


def test_tokens_the_engine_produced_against_the_verdicts_are_never_returned(hf, client, monkeypatch) -> None:
    """Mutation audit: the boundary compares the engine's tokens with the verdicts. A
    processor that judges but fails to force lets greedy decoding differ from the
    sidecar's seeded draws: that row returns no token at all, "guard_error"."""
    real = FseLogitsProcessor.__call__

    def judging_not_forcing(self, input_ids, scores):
        real(self, input_ids, scores)  # the verdicts are taken and recorded...
        return scores  # ...and the engine's own scores used

    monkeypatch.setattr(FseLogitsProcessor, "__call__", judging_not_forcing)
    model, tokenizer = hf
    c = client()
    hot = SamplingParams(temperature=1.5, top_k=200, seed=5, repetition_penalty=1.0)
    done = generate_guarded(model, tokenizer, PROMPTS, c, [hot] * len(PROMPTS), max_new_tokens=N, compact_capacity=0)
    assert all(d.finish_reason == "guard_error" and d.token_ids == [] and d.text == "" for d in done), done
    assert all("the engine produced tokens no verdict named" in d.error for d in done)
