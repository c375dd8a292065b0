"""The OpenAI-compatible server's pure pieces: request models, and the text a client may be
sent (whole characters, never past or into a stop sequence)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from engine_adapters.openai_schema import ChatRequest, CompletionRequest, StopText


def _run(stops: list[str], pieces: list[bytes]) -> tuple[str, bool]:
    t = StopText(stops)
    out = []
    for p in pieces:
        out.append(t.feed(p))
        if t.stopped:
            break
    out.append(t.flush())
    return "".join(out), t.stopped


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.text(max_size=60), st.lists(st.text(min_size=1, max_size=4), max_size=3), st.lists(st.integers(0, 400), max_size=12))
def test_the_text_sent_is_the_text_up_to_the_first_stop_however_the_bytes_are_split(text, stops, cuts) -> None:
    got, stopped = _run(stops, _split(text.encode(), cuts))
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    want = text[: min(ends)] if ends else text
    assert got == want and stopped == bool(ends)


def test_a_character_split_across_tokens_goes_out_whole() -> None:
    t = StopText([])
    euro = "€".encode()
    assert t.feed(euro[:1]) == "" and t.feed(euro[1:]) == "€"


def test_text_that_may_begin_a_stop_sequence_is_held_until_it_cannot() -> None:
    t = StopText(["END"])
    assert t.feed(b"the E") == "the " and t.feed(b"N") == "" and t.feed(b"d") == "ENd"
    assert t.feed(b" END more") == " " and t.stopped and t.feed(b"x") == "" and t.flush() == ""


def test_a_request_without_a_seed_draws_with_a_random_one_and_a_given_one_is_kept() -> None:
    """A fixed default seed would draw every unseeded request's token at a step from the
    same uniform number (one far-tail draw on every request at once)."""
    seeds = {CompletionRequest(prompt="x").sampling().seed for _ in range(8)}
    assert len(seeds) == 8
    assert CompletionRequest(prompt="x", seed=3).sampling().seed == 3
    assert CompletionRequest(prompt="x", seed=-1).sampling().seed == 2**64 - 1  # an int64 seed, as two's complement


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "seed": "1"}, "seed"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": "x", "stop": ""}, "stop"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["0", "1"]}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
    ],
)
def test_requests_the_server_cannot_honour_are_refused_naming_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    assert field in {str(p) for e in info.value.errors() for p in e["loc"]}


def test_json_s_whole_floats_are_integers_but_strings_and_booleans_are_not() -> None:
    r = CompletionRequest.model_validate({"prompt": [1.0, 2], "max_tokens": 5.0, "top_k": 40.0, "seed": 3.0})
    assert (r.prompt, r.max_tokens, r.top_k, r.seed) == ([1, 2], 5, 40, 3)
    c = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4.0, "top_k": 2.0})
    assert (c.limit, c.top_k) == (4, 2)
    for bad in ({"max_tokens": "5"}, {"top_k": True}, {"stream": 0}, {"temperature": True}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": "x", **bad})


def test_chat_content_parts_are_joined_and_developer_is_a_role() -> None:
    r = ChatRequest.model_validate(
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert r.messages[0].content == "ab" and r.limit is None
    both = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 3}
    )
    assert both.limit == 3  # OpenAI's newer name wins
