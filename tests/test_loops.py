"""The loop guard (sidecar.core.loops): periodicity of the normalised text against plain
string work, variants of one loop, repetition that is not a loop, and heal then halt."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import LoopGuardConfig
from sidecar.core.evaluators import Proposal
from sidecar.core.guards import Action, Sampler, TokenMetrics
from sidecar.core.loops import LoopGuard, normalise

M = TokenMetrics(0, 1.0, 1.0, 0, 0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 1.0)


class Vocab:
    """Token pieces to ids, growing as texts are split into them."""

    def __init__(self) -> None:
        self.tokens: list[bytes] = [b""]  # id 0: a special token with no text (an EOS)
        self.ids: dict[bytes, int] = {}

    def id(self, piece: bytes) -> int:
        if piece not in self.ids:
            self.ids[piece] = len(self.tokens)
            self.tokens.append(piece)
        return self.ids[piece]

    def split(self, text: str) -> list[int]:
        # words with their leading space, punctuation one by one, runs of white space
        return [self.id(m.encode()) for m in re.findall(r" ?\w+|[^\w\s]|\s+", text)]


def prop(token: int, step: int) -> Proposal:
    return Proposal(token, Sampler.NORMAL, M, step, step)


def feed(guard: LoopGuard, ids: list[int], first: int = 0) -> list[tuple[int, str, str]]:
    """Commit ``ids`` (from step ``first``) whatever the guard says; (step, action, detail)
    of every trip on the way."""
    out = []
    for step, t in enumerate(ids, start=first):
        out += [(step, trip.action.name, trip.detail) for trip in guard.check(prop(t, step))]
        guard.commit(prop(t, step))
    return out


def heal_first_refusal(guard: LoopGuard, ids: list[int], instead: int) -> int:
    """Commit ``ids`` until the guard refuses one; commit ``instead`` there (the heal: the
    redo took another token). The step of the heal."""
    for step, t in enumerate(ids):
        if guard.check(prop(t, step)):
            guard.commit(prop(instead, step))
            return step
        guard.commit(prop(t, step))
    raise AssertionError("the guard refused nothing")


def guard_over(vocab: Vocab, prompt: str = "", **cfg: object) -> LoopGuard:
    return LoopGuard(LoopGuardConfig(**cfg), vocab.tokens, vocab.split(prompt) if prompt else ())  # type: ignore[arg-type]


def test_normalise_keeps_lower_case_letters_digits_and_non_ascii() -> None:
    assert normalise(b" Hello, WORLD!\n") == b"helloworld"
    assert normalise(b"2 cups (500 ml)") == b"2cups500ml"
    assert normalise("Größe".encode()) == "größe".encode()[:1] + "Größe".encode()[1:]  # non-ASCII bytes as they are
    assert normalise(b" \t|---|") == b""


def plain_runs(text: bytes, max_period: int) -> dict[int, int]:
    """Period -> how many trailing characters of ``text`` equal the one that period before
    them, for every period with a run (plain string work)."""
    out = {}
    for p in range(1, max_period + 1):
        k = 0
        while k < len(text) - p and text[len(text) - 1 - k] == text[len(text) - 1 - k - p]:
            k += 1
        if k:
            out[p] = k
    return out


def naive_loop(text: bytes, max_period: int, repeats: float, min_chars: int, loop_chars: int) -> bool:
    """Whether ``text`` ends in a unit of at most ``max_period`` characters repeated back
    to back over more than max(min(repeats * p, max(2 p, loop_chars)), min_chars)
    characters (plain string work)."""
    return any(k + p > max(min(repeats * p, max(2 * p, loop_chars)), min_chars) for p, k in plain_runs(text, max_period).items())


PIECES = [b" a", b"b", b"A,", b" ab", b"\n", b"ba", b"!"]


@given(
    ids=st.lists(st.integers(1, len(PIECES)), max_size=80),
    max_period=st.integers(1, 12),
    repeats=st.sampled_from([1.5, 2.0, 2.5, 3.0]),
    min_chars=st.integers(2, 10),
    loop_chars=st.integers(2, 30),
)
@settings(max_examples=300, deadline=None)
def test_periodicity_refuses_exactly_what_plain_string_work_finds(ids, max_period, repeats, min_chars, loop_chars) -> None:
    tokens = [b"", *PIECES]
    g = LoopGuard(
        LoopGuardConfig(
            max_period_chars=max_period,
            max_repeats=repeats,
            min_chars=min_chars,
            max_loop_chars=loop_chars,
            max_heals=1 << 16,
            max_recurrences=1 << 16,
            babble_letters=0,  # periodicity alone (PIECES hold two letters: all babble)
        ),
        tokens,
    )
    text = b""
    for step, t in enumerate(ids):
        for cand in range(1, len(tokens)):  # check every candidate, commit one: checks must not move the state
            trips = g.check(prop(cand, step))
            if trips and "starts again" in trips[0].detail:
                continue  # a healed loop's unit, remembered: not periodicity
            chars = normalise(tokens[cand])
            assert bool(trips) == (bool(chars) and naive_loop(text + chars, max_period, repeats, min_chars, loop_chars)), (
                text,
                cand,
            )
        g.commit(prop(t, step))
        text += normalise(tokens[t])


DIGIT_PIECES = [b" a", b"b", b"1", b" a1", b"12.", b"2", b"\n"]


@given(ids=st.lists(st.integers(1, len(DIGIT_PIECES)), max_size=60), max_period=st.integers(1, 12))
@settings(max_examples=200, deadline=None)
def test_both_streams_runs_are_plain_string_work_on_the_text_and_on_it_with_digits_masked(ids, max_period) -> None:
    # (the two streams share their runs while they agree: this pins that they still agree
    # with the text exactly when digits come and go)
    tokens = [b"", *DIGIT_PIECES]
    g = LoopGuard(LoopGuardConfig(max_period_chars=max_period), tokens)
    text = b""
    for step, t in enumerate(ids):
        g.check(prop(t, step))
        g.commit(prop(t, step))
        text += normalise(tokens[t])
        masked = text.translate(bytes.maketrans(b"0123456789", b"#" * 10))
        assert g._runs[0] == plain_runs(text, max_period), text
        assert g._runs[1] == plain_runs(masked, max_period), text


def test_case_spacing_punctuation_and_token_split_variants_are_one_loop() -> None:
    v = Vocab()
    ids = v.split("hello Hello,") + [v.id(b" hel"), v.id(b"lo")] + v.split("! HELLO")
    trips = feed(guard_over(v), ids)
    # the fourth hello is refused: 20 normalised characters > max(3 x 5, min_chars 16)
    assert trips and trips[0][1] == "BLOCK"
    assert "5-character unit 4.00 times back to back (max 3.20)" in trips[0][2]  # 3.2: min_chars 16
    assert trips[0][0] == ids.index(v.id(b" HELLO"))


def test_a_short_unit_is_cut_at_its_fourth_repetition_and_a_sentence_at_its_third() -> None:
    v = Vocab()
    short = " Well then,"  # 8 characters: three times is emphasis, the fourth is refused
    trips = feed(guard_over(v), v.split(short * 5))
    per = len(v.split(short))
    assert trips and trips[0][0] == 3 * per
    assert "8-character unit 3.50 times back to back (max 3.00)" in trips[0][2]
    for sentence in (" I'm so glad you're here.", " The population of China is approximately 1.4 billion."):
        trips = feed(guard_over(v), v.split(sentence * 3))
        per = len(v.split(sentence))
        assert trips and trips[0][0] == 2 * per, sentence  # the third copy's first token
        assert "(max 2.00)" in trips[0][2]
    # a sentence of over 32 characters twice is not a loop: "write it again" asks for that
    assert feed(guard_over(v), v.split(" The population of China is approximately 1.4 billion." * 2)) == []


def test_a_numbered_loop_is_one_loop_and_a_count_is_not() -> None:
    v = Vocab()
    numbered = "".join(f"{i}. Add the tea to the cup.\n" for i in range(1, 9))
    trips = feed(guard_over(v), v.split(numbered))
    assert trips and "(digits masked)" in trips[0][2]
    assert trips[0][0] < 4 * len(v.split("1. Add the tea to the cup.\n"))
    # digit-only loops are in the first stream: [123, 456, 789, 123, 456, 789, ...]
    trips = feed(guard_over(v), v.split("[" + "123, 456, 789, " * 4))
    assert trips and "(digits masked)" not in trips[0][2]


def test_a_numbered_list_of_one_short_item_runs_to_max_list_repeats_unless_the_prompt_asked() -> None:
    v = Vocab()
    items = v.split("".join(f"{i}. Goodbye\n" for i in range(10, 40)))  # one digit width: one unit
    trips = feed(guard_over(v), items)
    assert trips and "a numbered list of one item" in trips[0][2] and "(digits masked)" in trips[0][2]
    per = len(v.split("10. Goodbye\n"))
    assert 16 * per - 8 <= trips[0][0] <= 17 * per + 8  # at its 17th item, not before
    hello = v.split("".join(f"{i}. Hello\n" for i in range(1, 41)))
    assert feed(guard_over(v, "Write the word 'hello' 50 times."), hello) == []  # asked for
    chapters = v.split(", ".join(f"Chapter {i}" for i in range(1, 16)))
    assert feed(guard_over(v), chapters) == []


def test_a_span_that_keeps_recurring_between_variants_is_a_loop() -> None:
    v = Vocab()
    a = " I'm not sure what you're asking, but I'll try to help."
    b = " I'm not sure what you're looking for, but I'll try to help."
    c = " That's not what I'm asking, but I'll try to help."
    text = a + b + a + c + a + b + a + c  # never the same sentence twice in a row: not periodic
    trips = feed(guard_over(v), v.split(text))
    # the span across "... try to help. I'm not sure what you're" comes back at the a-b, b-a,
    # c-a and a-b seams: its fourth time is refused, at the start of the sixth sentence
    assert trips and "recurs, 4 times in the last 256 tokens (max 3)" in trips[0][2]
    assert "twice in a row" not in trips[0][2] and "back to back" not in trips[0][2]
    assert len(v.split(a + b + a + c + a)) <= trips[0][0] < len(v.split(a + b + a + c + a + b))


def test_babble_of_a_few_letters_is_a_loop_of_variants() -> None:
    """Variants that no unit repeats exactly, each new one free by periodicity."""
    for text, letters in [
        ("LARMA,\n\nLARMA,\n\nLARA,\n\nLARA,\n\nLERA,\n\nLARMA,\n\nLARA,\n\nLERA,\n\nLERL,\n\n", "aelmr"),
        (" no nah nuh nah no nah nah nuh nah no nah nuh no no nah nuh", "ahnou"),
    ]:
        v = Vocab()
        ids = v.split(text)
        trips = feed(guard_over(v, max_repeats=8), ids)  # periodicity loose: babble alone judges
        assert trips and f"are all from {len(letters)} letters ({letters}; max 5): babble" in trips[0][2], text
        # refused at the token that makes the last 32 letters this small an alphabet, not before
        seen = b"".join(v.tokens[t] for t in ids[: trips[0][0] + 1]).decode()
        assert len([c for c in seen if c.isalpha()]) >= 32
        assert feed(guard_over(v, max_repeats=8, babble_letters=0), ids) == []  # 0: off


def test_few_letters_among_digits_or_going_on_as_the_prompt_does_are_not_babble() -> None:
    algebra = "Solve 2x + 3y = 5:\nx = 1 + y\n2(1 + y) + 3y = 5\n2 + 5y = 5\ny = 3/5\nx = 8/5\nx + y = 11/5\n" * 2
    v = Vocab()
    assert [d for _, _, d in feed(guard_over(v), v.split(algebra)) if "babble" in d] == []
    prompt = "Continue the pattern: A B A B A B A B"
    pattern = v.split(" A B" * 24)
    assert feed(guard_over(v, prompt, prompt_repeats=64), pattern) == []  # as the prompt goes (periodicity loose)
    assert feed(guard_over(v, prompt_repeats=64), pattern)  # unasked: babble
    # the pattern degenerating is babble all the same: "aaaaaaab" is not the prompt's
    worse = v.split(" A B" * 12 + " A A A A A A A B" * 4)
    trips = feed(guard_over(v, prompt, prompt_repeats=64), worse)
    assert trips and "babble" in trips[0][2] and trips[0][0] > 24


LEGITIMATE = {
    "code with repeated identifiers": """```python
class BankAccount:
    def __init__(self, account_number, initial_balance=0):
        self.account_number = account_number
        self.balance = initial_balance

    def deposit(self, amount):
        if amount <= 0:
            raise ValueError("Deposit amount cannot be negative")
        self.balance += amount

    def withdraw(self, amount):
        if amount <= 0:
            raise ValueError("Withdrawal amount cannot be negative")
        if amount > self.balance:
            raise ValueError("Insufficient funds")
        self.balance -= amount

    def get_balance(self):
        return self.balance
```""",
    "a numbered list": "".join(f"{i}. {i}\n" for i in range(1, 21)),
    "a recipe's quantities": "* 1 cup flour\n* 1 cup milk\n* 1 cup sugar\n* 1/2 cup butter\n* 1/2 cup water\n* 1 tsp salt\n"
    "* 1 tsp baking powder\n* 1 tsp vanilla\n",
    "a markdown table": "| Country | Capital | Weekday |\n|---|---|---|\n| France | Paris | Yes |\n| Spain | Madrid | Yes |\n"
    "| Italy | Rome | Yes |\n| Japan | Tokyo | No |\n|---|---|---|\n",
    "a multiplication table": "".join(f"3 x {i} = {3 * i}\n" for i in range(1, 11)),
    "numbered names": " ".join(f"t{i}" for i in range(40)) + ", " + ", ".join(f"Chapter {i}" for i in range(1, 13)),
}


def test_repetition_that_is_not_back_to_back_is_never_refused() -> None:
    for what, text in LEGITIMATE.items():
        v = Vocab()
        assert feed(guard_over(v), v.split(text)) == [], what


def test_repetition_the_prompt_asked_for_may_repeat_prompt_repeats_times() -> None:
    v = Vocab()
    prompt = "Say 'I love pizza' three times."
    four = v.split(" I love pizza!" * 4)
    assert feed(guard_over(v, prompt), four) == []
    assert feed(guard_over(v), four)  # without the prompt: the fourth is cut
    assert feed(guard_over(v, prompt, prompt_chars=0), four)  # prompt_chars 0: the prompt is not read
    # bounded all the same: the fifth repetition is refused at its first character
    trips = feed(guard_over(v, prompt), v.split(" I love pizza!" * 9))
    assert trips and "a unit from the prompt" in trips[0][2] and "max 4.00" in trips[0][2]
    per = len(v.split(" I love pizza!"))
    assert trips[0][0] == 4 * per  # the fifth repetition's first token


def test_the_prompt_licenses_its_repetition_once_and_not_the_variants_after_a_heal() -> None:
    v = Vocab()
    prompt = "Continue the pattern: A B A B A B A B"
    variant = v.split(" A B A B A B A" * 4)  # a rotation of the prompt's own text, period 7
    assert feed(guard_over(v, prompt), variant) == []  # licensed: four repetitions
    g = guard_over(v, prompt)
    step = heal_first_refusal(g, v.split(" A B" * 12), v.id(b"\n"))
    trips = feed(g, variant, step + 1)
    assert trips, "the request's licence was spent by the heal: its variant is judged as any text"
    assert "from the prompt" not in trips[0][2]
    # spent for the window only: long after the heal, the prompt licenses again
    later = guard_over(v, prompt, window=16)
    step = heal_first_refusal(later, v.split(" A B" * 12), v.id(b"\n"))
    gap = v.split(" Here is some other text for a while, nothing like the pattern, quickly.")
    assert feed(later, gap + variant, step + 1) == []


def test_a_step_that_cut_the_prompts_unit_spends_its_licence_whatever_it_refused_next() -> None:
    v = Vocab()
    g = guard_over(v, "Say 'I love pizza' three times.")
    step = heal_first_refusal(g, v.split(" I like cats." * 4), v.id(b" Then"))  # "ilikecats" healed
    pizza = v.split(" I love pizza!" * 4)  # the request: licensed
    assert feed(g, pizza, step + 1) == []
    step += 1 + len(pizza)
    cut = g.check(prop(v.id(b" I"), step))  # a fifth: the prompt's unit, cut
    assert cut and "a unit from the prompt" in cut[0].detail
    again = g.check(prop(v.id(b" I like cats I like cats"), step))  # the healed loop: refused too
    assert again and "starts again" in again[0].detail
    g.commit(prop(v.id(b" Well"), step))  # the redo's token
    gap = v.split(", that was that. Now for something else entirely, quickly.")
    trips = feed(g, gap + pizza, step + 1)
    assert trips and "from the prompt" not in trips[0][2]  # spent: three repetitions, as any text


def test_a_run_of_blank_tokens_is_refused_and_a_token_with_no_text_never() -> None:
    v = Vocab()
    nl = v.id(b"\n")
    g = guard_over(v, max_blank_tokens=4)
    trips = feed(g, [nl] * 6)
    assert [(s, a) for s, a, _ in trips] == [(4, "BLOCK"), (5, "BLOCK")]
    assert "4 tokens in a row without a letter or digit" in trips[0][2]
    assert g.check(prop(0, 6)) == ()  # id 0 has no bytes (an end of sequence): never a loop


def test_a_healed_loop_may_not_even_occur_twice_in_a_row_again() -> None:
    # (and over at least 8 characters: "no no" stays free)
    v = Vocab()
    g = guard_over(v)
    step = heal_first_refusal(g, v.split(" I like cats." * 4), v.id(b"."))
    more = v.split(" And then something else entirely. I like cats. I like cats.")
    trips = feed(g, more, step + 1)
    assert [a for _, a, _ in trips] == ["BLOCK"]
    assert "starts again" in trips[0][2]
    assert trips[0][0] == step + len(more) - 1  # the second "cats" in a row, not the first


def test_a_persisting_loop_halts_after_max_heals_and_halt_action_halts_at_once() -> None:
    v = Vocab()
    la = v.split(" la" * 30)
    trips = feed(guard_over(v, max_heals=3), la)
    actions = [a for _, a, _ in trips]
    assert actions[:3] == ["BLOCK"] * 3 and actions[3] == "HALT"
    assert "the loop persists (3 steps healed in the last 256)" in trips[3][2]
    assert feed(guard_over(v, action="halt"), la)[0][1] == "HALT"


def test_ordinary_text_is_untouched_and_counted() -> None:
    v = Vocab()
    text = (
        "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
        "synthesize foods from carbon dioxide and water. It generally involves the green pigment chlorophyll "
        "and generates oxygen as a byproduct. The process of photosynthesis is vital for life on Earth."
    )
    g = guard_over(v)
    assert feed(g, v.split(text)) == []
    assert g.generated == len(v.split(text))


def test_trips_name_the_loop_and_the_candidate() -> None:
    v = Vocab()
    g = guard_over(v, min_chars=5, max_repeats=2)
    assert feed(g, v.split(" ab ab")) == []
    [trip] = g.check(prop(v.id(b" ab"), 2))
    assert (trip.code, trip.action, trip.token_id, trip.value, trip.threshold) == ("loop", Action.BLOCK, v.id(b" ab"), 3.0, 2.5)
    assert trip.detail == "loop: the text repeats a 2-character unit 3.00 times back to back (max 2.50)"  # min_chars 5


def test_checks_do_not_change_the_state() -> None:
    v = Vocab()
    g = guard_over(v)
    feed(g, v.split(" the cat the cat the"))
    before = ([dict(r) for r in g._runs], g._text, g._blank, list(g._banned), list(g._heal_steps))
    for c in range(len(v.tokens)):
        g.check(prop(c, 5))
    after = (list(g._runs), g._text, g._blank, list(g._banned), list(g._heal_steps))
    assert before == after


def test_after_a_heal_band_tokens_come_from_the_strict_sampler_each_flagged() -> None:
    v = Vocab()
    g = guard_over(v, band_tokens=3)
    assert not g.strict()
    ids = v.split(" I like cats." * 4)
    healed = heal_first_refusal(g, ids, v.id(b" Dogs"))
    flags = []
    for step, t in enumerate(v.split(" are nice too and so on"), start=healed + 1):
        flags.append(g.strict())
        trips = g.check(Proposal(t, Sampler.STRICT, M, step, step))
        assert [(tr.action, "loop band" in tr.detail) for tr in trips] == ([(Action.FLAG, True)] if flags[-1] else [])
        g.commit(Proposal(t, Sampler.STRICT, M, step, step))
    assert flags == [True, True, True, False, False, False]  # the 3 steps after the heal, then the request's sampler
    # off: the request's sampler right after the heal
    off = guard_over(v, band_tokens=0)
    feed(off, ids)
    assert not off.strict()


def test_a_sentence_written_twice_starts_the_band_before_a_third_copy_must_be_refused() -> None:
    v = Vocab()
    g = guard_over(v, band_tokens=4)
    sentence = " I am writing to extend a special kind of kindness to you."
    once, twice = v.split(sentence), v.split(sentence * 2)
    assert feed(g, twice) == []  # twice is allowed: nothing refused
    strict_after = []
    g2 = guard_over(v, band_tokens=4)
    for step, t in enumerate(twice):
        g2.commit(prop(t, step))
        strict_after.append(g2.strict())
    # not during the first copy nor most of the second; from the second copy's last letter on
    assert strict_after.index(True) == len(twice) - 2  # " you" completes the unit, "." adds no letter
    assert all(strict_after[len(twice) - 2 :]) and not any(strict_after[: len(twice) - 2])
    assert len(once) * 2 == len(twice)
    step = len(twice)
    trips = g2.check(Proposal(v.id(b" Your"), Sampler.STRICT, M, step, step))
    assert [(t.action, t.detail) for t in trips] == [
        (
            Action.FLAG,
            "loop band: the strict sampler decodes 3 more token(s) after the text repeated "
            "a 45-character unit 2.00 times back to back",
        )
    ]


def test_the_band_before_a_loop_lasts_band_tokens_then_the_request_s_sampler_returns() -> None:
    v = Vocab()
    g = guard_over(v, band_tokens=3)
    ids = v.split(" The story is told in the ballgown of the mother" * 2)
    feed(g, ids)  # its last token completes the second copy: the band is the 3 steps after it
    flags = []
    for step, t in enumerate(v.split(" And then a prince came by"), start=len(ids)):
        flags.append(g.strict())
        g.commit(Proposal(t, Sampler.STRICT, M, step, step))
    assert flags[:3] == [True, True, True] and not any(flags[3:])


def test_repetition_the_prompt_asked_for_or_under_min_chars_does_not_start_the_band() -> None:
    v = Vocab()
    asked = guard_over(v, "Say 'I love pizza' three times.")
    assert feed(asked, v.split("I love pizza, I love pizza, I love pizza.")) == [] and not asked.strict()
    short = guard_over(v)
    assert feed(short, v.split("no no no, yes yes")) == [] and not short.strict()
    # the same sentence twice with the band off: the request's sampler throughout
    off = guard_over(v, band_tokens=0)
    feed(off, v.split(" I like my cats very much." * 2))
    assert not off.strict()
    on = guard_over(v)
    feed(on, v.split(" I like my cats very much." * 2))
    assert on.strict()


def test_a_short_unit_repeated_or_code_in_a_fence_does_not_start_the_band() -> None:
    v = Vocab()
    for text in (
        " the pigment chlorophyll. Chlorophyll is green.",  # anadiplosis: a word twice
        " Practice, practice, practice!",  # emphasis: a short word three times
        "        self.account_number = account_number\n",  # code's x = x
    ):
        g = guard_over(v)
        assert feed(g, v.split(text)) == [] and not g.strict(), text
    body = "def total(numbers):\n    return sum(numbers) / len(numbers)\n\n"
    fenced = guard_over(v)
    assert feed(fenced, v.split("```python\n" + body * 2)) == [] and not fenced.strict()
    # the fence closed (its backticks split over tokens): a sentence twice starts it again
    feed(fenced, [v.id(b"``"), v.id(b"`\n")], first=200)
    assert feed(fenced, v.split(" I like my cats very much." * 2), first=202) == [] and fenced.strict()


def test_a_span_at_its_last_allowed_recurrence_starts_the_band_and_its_next_one_is_still_refused() -> None:
    v = Vocab()
    a = " I'm not sure what you're asking, but I'll try to help."
    b = " I'm not sure what you're looking for, but I'll try to help."
    c = " That's not what I'm asking, but I'll try to help."
    g = guard_over(v)
    first_band = None
    for step, t in enumerate(v.split(a + b + a + c + a)):
        assert not g.check(prop(t, step))  # no refusal before the span's fourth time
        g.commit(prop(t, step))
        if first_band is None and g.strict():
            first_band = step
    # the span across "... try to help. I'm not sure what you're" has come three times (the
    # a-b, b-a and c-a seams): the band starts there, its flag naming why
    assert first_band is not None and len(v.split(a + b + a + c)) <= first_band < len(v.split(a + b + a + c + a))
    step = len(v.split(a + b + a + c + a))
    trips = g.check(Proposal(v.id(b" Maybe"), Sampler.STRICT, M, step, step))
    why = "after a 24-character span of the text recurred 3 times in the last 256 tokens"
    assert [t.detail.endswith(why) for t in trips] == [True]
    # the band is a nudge, not a licence: the span's fourth time is refused all the same
    tail = v.split(b)
    for k, t in enumerate(tail, start=step):
        trips = g.check(Proposal(t, Sampler.STRICT, M, k, k))
        if any(tr.rejects for tr in trips):
            assert "recurs, 4 times in the last 256 tokens (max 3)" in [tr for tr in trips if tr.rejects][0].detail
            break
        g.commit(Proposal(t, Sampler.STRICT, M, k, k))
    else:
        raise AssertionError("the fourth recurrence was not refused")


def test_a_recurring_span_in_a_code_fence_does_not_start_the_band() -> None:
    v = Vocab()
    lines = "".join(f"{name} = stack.pop()  # the top item of the stack\n" for name in ("first", "second", "third"))
    fenced, prose = guard_over(v), guard_over(v)
    assert feed(fenced, v.split("```python\n" + lines)) == [] and not fenced.strict()
    assert feed(prose, v.split(lines)) == [] and prose.strict()  # the same lines outside a fence


def test_in_a_code_fence_a_line_may_come_three_times_and_numbered_lines_run_as_a_list() -> None:
    v = Vocab()
    pops = "print(stack.pop())\n"
    pushes = "".join(f"stack.push({n})\n" for n in range(1, 7))
    for text, prose_refused in ((pops * 3, True), (pushes, True)):
        fenced, prose = guard_over(v), guard_over(v)
        assert feed(fenced, v.split("```python\n" + text)) == [], text
        assert bool(feed(prose, v.split(text))) == prose_refused, text  # outside a fence: a loop
    # a loop in code is still a loop: the same line a fourth time, a numbered line a 17th
    fenced = guard_over(v)
    trips = feed(fenced, v.split("```python\n" + pops * 4))
    assert trips and "(max 3.00)" in trips[0][2]
    fenced = guard_over(v)
    trips = feed(fenced, v.split("```python\n" + "".join(f"stack.push({n})\n" for n in range(10, 30))))
    assert trips and "a numbered list of one item" in trips[0][2]


def test_in_a_code_fence_a_statement_may_recur_in_every_method_up_to_max_code_recurrences() -> None:
    v = Vocab()
    names = ["deposit", "withdraw", "transfer", "refund", "charge", "credit", "debit", "settle", "hold", "release"]
    clause = "        if amount <= 0:\n            raise ValueError('bad amount')\n"
    methods = [f"    def {n}(self, amount):\n{clause}" for n in names]
    fenced = guard_over(v)
    assert feed(fenced, v.split("```python\nclass Account:\n" + "".join(methods[:5]))) == []
    prose = guard_over(v)  # the same text outside a fence: a span's fourth time is a loop of variants
    trips = feed(prose, v.split("class Account:\n" + "".join(methods[:5])))
    assert trips and "times in the last 256 tokens (max 3)" in trips[0][2]
    # a loop in code is still bounded: the guard clause a ninth time
    fenced = guard_over(v)
    trips = feed(fenced, v.split("```python\nclass Account:\n" + "".join(methods)))
    assert trips and trips[0][2].endswith("times in the last 256 tokens (max 8, in a code fence)")
