"""The loop guard: text that repeats itself back to back. Pure.

Seed 001's "healthy loop" gap: a greedy loop ("the the the ...", a sentence again and
again) has low perplexity, low entropy and high variance, so every per-token signal
looks healthier than normal text. A loop is text that *repeats itself back to back*, so
the guard looks for exactly that, in the text rather than in token ids:

- **Normalised text.** Each token's bytes are lower-cased and stripped of everything but
  letters, digits and non-ASCII bytes: "hello" / " Hello," / "HELLO!" and a word split
  over two tokens ("be" + "ep") are the same characters, so case, whitespace,
  punctuation and token-split variants of one loop are one loop. Digits are kept, so a
  count ("1. 1", "2. 2", ...) or a list of quantities is not periodic. A second stream
  masks every digit, so that a numbered loop ("11. Add the tea to the cup." "12. Add the
  tea to the cup.") is one loop too; there a unit must hold a digit and be mostly
  letters (eight at least), so a count or a table of numbers stays free.
- **Periodicity.** For every period p up to ``max_period_chars`` the guard keeps how many
  trailing characters equal the character p before them (a vector, one numpy pass per
  token). A candidate is refused when the normalised text would end in a unit repeated
  back to back more than ``max_repeats`` times and over more than ``min_chars``
  characters; a long unit (a sentence) twice, and not past ``max_loop_chars``.
  Repetition that is not back to back (an identifier used on every line of code, "cup"
  in every line of a recipe, a table's repeated cells, a word that recurs) is never
  periodic, so it is never touched: the token n-gram counting this replaces refused
  exactly those.
- **Requested repetition.** A unit found in the prompt ("say 'I love pizza' three
  times") may repeat ``prompt_repeats`` times: echoing the user's own text is not
  degenerate, but it is still bounded, and licensed once: when the guard has had to cut
  it, the prompt licenses nothing more for ``window`` steps, so a variant of the request
  ("A B A B A A B A B A", babble from the prompt's letters) is judged as any text is.
- **Recurrence.** A loop of variants is not back to back ("I'm not sure what you're
  asking / looking for, but I'll try to help."): a span of ``recur_chars`` characters
  that comes back more than ``max_recurrences`` times in the window, other text between,
  is refused too (a Rabin-Karp hash of the span per character, counted per window); in a
  Markdown code fence ``max_code_recurrences`` times (statements recur in code).
- **Babble.** Variants of a short loop that no unit repeats exactly ("LARMA, LARA, LERA",
  "no nah nuh nah"): the last ``babble_window`` letters drawn from at most
  ``babble_letters`` distinct letters is refused, unless digits are a quarter or more of
  the characters there (algebra, a table) or its last 8 letters occur in the prompt (it
  goes on as the prompt does: "Continue: A B A B").
- **Blank loops.** Whitespace and punctuation normalise to nothing, so a run of more than
  ``max_blank_tokens`` tokens in a row with no letter or digit ("\\n\\n\\n...", "!!!!") is
  refused on its own count.
- **Cost.** Per new character, the periods whose character before it is the same one,
  found with ``bytes.find`` in the last ``max_period_chars`` characters of each stream (a
  handful, not all of them); the check of a step's candidate is kept for its commit.
- **Heal, then halt.** A refused candidate is a BLOCK trip: the redo excludes it and takes
  the next candidate (a heal). The unit that looped is remembered (for ``window`` steps):
  from then on it may not even occur twice in a row, so the loop cannot quietly restart
  after a heal. When the guard has had to refuse tokens in ``max_heals`` of the last
  ``window`` steps, the loop persists and the next refusal halts (``action: halt``
  halts at once).
- **A band after a heal.** A sampler that just looped finds its way back to the loop
  (greedy decoding of a small model above all), so for ``band_tokens`` steps after a heal
  the guard asks for the strict sampler, whose repetition penalty
  (``redo.strict_repetition_penalty``) steers away from what was just written; each of
  those verdicts carries a FLAG saying so (no silent change of sampler).
- **A band before the heal.** Heal first: when the committed text stands at a limit its
  next copy would pass (a long unit twice back to back: a sentence written a second time;
  a ``recur_chars`` span ``max_recurrences`` times), the same band starts at once, so the
  penalty steers the model off that copy before one has to be cut. Not for a short unit
  back to back, a unit the prompt asked for, or in a Markdown code fence (two functions
  alike are code; a repetition penalty breaks identifiers).
- **Code.** In a Markdown code fence (three backticks open and close one) a line may come
  ``max_repeats`` times whatever its length (``stack.pop()`` three times), lines that
  differ only in their digits are a numbered list, and a span may recur
  ``max_code_recurrences`` times (a guard clause in every method).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from ..config import LoopGuardConfig
from .evaluators import Proposal
from .guards import Action, Sampler, Trip

# bytes.translate: lower-case A-Z, delete every other ASCII byte that is not a letter or
# a digit; bytes >= 0x80 (the parts of non-ASCII characters) are kept as they are.
_LOWER = bytes.maketrans(bytes(range(ord("A"), ord("Z") + 1)), bytes(range(ord("a"), ord("z") + 1)))
_DROP = bytes(b for b in range(128) if not chr(b).isalnum())


def normalise(text: bytes) -> bytes:
    """What the loop guard compares: ``text`` lower-cased, letters, digits and non-ASCII only."""
    return text.translate(_LOWER, _DROP)


# The second stream: every digit as "#", so a numbered loop ("11. Add the tea to the cup.",
# "12. Add the tea ...") is periodic there; a unit counts in it only when its primitive
# unit (a "t#t#t#" unit is "t#" three times) has at least _MIN_LETTERS letters and is
# mostly letters, so a count ("1. 1", "2. 2", "t1 t2 t3", "Chapter 1, Chapter 2") or a
# table of numbers ("3 x 4 = 12") stays free.
_DIGITS = b"0123456789"
_MASK = bytes.maketrans(_DIGITS, b"#" * len(_DIGITS))
_MIN_LETTERS = 8
_MAX_TOKEN_CHARS = 128  # of one token's normalised characters (a registered token may be megabytes)
_P = (1 << 61) - 1  # the recurrence's Rabin-Karp hash: modulo a Mersenne prime, fixed base
_B = 1_000_003
_BABBLE_PROMPT_RUN = 8  # babble whose last this many letters occur in the prompt goes on as the prompt does
_BAN_CHARS = 8  # a healed unit is refused twice in a row, and over at least this many characters ("no no" stays free)


def _letters(unit: bytes) -> int:
    """Letters of the primitive unit of ``unit`` (digits masked) when it is mostly
    letters; 0 when it is not."""
    p = len(unit)
    q = next(q for q in range(1, p + 1) if p % q == 0 and unit == unit[:q] * (p // q))  # the primitive unit
    letters = len(unit[:q].translate(None, b"#"))
    return letters if 2 * letters >= q else 0


_STREAMS = ("", " (digits masked)")
Runs = tuple[dict[int, int], dict[int, int]]  # per stream: period -> run (only periods with one)


class LoopGuard:
    name = "loop_guard"

    def __init__(self, cfg: LoopGuardConfig, tokens: Sequence[bytes] = (), prompt: Sequence[int] | np.ndarray = ()) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self._norm: dict[int, bytes] = {}
        P = cfg.max_period_chars
        # a unit of p characters is a loop once its repetition covers more than
        # max(min(R p, max(2 p, max_loop_chars)), min_chars): R repetitions, but a long unit
        # (a sentence) only twice and not past max_loop_chars; [p - 1] for period p
        self._limit = [
            math.floor(max(min(cfg.max_repeats * p, max(2 * p, cfg.max_loop_chars)), cfg.min_chars)) + 1 for p in range(1, P + 1)
        ]
        # in a Markdown code fence a line may come max_repeats times whatever its length
        # (stack.pop() three times is code), and lines that differ only in their digits are
        # a numbered list (push(1), push(2), ...: up to max_list_repeats)
        self._limit_code = [math.floor(max(cfg.max_repeats * p, cfg.min_chars)) + 1 for p in range(1, P + 1)]
        # Per stream (0: the normalised text, 1: the same with digits masked), period ->
        # its run: how many trailing characters equal the one that period before them.
        # Only periods with a run are kept: a character matches a handful of the periods
        # before it, so the update and the test are a handful of operations, not P.
        # One dict for both while they agree (text without digits: the common case), so the
        # runs are found once a character instead of twice.
        empty: dict[int, int] = {}
        self._runs: Runs = (empty, empty)
        self._text = b""  # the normalised committed text: its last _keep characters
        self._keep = max(2 * P, cfg.recur_chars + _MAX_TOKEN_CHARS)
        # Recurrence: Rabin-Karp hashes of the recur_chars-character spans committed in the window.
        self._hash = 0  # of the last recur_chars characters
        self._total = 0  # normalised characters committed
        self._drop = pow(_B, cfg.recur_chars, _P)
        self._spans: deque[tuple[int, int]] = deque()  # (step, hash), oldest first
        self._span_counts: dict[int, int] = {}
        ids = prompt.tolist() if isinstance(prompt, np.ndarray) else prompt
        prompt_text = normalise(b"".join(tokens[t] for t in ids if 0 <= t < len(tokens)))
        prompt_text = prompt_text[len(prompt_text) - min(len(prompt_text), cfg.prompt_chars) :]  # 0: none
        self._prompt = (prompt_text, prompt_text.translate(_MASK))
        self._blank = 0  # committed tokens in a row without a letter or digit
        self._banned: deque[tuple[int, int, bytes]] = deque()  # (step, stream, unit): loops healed
        self._heal_steps: deque[int] = deque()  # steps in the window where a token was refused
        # (step, stream, unit, asked) of this step's refusal; asked: it cut repetition the prompt asked for
        self._pending: tuple[int, int, bytes, bool] | None = None
        # The step a loop of the prompt's own unit was healed: its licence is spent for the
        # window, so a variant of it ("A B A B A A B A B A") gets no licence of its own.
        self._spent = -(1 << 62)
        # (step, token, runs, text, (hash, spans) once the recurrence rolled them) of the last
        # check, for its commit
        self._checked: tuple[int, int, Runs, bytes, tuple[int, list[int]] | None] | None = None
        self.generated = 0
        self._next_step = 0  # the step after the last commit
        self._band_end = -1  # the last step of the band (after a heal, or a loop at its limit)
        self._band_why = ""  # what started it (the band's flags say)
        self._fence = False  # inside a Markdown code fence (``` ... ```) of the committed text
        self._ticks = 0  # backticks in a row at the committed text's end

    def strict(self) -> bool:
        return self._next_step <= self._band_end

    def check(self, p: Proposal) -> Sequence[Trip]:
        trips = self._check(p)
        if p.step > self._band_end or p.sampler != Sampler.STRICT or any(t.rejects for t in trips):
            return trips
        left = self._band_end - p.step + 1
        detail = f"loop band: the strict sampler decodes {left} more token(s) {self._band_why}"
        return (Trip("loop", float(left), float(self.cfg.band_tokens), p.sampler, detail, Action.FLAG, p.token), *trips)

    def _chars(self, token: int) -> bytes:
        c = self._norm.get(token)
        if c is None:
            c = normalise(self.tokens[token])[:_MAX_TOKEN_CHARS] if 0 <= token < len(self.tokens) else b""
            self._norm[token] = c
        return c

    def _extend(self, chars: bytes) -> tuple[Runs, tuple[bytes, bytes]]:
        """The runs and both streams' text (its last ``_keep`` characters) after appending
        ``chars``; the state is not changed. For each new character, the periods whose
        character before it is the same (found with ``bytes.find`` in the last
        ``max_period_chars`` characters) extend their run by one; every other period's run
        ends. Sparse on purpose: the step runs with caches cold from the engine's forward
        pass, where each numpy call over all periods cost tens of microseconds."""
        P = self.cfg.max_period_chars
        text = self._text + chars
        end = len(text)
        texts = (text, text.translate(_MASK))
        # A character that is not a digit matches the same earlier positions in both streams
        # ("#" is never in the text itself), so while the runs agree they stay one dict.
        shared = self._runs[0] is self._runs[1] and len(chars.translate(None, _DIGITS)) == len(chars)
        out: list[dict[int, int]] = []
        grown: dict[int, int]
        for t, old in zip(texts[: 1 if shared else 2], self._runs, strict=False):
            runs = old
            for i in range(end - len(chars), end):
                c, grown = t[i], {}
                q = t.find(c, max(i - P, 0), i)
                while q >= 0:
                    grown[i - q] = runs.get(i - q, 0) + 1
                    q = t.find(c, q + 1, i)
                runs = grown
            out.append(runs)
        masked = out[0] if shared or out[0] == out[1] else out[1]  # (digits passed out of every run: one dict again)
        return (out[0], masked), (text[-self._keep :], texts[1][-self._keep :])

    def _check(self, p: Proposal) -> Sequence[Trip]:
        chars = self._chars(p.token)
        if not chars:
            self._checked = None
            raw = self.tokens[p.token] if 0 <= p.token < len(self.tokens) else b""
            if raw and self._blank >= self.cfg.max_blank_tokens:
                detail = f"loop: {self._blank} tokens in a row without a letter or digit (max {self.cfg.max_blank_tokens})"
                return self._refuse(p, float(self._blank + 1), float(self.cfg.max_blank_tokens), detail, 0, b"")
            return ()
        runs, texts = self._extend(chars)
        text = texts[0]
        self._checked = (p.step, p.token, runs, text, None)
        for step, stream, unit in self._banned:  # a loop healed before, starting again (in any phase)
            period = len(unit)
            n = runs[stream].get(period, 0) + period  # the characters the unit's repetition covers
            if step > p.step - self.cfg.window and n >= max(2 * period, _BAN_CHARS) and texts[stream][-period:] in unit + unit:
                detail = f"loop: a loop healed before starts again (its unit twice in a row{_STREAMS[stream]})"
                return self._refuse(p, n / period, 1.0, detail, stream, unit)
        limit = self._limit_code if self._fence else self._limit
        for stream in (0, 1):
            licensed: list[int] = []
            for period in sorted(q for q, r in runs[stream].items() if r + q >= limit[q - 1]):
                if any(period % q == 0 for q in licensed):
                    continue  # a multiple of a unit the prompt asked for
                unit = texts[stream][-period:]
                letters = _MIN_LETTERS  # the text's own stream: any unit is a word's
                if stream == 1:
                    letters = _letters(unit) if b"#" in unit else 0
                    if not letters:
                        continue  # no digit (row 0 judges it), or mostly digits (a count, a table of numbers)
                n = runs[stream][period] + period
                repeats, allowed, asked = n / period, self.cfg.max_repeats, ""
                if letters < _MIN_LETTERS or (stream == 1 and self._fence):
                    # a numbered item of a short word ("12. Goodbye", "Chapter 12"), or a line
                    # of code with other digits: a list, and a list of one item may run to
                    # max_list_repeats (the prompt's own: on)
                    if n <= self.cfg.max_list_repeats * period or self._in_prompt(unit, self._prompt[1]):
                        continue
                    allowed, asked = self.cfg.max_list_repeats, ", a numbered list of one item"
                elif self._licensed(p.step) and self._in_prompt(unit, self._prompt[stream]):
                    licensed.append(period)
                    allowed, asked = self.cfg.prompt_repeats, ", a unit from the prompt"
                    if n <= max(allowed * period, self.cfg.min_chars):
                        continue
                if not asked:
                    allowed = (limit[period - 1] - 1) / period
                detail = (
                    f"loop: the text repeats a {period}-character unit {repeats:.2f} times back to back"
                    f"{_STREAMS[stream]} (max {allowed:.2f}{asked})"
                )
                return self._refuse(p, repeats, allowed, detail, stream, unit, asked=period in licensed)
        return self._babble(p, text) or self._recurrence(p, chars, text, runs)

    def _babble(self, p: Proposal, text: bytes) -> Sequence[Trip]:
        """Variants of a short loop that no unit repeats exactly ("LARMA, LARA, LERA",
        "no nah nuh nah"): the last babble_window letters from a handful of letters."""
        W, K = self.cfg.babble_window, self.cfg.babble_letters
        if not K:
            return ()
        letters = text[-(W + W // 4) :].translate(None, _DIGITS)  # too few letters: mostly digits (a table, algebra)
        if len(letters) < W:
            return ()
        window = letters[-W:]
        alphabet = bytes(sorted(set(window)))
        if len(alphabet) > K:
            return ()
        licensed = self._licensed(p.step)
        if licensed and self._in_prompt(window[-_BABBLE_PROMPT_RUN:], self._prompt[0]):  # in some phase
            return ()  # it still goes on as the prompt does ("Continue: A B A B A B A B")
        q = next((q for q in range(1, W // 2 + 1) if window[q:] == window[:-q]), 0)
        if q and licensed and self._in_prompt(window[-q:], self._prompt[0]):
            return ()  # the prompt's own word, numbered ("1. Hello 2. Hello"): periodicity bounds it
        shown = alphabet.decode("utf-8", "backslashreplace")
        detail = f"loop: the last {W} letters are all from {len(alphabet)} letters ({shown}; max {K}): babble"
        return self._refuse(p, float(len(alphabet)), float(K), detail, 0, b"")

    def _rolled(self, chars: bytes, text: bytes) -> tuple[int, list[int]]:
        """The span hash after ``chars`` (the end of ``text``) and the hashes of the spans they complete."""
        G, h, out = self.cfg.recur_chars, self._hash, []
        base = len(text) - len(chars)
        for k, c in enumerate(chars):
            h = (h * _B + c + 1) % _P
            if self._total + k >= G:  # the character recur_chars back leaves the span
                h = (h - (text[base + k - G] + 1) * self._drop) % _P
            if self._total + k + 1 >= G:
                out.append(h)
        return h, out

    def _recurrence(self, p: Proposal, chars: bytes, text: bytes, runs: Runs) -> Sequence[Trip]:
        """A long span that keeps coming back, with other text between ("I'm not sure what
        you're asking ..." / "... looking for ..."): a loop that periodicity misses."""
        G = self.cfg.recur_chars
        if self._total + len(chars) < G:
            return ()
        h, spans = self._rolled(chars, text)
        self._checked = (p.step, p.token, runs, text, (h, spans))
        seen = self._span_counts.get(spans[-1], 0)
        bound, where = (self.cfg.max_code_recurrences, ", in a code fence") if self._fence else (self.cfg.max_recurrences, "")
        if seen < bound:
            return ()
        # a span that is one unit repeated is periodicity's to judge when the prompt asked
        # for that unit (its licence); otherwise a recurring span is a recurring span
        unit = min((q for q, r in runs[0].items() if q <= G // 2 and r + q >= G), default=0)  # its shortest unit
        if unit and self._licensed(p.step) and self._in_prompt(text[-unit:], self._prompt[0]):
            return ()
        detail = (
            f"loop: a {G}-character span of the text recurs, {seen + 1} times in the last "
            f"{self.cfg.window} tokens (max {bound}{where})"
        )
        return self._refuse(p, float(seen + 1), float(bound), detail, 0, b"")

    def _fences(self, raw: bytes) -> None:
        """Track Markdown code fences: a run of three backticks (split over tokens or not)
        opens or closes one."""
        for b in raw[:_MAX_TOKEN_CHARS]:
            if b == 0x60:  # `
                self._ticks += 1
                if self._ticks == 3:
                    self._fence, self._ticks = not self._fence, 0
            else:
                self._ticks = 0

    def _caution(self, step: int, span: int | None) -> None:
        """Start the band before a loop must be healed, once the committed text stands at
        a limit that its next copy would pass: a long unit (a sentence: one allowed twice)
        twice back to back, or a recur_chars span that has come max_recurrences times in the
        window. The strict sampler's repetition penalty then steers the next tokens away
        from that copy, so the loop is prevented rather than cut (the copy is still refused
        if it comes). Not for a short unit back to back (an anadiplosis, "chlorophyll.
        Chlorophyll", or "Practice, practice, practice": free up to their limit), a unit the
        prompt asked for (its licence bounds it), in a Markdown code fence (the caller: two
        functions alike are code, and a repetition penalty breaks identifiers), or on the
        digits-masked stream (a numbered list)."""
        cfg, runs, text = self.cfg, self._runs[0], self._text
        licensed = self._licensed(step)
        for q in sorted(q for q, r in runs.items() if r >= q and 2 * q >= cfg.max_loop_chars):  # a sentence, twice
            if licensed and self._in_prompt(text[-q:], self._prompt[0]):
                continue
            self._band_end = step + cfg.band_tokens
            self._band_why = f"after the text repeated a {q}-character unit {(runs[q] + q) / q:.2f} times back to back"
            return
        G = cfg.recur_chars
        if span is None or self._span_counts[span] < cfg.max_recurrences:
            return
        unit = min((q for q, r in runs.items() if q <= G // 2 and r + q >= G), default=0)  # as _recurrence judges it
        if unit and licensed and self._in_prompt(text[-unit:], self._prompt[0]):
            return
        self._band_end = step + cfg.band_tokens
        self._band_why = (
            f"after a {G}-character span of the text recurred {self._span_counts[span]} times in the last {cfg.window} tokens"
        )

    def _licensed(self, step: int) -> bool:
        """Whether the prompt still licenses its own units: not once a loop of one was
        healed in the window (a request licenses its repetition once)."""
        return self._spent <= step - self.cfg.window

    @staticmethod
    def _in_prompt(unit: bytes, prompt: bytes) -> bool:
        """Whether some rotation of ``unit`` occurs in the prompt."""
        if len(unit) > len(prompt):
            return False
        twice = unit + unit
        return any(twice[i : i + len(unit)] in prompt for i in range(len(unit)))

    def _refuse(
        self, p: Proposal, value: float, limit: float, detail: str, stream: int, unit: bytes, asked: bool = False
    ) -> Sequence[Trip]:
        # a step may refuse several candidates: a cut of the prompt's own unit among them spends its licence
        asked = asked or (self._pending is not None and self._pending[0] == p.step and self._pending[3])
        self._pending = (p.step, stream, unit, asked)
        heals = self._heals_in_window(p.step)
        if self.cfg.action == "halt" or heals >= self.cfg.max_heals:
            why = "action halt" if self.cfg.action == "halt" else f"{heals} steps healed in the last {self.cfg.window}"
            return (Trip("loop", value, limit, p.sampler, f"{detail}; the loop persists ({why})", Action.HALT, p.token),)
        return (Trip("loop", value, limit, p.sampler, detail, Action.BLOCK, p.token),)

    def _heals_in_window(self, step: int) -> int:
        # commit keeps the deque pruned to the previous step's window: at most its oldest
        # entry has fallen out of this step's
        stale = 1 if self._heal_steps and self._heal_steps[0] <= step - self.cfg.window else 0
        return len(self._heal_steps) - stale

    def commit(self, p: Proposal) -> None:
        cfg = self.cfg
        if self._pending is not None and self._pending[0] == p.step:
            self._heal_steps.append(p.step)
            self._band_end, self._band_why = p.step + cfg.band_tokens, "after a healed loop"
            _, stream, unit, asked = self._pending
            if asked:
                self._spent = p.step
            if unit and all((st, len(u)) != (stream, len(unit)) or unit not in u + u for _, st, u in self._banned):
                self._banned.append((p.step, stream, unit))
        self._pending = None
        while self._heal_steps and self._heal_steps[0] <= p.step - cfg.window:
            self._heal_steps.popleft()
        while self._banned and self._banned[0][0] <= p.step - cfg.window:
            self._banned.popleft()
        while self._spans and self._spans[0][0] <= p.step - cfg.window:
            left = self._span_counts[self._spans[0][1]] - 1
            if left:
                self._span_counts[self._spans[0][1]] = left
            else:
                del self._span_counts[self._spans[0][1]]
            self._spans.popleft()
        raw = self.tokens[p.token] if 0 <= p.token < len(self.tokens) else b""
        if b"`" in raw or self._ticks:
            self._fences(raw)
        chars = self._chars(p.token)
        if chars:
            self._blank = 0
            c = self._checked
            if c is not None and c[0] == p.step and c[1] == p.token:
                runs, text, rolled = c[2], c[3], c[4]
            else:
                (runs, (text, _)), rolled = self._extend(chars), None
            self._hash, spans = rolled if rolled is not None else self._rolled(chars, self._text + chars)
            for h in spans:
                self._spans.append((p.step, h))
                self._span_counts[h] = self._span_counts.get(h, 0) + 1
            self._runs, self._text = runs, text
            self._total += len(chars)
            if p.step >= self._band_end and cfg.band_tokens and not self._fence:
                self._caution(p.step, spans[-1] if spans else None)
        elif p.token < len(self.tokens) and self.tokens[p.token]:
            self._blank += 1
        self._checked = None
        self.generated += 1
        self._next_step = p.step + 1
