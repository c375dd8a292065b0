"""The loop guard (sidecar.core.loops) against plain counting, and its heal/halt policy."""

from __future__ import annotations

from collections import Counter, deque

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import LoopGuardConfig
from sidecar.core.evaluators import Proposal
from sidecar.core.guards import Action, Sampler, TokenMetrics
from sidecar.core.loops import LoopGuard

M = TokenMetrics(0, 1.0, 1.0, 0, 0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 1.0)


def prop(token: int, step: int) -> Proposal:
    return Proposal(token, Sampler.NORMAL, M, step, step)


def feed(guard: LoopGuard, tokens: list[int]) -> list[tuple[int, str]]:
    """Commit ``tokens``; the (step, action) of every trip a check gave on the way."""
    out = []
    for step, t in enumerate(tokens):
        out += [(step, trip.action.name) for trip in guard.check(prop(t, step))]
        guard.commit(prop(t, step))
    return out


def naive_repeats(history: list[int], token: int, n: int, window: int) -> int:
    """How often the n-gram that ``token`` completes occurs among the last ``window`` n-grams."""
    grams = [tuple(history[i : i + n]) for i in range(len(history) - n + 1)][-window:]
    return Counter(grams)[tuple([*history[len(history) - n + 1 :], token])] if len(history) >= n - 1 else 0


@given(
    tokens=st.lists(st.integers(0, 3), max_size=120),
    n=st.integers(1, 5),
    window=st.integers(2, 30),
    max_repeats=st.integers(1, 3),
)
@settings(max_examples=300, deadline=None)
def test_the_rolling_hash_counts_exactly_what_plain_counting_does(tokens, n, window, max_repeats) -> None:
    g = LoopGuard(LoopGuardConfig(n=n, window=window, max_repeats=max_repeats, max_heals=1 << 16))
    history: list[int] = []
    for step, t in enumerate(tokens):
        for cand in range(4):  # check every candidate, commit one: checks must not move the state
            tripped = bool(g.check(prop(cand, step)))
            assert tripped == (naive_repeats(history, cand, n, window) >= max_repeats)
        g.commit(prop(t, step))
        history.append(t)


def test_a_one_token_loop_is_blocked_when_the_n_gram_would_occur_a_third_time() -> None:
    g = LoopGuard(LoopGuardConfig(n=4, max_repeats=2))
    trips = feed(g, [7] * 8)
    # 4-gram (7,7,7,7) completes at steps 3 and 4; step 5 would make it three
    assert trips[0] == (5, "BLOCK")


def test_the_window_forgets_old_n_grams() -> None:
    g = LoopGuard(LoopGuardConfig(n=2, window=4, max_repeats=1))
    assert feed(g, [1, 2, 3, 4, 5, 6, 1]) == []  # (6, 1) is new; (1, 2) left the window long ago
    assert feed(LoopGuard(LoopGuardConfig(n=2, window=8, max_repeats=1)), [1, 2, 9, 1, 2]) == [(4, "BLOCK")]


def test_a_persisting_loop_halts_after_max_heals_and_halt_action_halts_at_once() -> None:
    g = LoopGuard(LoopGuardConfig(n=2, max_repeats=1, max_heals=3, window=64))
    trips = feed(g, [5, 5, 5, 5, 5, 5, 5])
    assert [a for _, a in trips] == ["BLOCK", "BLOCK", "BLOCK", "HALT", "HALT"]  # steps 2 to 6
    assert feed(LoopGuard(LoopGuardConfig(n=2, max_repeats=1, action="halt")), [5, 5, 5])[0] == (2, "HALT")


def test_the_prompt_is_not_counted_and_ordinary_text_is_untouched() -> None:
    g = LoopGuard(LoopGuardConfig())
    text = list(range(200))  # no n-gram twice
    assert feed(g, text) == []
    assert g.generated == 200


def test_trips_name_the_loop_and_the_candidate() -> None:
    g = LoopGuard(LoopGuardConfig(n=1, max_repeats=1))
    g.commit(prop(3, 0))
    [trip] = g.check(prop(3, 1))
    assert (trip.code, trip.action, trip.token_id, trip.value, trip.threshold) == ("loop", Action.BLOCK, 3, 1.0, 1.0)


def test_checks_do_not_change_the_state() -> None:
    g = LoopGuard(LoopGuardConfig(n=3))
    feed(g, [1, 2, 3, 1, 2])
    before = (deque(g._prefix), g._prefix_hash, deque(g._grams), dict(g._counts))
    for c in range(10):
        g.check(prop(c, 5))
    assert (deque(g._prefix), g._prefix_hash, deque(g._grams), dict(g._counts)) == before
