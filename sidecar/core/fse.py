"""FSE, the streaming policy matcher (seed 002's Fused Semantic Execution), pure.

Rules are compiled once (:func:`compile_rules`) into at most three *views* of the text,
one per way of folding it, each with one Aho-Corasick automaton for its literals
(``pyahocorasick``) and one Hyperscan database for its regular expressions:

    exact      the text as it is (case-sensitive literals, every regex without normalize)
    casefold   each character case folded (case-insensitive literals)
    normalize  each character NFKC-folded, case folded, invisible format characters
               (zero-width space/joiner, soft hyphen, BOM, variation selectors) removed

Both engines cost per byte scanned, not per rule, so a token costs the same with 10 or
100 000 rules (``fse-sidecar bench fse``).

Two-phase cursor (seed 000's propose / evaluate / commit). :class:`Cursor` is an
immutable value: :meth:`Matcher.scan` checks a candidate's bytes against it and returns
the hits *and* the cursor that committing the candidate would give; the session keeps
the old cursor until the step commits. Neither ``pyahocorasick`` (no cursor) nor the
Hyperscan binding (no copy of a stream's state) can fork a stream, so instead of a live
stream each view keeps a bounded tail window of committed text: as many bytes as the
longest possible match, plus one character of context. A scan runs the automata over
window + candidate, a few dozen bytes, and keeps only the matches that end in the new
part. This is why regular expressions must have a bounded match length
(``MAX_MATCH_CHARS``): Hyperscan's own stream mode would take unbounded ones, but it cannot
be checked without being advanced.

Tokens are bytes and may split a UTF-8 character: the cursor holds the incomplete tail
(at most 3 bytes) until the character completes, and an undecodable byte reads as
U+FFFD. Spans are byte offsets in the emitted (raw) text, whatever the view.

When is a match reported? A match whose end is followed by at least one more character
is *confirmed*, exactly once, by the scan that brings that character. A match that ends
exactly at the end of the text so far is *pending*: a whole-word rule (or a ``\\b`` in a
regex) cannot know yet whether the next character continues the word. ``block`` and
``halt`` rules treat a pending match as a hit (the candidate that would complete the text
is refused, fail closed); ``flag`` rules wait for the confirmation, or for
:meth:`Matcher.finish` at the end of the text. A match covers whole characters of the
raw text: a pattern that matches part of one character's fold (``f`` in the ligature
``ﬁ``, which folds to ``fi``) does not count. Confirmed matches over a whole
generation, plus ``finish``, are exactly the matches of one scan of the whole text.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Any

import ahocorasick
import hyperscan

from ..config import Rule
from ..errors import ConfigError
from .guards import Action

# A regex may match at most this many characters: the window each check rescans is as
# long as the longest possible match (see the module docstring).
MAX_MATCH_CHARS = 1024
# A literal's folded bytes; its length shares the automaton's integer value with the rule.
MAX_LITERAL_BYTES = (1 << 12) - 1
# Regexes are UTF-8 aware. Not HS_FLAG_UCP: Hyperscan refuses \b under it, so \w, \d, \s
# and \b are ASCII classes; whole_word does the Unicode word test for any rule.
_HS_FLAGS = hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_SOM_LEFTMOST
_ACTIONS = {"block": Action.BLOCK, "halt": Action.HALT, "flag": Action.FLAG}
_TRIM_SLACK = 16  # let a window outgrow its bound by this much before it is cut
_decode = codecs.utf_8_decode


class Fold(IntEnum):
    EXACT = 0
    CASEFOLD = 1
    NORMALIZE = 2


# Invisible characters that are not in category Cf but still let a banned word slip:
# combining grapheme joiner, Hangul fillers, Mongolian and other variation selectors.
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0]
    + list(range(0x180B, 0x1810))
    + list(range(0xFE00, 0xFE10))
    + list(range(0xE0100, 0xE01F0))
)


@lru_cache(maxsize=1 << 16)
def _fold_char(ch: str, fold: Fold) -> tuple[bytes, int]:
    """(the character's bytes in the view, its length in the raw text)."""
    cp = ord(ch)
    if 0xDC80 <= cp <= 0xDCFF:  # one undecodable byte (surrogateescape)
        return "\ufffd".encode(), 1
    raw = len(ch.encode("utf-8"))
    if fold is Fold.EXACT:
        return ch.encode("utf-8"), raw
    if fold is Fold.CASEFOLD:
        return ch.casefold().encode("utf-8"), raw
    if cp in _INVISIBLE or unicodedata.category(ch) == "Cf":
        return b"", raw
    # NFKC_Casefold in its decomposed form, per character: full-width, ligatures and
    # composed/decomposed accents fold alike, and a character never depends on its
    # neighbours, so a token boundary cannot change the fold.
    return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", ch).casefold()).encode("utf-8"), raw


def fold_text(text: str, fold: Fold) -> str:
    """``text`` as a view sees it (rules' literals go through the same fold)."""
    return b"".join(_fold_char(c, fold)[0] for c in text).decode("utf-8")


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


@dataclass(frozen=True, slots=True)
class Hit:
    rule: int  # index into Matcher.rules
    start: int  # byte span in the raw text
    end: int
    pending: bool  # ends at the end of the text so far (see the module docstring)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    action: Action
    whole_word: bool


@dataclass(frozen=True, slots=True)
class _Window:
    """A view's committed tail: ``buf`` starts on a character boundary at view offset
    ``base``; ``starts[i]``/``ends[i]`` are the raw byte span of the character that
    produced ``buf[i]``."""

    buf: bytes = b""
    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    base: int = 0


@dataclass(frozen=True, slots=True)
class Cursor:
    """The committed text as the matcher needs it. Immutable: a scan returns a new one."""

    raw_len: int = 0  # bytes of emitted text
    pending: bytes = b""  # an incomplete UTF-8 character at its end
    windows: tuple[_Window, ...] = ()


@dataclass(frozen=True, slots=True)
class Scan:
    hits: tuple[Hit, ...]  # in order of end, then rule
    cursor: Cursor  # the cursor once the scanned bytes are committed


class _View:
    """One fold of the text with its automaton and its database."""

    def __init__(self, fold: Fold) -> None:
        self.fold = fold
        self.literals: dict[str, list[int]] = {}  # key (latin-1 of the folded UTF-8) -> rules
        self.regexes: list[tuple[int, int, bytes, int]] = []  # (rule, pattern index, pattern, flags)
        self.width = 0  # longest possible match, in view bytes
        self.ac: Any = None
        self.hs: Any = None
        self.hs_rule: list[int] = []
        self.shared: list[tuple[int, ...]] = []  # rules of a key that several rules hold
        self._found: list[tuple[int, int, int]] = []

    def build(self) -> None:
        if self.literals:
            # Integers, not Python objects, per word: half the cost of moving the automaton
            # between processes (a reload) and a quarter off each scan. The value packs
            # the key's length (12 bits) under the rule index, or under an index into
            # ``shared`` (low bit set) when several rules hold the same key.
            self.ac = ahocorasick.Automaton(ahocorasick.STORE_INTS)
            for key, rules in self.literals.items():
                if len(rules) == 1:
                    target = rules[0] << 1
                else:
                    target = len(self.shared) << 1 | 1
                    self.shared.append(tuple(rules))
                self.ac.add_word(key, target << 12 | len(key))
            self.ac.make_automaton()
        if self.regexes:
            self.hs = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            self.hs.compile(
                expressions=[p for _, _, p, _ in self.regexes],
                ids=list(range(len(self.regexes))),
                elements=len(self.regexes),
                flags=[f for _, _, _, f in self.regexes],
            )
            self.hs_rule = [r for r, _, _, _ in self.regexes]
        self.window = self.width + 4  # one character of context before a match
        self.literals = {}  # the automaton holds them now

    def __getstate__(self) -> dict[str, Any]:
        """Picklable, so a reload can compile in another process: the Hyperscan database
        travels as its serialised bytes, the automaton as pyahocorasick pickles it."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("hs", "_found")}
        state["hs"] = hyperscan.dumpb(self.hs) if self.hs is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        hs_bytes = state.pop("hs")
        self.__dict__.update(state)
        self._found = []
        self.hs = None
        if hs_bytes is not None:
            self.hs = hyperscan.loadb(hs_bytes, hyperscan.HS_MODE_BLOCK)
            self.hs.scratch = hyperscan.Scratch(self.hs)

    def _on_match(self, pid: int, start: int, end: int, flags: int, context: object) -> None:
        self._found.append((self.hs_rule[pid], start, end))

    def matches(self, data: bytes) -> list[tuple[int, int, int]]:
        """Every (rule, start, end) in ``data``, view offsets. Not reentrant: one thread
        scans a matcher at a time (the sidecar's event loop)."""
        found: list[tuple[int, int, int]] = []
        if self.ac is not None:
            shared = self.shared
            for last, value in self.ac.iter(data.decode("latin-1")):  # one char per byte
                target, n = value >> 12, value & MAX_LITERAL_BYTES
                for rule in shared[target >> 1] if target & 1 else (target >> 1,):
                    found.append((rule, last + 1 - n, last + 1))
        if self.hs is not None:
            self._found = found
            try:
                self.hs.scan(data, match_event_handler=self._on_match)
            finally:
                self._found = []
        return found


class Matcher:
    """Compiled rules of one policy: immutable, shared by every session of that policy."""

    def __init__(self, rules: Sequence[CompiledRule], views: Sequence[_View]) -> None:
        self.rules = tuple(rules)
        self._views = tuple(views)
        self.empty = Cursor(windows=tuple(_Window() for _ in self._views))

    def scan(self, cursor: Cursor, data: bytes) -> Scan:
        """Hits that appending ``data`` to the committed text would give, and the cursor
        after it. ``cursor`` is not changed (it cannot be: it is a value)."""
        raw = cursor.pending + data
        text, used = _decode(raw, "surrogateescape", False)
        return self._scan(cursor, text, raw[used:], cursor.raw_len + len(data), final=False)

    def finish(self, cursor: Cursor) -> tuple[Hit, ...]:
        """Matches that only the end of the text confirms (and those of an incomplete
        character left at the end). Call once the generation is over."""
        text, _ = _decode(cursor.pending, "surrogateescape", True)
        return self._scan(cursor, text, b"", cursor.raw_len, final=True).hits

    def _scan(self, cursor: Cursor, text: str, pending: bytes, raw_len: int, final: bool) -> Scan:
        raw0 = cursor.raw_len - len(cursor.pending)  # where ``text`` starts in the raw text
        hits: list[Hit] = []
        windows = []
        for view, win in zip(self._views, cursor.windows, strict=True):
            chunk, starts, ends = _fold_chunk(text, raw0, view.fold)
            data = win.buf + chunk
            committed_end = win.base + len(win.buf)
            new_end = committed_end + len(chunk)
            all_starts, all_ends = win.starts + starts, win.ends + ends
            for rule, s, e in view.matches(data):
                end = win.base + e
                if end < committed_end or (s == 0 and win.base > 0):  # old, or cut by the window
                    continue
                if (s > 0 and all_starts[s - 1] == all_starts[s]) or (e < len(data) and all_starts[e] == all_starts[e - 1]):
                    continue  # covers part of a character's fold only ('f' of the ligature 'ﬁ')
                r = self.rules[rule]
                if r.whole_word and not _word_bounded(data, s, e, win.base == 0):
                    continue
                hits.append(Hit(rule, all_starts[s], all_ends[e - 1], end == new_end and not final))
            windows.append(_trim(data, all_starts, all_ends, win.base, view.window))
        hits.sort(key=lambda h: (h.end, h.rule, h.start))
        return Scan(tuple(_dedupe(hits)), Cursor(raw_len, pending, tuple(windows)))


def _fold_chunk(text: str, raw0: int, fold: Fold) -> tuple[bytes, tuple[int, ...], tuple[int, ...]]:
    """``text`` (decoded, starting at raw offset ``raw0``) as view bytes, with the raw
    span of the character behind each byte."""
    if text.isascii():  # the common token: one byte per character, folds to lower case
        b = text.encode("ascii")
        if fold is not Fold.EXACT:
            b = b.lower()
        return b, tuple(range(raw0, raw0 + len(b))), tuple(range(raw0 + 1, raw0 + len(b) + 1))
    out, starts, ends = [], [], []
    pos = raw0
    for ch in text:
        vb, n = _fold_char(ch, fold)
        out.append(vb)
        starts += [pos] * len(vb)
        ends += [pos + n] * len(vb)
        pos += n
    return b"".join(out), tuple(starts), tuple(ends)


def _word_bounded(data: bytes, s: int, e: int, at_text_start: bool) -> bool:
    """No word character touches view bytes [s, e). Past the end of ``data`` is unknown
    and counts as a boundary (the hit is then pending)."""
    if s > 0:
        i = s - 1
        while i > 0 and data[i] & 0xC0 == 0x80:
            i -= 1
        if _is_word(data[i:s].decode("utf-8", "replace")[:1]):
            return False
    elif not at_text_start:
        return False
    if e < len(data):
        j = e + 1
        while j < len(data) and data[j] & 0xC0 == 0x80:
            j += 1
        if _is_word(data[e:j].decode("utf-8", "replace")[:1]):
            return False
    return True


def _trim(data: bytes, starts: tuple[int, ...], ends: tuple[int, ...], base: int, keep: int) -> _Window:
    if len(data) <= keep + _TRIM_SLACK:
        return _Window(data, starts, ends, base)
    cut = len(data) - keep
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # start the window on a character
        cut -= 1
    return _Window(data[cut:], starts[cut:], ends[cut:], base + cut)


def _dedupe(hits: list[Hit]) -> list[Hit]:
    """Two patterns (or views) of one rule over the same raw bytes are one hit."""
    seen: set[tuple[int, int, int]] = set()
    out = []
    for h in hits:
        k = (h.rule, h.start, h.end)
        if k not in seen:
            seen.add(k)
            out.append(h)
    return out


# -- compilation ---------------------------------------------------------------------------


def _regex_width(pattern: str, where: str) -> int:
    """Longest match in characters, from Python's parser; refuses what it cannot bound."""
    try:
        lo, hi = re._parser.parse(pattern).getwidth()  # type: ignore[attr-defined]
    except (re.error, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{where}: not a regular expression this matcher supports: {exc}") from None
    if lo == 0:
        raise ConfigError(f"{where}: the regex can match the empty string; every match must hold at least one character")
    if hi > MAX_MATCH_CHARS:
        raise ConfigError(
            f"{where}: the regex can match more than {MAX_MATCH_CHARS} characters "
            f"({'unbounded' if hi >= 1 << 31 else hi}); bound its repeats, e.g. '.{{0,200}}' instead of '.*'"
        )
    return hi


def compile_rules(rules: Sequence[Rule], where: str = "rules") -> Matcher | None:
    """Compile a policy's rules; None when it has none. Errors name the rule and field."""
    if not rules:
        return None
    views = {f: _View(f) for f in Fold}
    compiled = []
    for i, rule in enumerate(rules):
        at = f"{where}[{i}] (id {rule.id!r})"
        compiled.append(CompiledRule(rule.id, _ACTIONS[rule.action], rule.whole_word))
        fold = Fold.NORMALIZE if rule.normalize else Fold.CASEFOLD if rule.case_insensitive else Fold.EXACT
        for j, pattern in enumerate(rule.patterns):
            pat_at = f"{at}.patterns[{j}]"
            if rule.kind == "literal":
                key = fold_text(pattern, fold).encode("utf-8")
                if not key:
                    raise ConfigError(f"{pat_at}: the pattern is empty once normalized ({pattern!r})")
                if len(key) > MAX_LITERAL_BYTES:
                    raise ConfigError(f"{pat_at}: a literal may hold at most {MAX_LITERAL_BYTES} bytes, this one {len(key)}")
                view = views[fold]
                rules_of_key = view.literals.setdefault(key.decode("latin-1"), [])
                if i not in rules_of_key:  # the same literal twice in one rule is one pattern
                    rules_of_key.append(i)
                view.width = max(view.width, len(key))
            else:
                view = views[Fold.NORMALIZE if rule.normalize else Fold.EXACT]
                width = _regex_width(pattern, pat_at)
                caseless = hyperscan.HS_FLAG_CASELESS if rule.case_insensitive or rule.normalize else 0
                view.regexes.append((i, j, pattern.encode("utf-8"), _HS_FLAGS | caseless))
                view.width = max(view.width, 4 * width)
    active = [v for v in views.values() if v.literals or v.regexes]
    for view in active:
        try:
            view.build()
        except hyperscan.error as exc:
            raise _locate_regex_error(rules, where, view, exc) from None
    return Matcher(compiled, active)


def _locate_regex_error(rules: Sequence[Rule], where: str, view: _View, exc: Exception) -> ConfigError:
    """Hyperscan names no pattern when a set fails: compile them one by one to find it."""
    for rule_i, j, pattern, flags in view.regexes:
        try:
            hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK).compile(expressions=[pattern], flags=[flags])
        except hyperscan.error as one:
            rule = rules[rule_i]
            return ConfigError(f"{where}[{rule_i}] (id {rule.id!r}).patterns[{j}]: invalid regular expression: {one}")
    return ConfigError(f"{where}: the regular expressions do not compile together: {exc}")
