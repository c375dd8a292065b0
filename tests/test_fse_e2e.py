"""Policy rules on the real model: SmolLM2-135M through llama.cpp, a real sidecar process.

Greedy on the prompt below writes "... a process called Rayleigh scattering, ..." with
"Rayleigh" split over two tokens (" Ray", "leigh"): the rule must see across them.
"""

from __future__ import annotations

import pytest

from engine_adapters.client import GuardClient
from engine_adapters.llama_cpp import GuardedLlama, unguarded_greedy
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort

from .conftest import CHAT

pytestmark = pytest.mark.slow

PROMPT = CHAT.format("Explain in two sentences why the sky is blue.")
WORD = b"Rayleigh"
N = 24


def policy(action: str) -> dict:
    return {"default": {"rules": [{"id": "no-rayleigh", "kind": "literal", "patterns": [WORD.decode()], "action": action}]}}


@pytest.fixture
def run(start_sidecar, keys, llama):
    def go(action: str):
        sc = start_sidecar(policies=policy(action))
        client = GuardClient(sc.target, keys.public, step_timeout=5.0)
        client.wait_ready()
        with GuardedLlama(llama, client) as guarded:
            done = guarded.complete(PROMPT, max_tokens=N, sampling=SamplingParams())
            vocab = guarded.vocab
        client.close()
        return done, vocab

    return go


def test_the_prompt_produces_the_word_unguarded(llama) -> None:
    from engine_adapters.llama_cpp import vocabulary_of

    ids = llama.tokenize(PROMPT.encode(), add_bos=True, special=True)
    vocab = vocabulary_of(llama)
    out = unguarded_greedy(llama, ids, N)
    assert WORD in b"".join(vocab[t] for t in out)
    assert WORD not in {vocab[t] for t in out}  # split over tokens: the matcher must join them


def test_block_keeps_the_word_out_and_heals_with_the_rule_id(run) -> None:
    done, vocab = run("block")
    assert done.error is None and len(done.tokens) == N
    text = b"".join(t.text for t in done.tokens)
    assert WORD not in text
    healed = [t for t in done.tokens if t.verdict.decision == pb.DECISION_HEALED]
    assert healed, "the word was never proposed"
    for t in healed:
        hits = [r for r in t.verdict.reasons if r.code == "no-rayleigh"]
        assert hits and all(r.action == pb.ACTION_BLOCK for r in hits)
        prefix = b"".join(x.text for x in done.tokens[: t.step])
        for r in hits:  # the span is the word in the text as it would have been
            assert (prefix + vocab[r.token_id])[r.span_start : r.span_end] == WORD
            assert r.token_id != t.token_id


def test_halt_aborts_before_the_words_last_token(run) -> None:
    done, vocab = run("halt")
    assert isinstance(done.error, GuardAbort)
    text = b"".join(t.text for t in done.tokens)
    assert WORD not in text and text.endswith(b" Ray")
    [r] = done.error.reasons
    assert (r.code, r.action) == ("no-rayleigh", pb.ACTION_HALT)
    assert (text + vocab[r.token_id])[r.span_start : r.span_end] == WORD
    assert done.error.step == len(done.tokens)


def test_flag_lets_the_word_through_and_records_every_hit(run) -> None:
    done, _vocab = run("flag")
    assert done.error is None
    text = b"".join(t.text for t in done.tokens)
    assert text.count(WORD) >= 1
    hits = [r for t in done.tokens for r in t.verdict.reasons if r.code == "no-rayleigh"]
    assert all(t.verdict.decision == pb.DECISION_ACCEPT for t in done.tokens)
    assert len(hits) == text.count(WORD)
    assert all(r.action == pb.ACTION_FLAG and text[r.span_start : r.span_end] == WORD for r in hits)
