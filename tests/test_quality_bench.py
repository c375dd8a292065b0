"""bench quality's own arithmetic: how a guarded run is compared with its unguarded twin."""

from __future__ import annotations

from sidecar.bench.quality import Run, first_difference


def run(ids: list[int], ended: str = "length") -> Run:
    return Run(
        tokens=len(ids), aborted=ended == "abort", ended=ended, first_action=None, first_touch=None, heals=0,
        loop_step=None, distinct4=1.0, distinct4_last32=1.0, max_window_nlp=0.0, mean_nlp=0.0,
        dictionary_share=1.0, text="", ids=ids,
    )  # fmt: skip


def test_runs_with_the_same_tokens_and_end_are_unchanged() -> None:
    assert first_difference(run([1, 2, 3]), run([1, 2, 3])) is None
    assert first_difference(run([1, 2], "eos"), run([1, 2], "eos")) is None


def test_the_first_differing_token_is_where_the_guard_changed_the_run() -> None:
    assert first_difference(run([1, 2, 9, 4]), run([1, 2, 3, 4])) == 2
    assert first_difference(run([9]), run([1, 2, 3])) == 0


def test_an_end_the_twin_did_not_reach_is_a_change_at_that_step() -> None:
    # the guard ended the answer (or aborted) where the twin went on
    assert first_difference(run([1, 2], "guard_eos"), run([1, 2, 3, 4])) == 2
    assert first_difference(run([1, 2], "abort"), run([1, 2, 3])) == 2
    # the same tokens, ended another way: the end is the change
    assert first_difference(run([1, 2], "guard_eos"), run([1, 2], "eos")) == 2
