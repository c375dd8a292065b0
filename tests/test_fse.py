"""The streaming policy matcher (sidecar.core.fse) against one scan of the whole text."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import Rule
from sidecar.core.evaluators import PolicyRules, Proposal
from sidecar.core.fse import MAX_MATCH_CHARS, Matcher, compile_rules
from sidecar.core.guards import Action, Sampler, TokenMetrics
from sidecar.errors import ConfigError

# -- an independent reference: fold the whole text, find every match, map it back -----------

INVISIBLE = {0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0, *range(0x180B, 0x1810), *range(0xFE00, 0xFE10)}


def ref_fold(ch: str, rule: Rule) -> str:
    if 0xDC80 <= ord(ch) <= 0xDCFF:
        return "\ufffd"
    if rule.normalize:
        if unicodedata.category(ch) == "Cf" or ord(ch) in INVISIBLE:
            return ""
        return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", ch).casefold())
    if rule.case_insensitive and rule.kind == "literal":
        return ch.casefold()
    return ch


def reference(rules: list[Rule], raw: bytes) -> list[tuple[str, int, int]]:
    """(rule id, raw start, raw end) of every match in the finished text, sorted."""
    text = raw.decode("utf-8", "surrogateescape")
    out: set[tuple[str, int, int]] = set()
    for rule in rules:
        view, src, pos = [], [], 0  # view chars; per view char: (source char index, raw start, raw end)
        for i, ch in enumerate(text):
            n = 1 if 0xDC80 <= ord(ch) <= 0xDCFF else len(ch.encode())
            for vc in ref_fold(ch, rule):
                view.append(vc)
                src.append((i, pos, pos + n))
            pos += n
        v = "".join(view)
        spans: set[tuple[int, int]] = set()
        for p in rule.patterns:
            if rule.kind == "literal":
                key = "".join(ref_fold(c, rule) for c in p)
                at = v.find(key)
                while at >= 0:
                    spans.add((at, at + len(key)))
                    at = v.find(key, at + 1)
            else:
                flags = re.ASCII | (re.IGNORECASE if rule.case_insensitive or rule.normalize else 0)
                rx = re.compile(p, flags)
                for e in range(1, len(v) + 1):
                    s = next((s for s in range(e) if rx.fullmatch(v, s, e)), None)
                    if s is not None:
                        spans.add((s, e))
        for s, e in spans:
            if (s > 0 and src[s - 1][0] == src[s][0]) or (e < len(v) and src[e][0] == src[e - 1][0]):
                continue  # part of one character's fold
            if rule.whole_word and ((s > 0 and is_word(v[s - 1])) or (e < len(v) and is_word(v[e]))):
                continue
            out.add((rule.id, src[s][1], src[e - 1][2]))
    return sorted(out)


def is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def stream(m: Matcher, tokens: list[bytes]) -> list[tuple[str, int, int]]:
    """Confirmed hits of each committed token, then those of the end of the text."""
    cursor, hits = m.empty, []
    for t in tokens:
        scan = m.scan(cursor, t)
        hits += [h for h in scan.hits if not h.pending]
        cursor = scan.cursor
    hits += m.finish(cursor)
    return sorted((m.rules[h.rule].id, h.start, h.end) for h in hits)


# -- strategies ----------------------------------------------------------------------------

# ASCII, accents (composed and not), a ligature, full-width, German sharp s, dotted I,
# zero-width space and joiner, soft hyphen, CJK and an emoji (4 bytes).
ALPHABET = "abckilKL _.-!\n" + "é\u0301ﬁＫｉßİ\u200b\u200d\u00ad中😀"
texts = st.text(alphabet=ALPHABET, max_size=40)
literals = st.text(alphabet="abcikKl é\u200bﬁßＫ", min_size=1, max_size=4).filter(lambda p: p.strip("\u200b") != "")
regex_atoms = st.sampled_from(["a", "b", "k", "i", "l", " ", "[abc]", "[^ a]", ".", "(a|bc)", "(ki|l)"])
regexes = (
    st.lists(st.tuples(regex_atoms, st.sampled_from(["", "", "{1,2}", "?"])), min_size=1, max_size=4)
    .map(lambda parts: "".join(a + q for a, q in parts))
    .filter(lambda p: re.compile(p).fullmatch("") is None)
)


@st.composite
def rule_sets(draw: st.DrawFn) -> list[Rule]:
    rules = []
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["literal", "regex"]))
        patterns = draw(st.lists(literals if kind == "literal" else regexes, min_size=1, max_size=3))
        opts = {k: draw(st.booleans()) for k in ("case_insensitive", "whole_word", "normalize")}
        rules.append(Rule(id=f"r{i}", kind=kind, patterns=patterns, action="flag", **opts))
    return rules


@st.composite
def split_bytes(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    raw = draw(texts).encode("utf-8")
    if draw(st.booleans()):  # an undecodable byte somewhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + b"\xff" + raw[at:]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(raw)), max_size=len(raw) + 1))))
    bounds = [0, *cuts, len(raw)]
    return raw, [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_sets(), split=split_bytes())
def test_streaming_reports_exactly_the_matches_of_one_scan_of_the_whole_text(rules, split) -> None:
    raw, tokens = split
    m = compile_rules(rules)
    assert m is not None
    assert stream(m, tokens) == reference(rules, raw)


@settings(max_examples=200, deadline=None)
@given(rules=rule_sets(), split=split_bytes(), others=st.lists(st.binary(max_size=6), min_size=1, max_size=3))
def test_checking_candidates_never_changes_the_committed_cursor(rules, split, others) -> None:
    """Through the evaluator: check other candidates before each commit; the result is
    the plain stream's, and the cursor moves only on commit."""
    _raw, tokens = split
    m = compile_rules(rules)
    assert m is not None
    vocab = [*tokens, *others]
    ev = PolicyRules(m, vocab)
    metrics = TokenMetrics(0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1)
    expected = m.empty
    for i in range(len(tokens)):
        before = ev.cursor
        for j in [len(tokens) + k for k in range(len(others))] + [i] + [len(tokens)]:
            ev.check(Proposal(j, Sampler.NORMAL, metrics, i, i))
            assert ev.cursor == before
        ev.commit(Proposal(i, Sampler.NORMAL, metrics, i, i))
        expected = m.scan(expected, tokens[i]).cursor
        assert ev.cursor == expected


# -- examples that pin the behaviour a person relies on -------------------------------------


def hits(m: Matcher, tokens: list[bytes]) -> list[tuple[str, bytes, bool]]:
    cursor, out, text = m.empty, [], b"".join(tokens)
    for t in tokens:
        scan = m.scan(cursor, t)
        out += [(m.rules[h.rule].id, text[h.start : h.end], h.pending) for h in scan.hits]
        cursor = scan.cursor
    return out


def rule(patterns: list[str], **kw) -> Rule:
    return Rule(id=kw.pop("id", "r"), kind=kw.pop("kind", "literal"), patterns=patterns, action=kw.pop("action", "block"), **kw)


def test_a_pattern_split_over_tokens_and_inside_a_character_matches_once() -> None:
    m = compile_rules([rule(["café bar"])])
    assert m is not None
    raw = "un café bar".encode()
    one_byte_each = [raw[i : i + 1] for i in range(len(raw))]  # é is split in two
    # the last byte brings it, pending since it ends the text so far; nothing repeats it
    assert hits(m, one_byte_each) == [("r", "café bar".encode(), True)]
    assert stream(m, one_byte_each) == [("r", 3, 12)]


@pytest.mark.parametrize(
    "text",
    ["BOMB", "Ｂｏｍｂ", "b\u200bomb", "bo\u200dmb", "bo\u00admb", "ｂ\u200bＯ\u200cｍ\ufeffｂ"],
    ids=["case", "full-width", "zero-width-space", "zero-width-joiner", "soft-hyphen", "all-at-once"],
)
def test_obfuscated_variants_are_caught_with_normalize_and_not_without(text: str) -> None:
    raw = text.encode()
    tokens = [raw[i : i + 2] for i in range(0, len(raw), 2)]  # splits characters too
    with_norm = compile_rules([rule(["bomb"], normalize=True)])
    plain = compile_rules([rule(["bomb"])])
    assert with_norm is not None and plain is not None
    assert stream(with_norm, tokens) == [("r", 0, len(raw))]
    assert stream(plain, tokens) == []


def test_case_insensitive_catches_case_only() -> None:
    m = compile_rules([rule(["bomb"], case_insensitive=True)])
    assert m is not None
    assert stream(m, [b"a BoMb"]) == [("r", 2, 6)]
    assert stream(m, ["Ｂｏｍｂ".encode()]) == []


def test_whole_word_waits_for_the_next_character_and_block_counts_the_pending_match() -> None:
    m = compile_rules([rule(["kill"], whole_word=True)])
    assert m is not None
    # " kill" ends the text so far: pending, which a block rule refuses
    assert hits(m, [b"I", b" kill"]) == [("r", b"kill", True)]
    # "skill" and "killer" are not the word
    assert stream(m, [b"skill", b" killer"]) == []
    assert stream(m, [b"kill", b"er kill", b"."]) == [("r", 7, 11)]  # "killer kill."


def test_regex_rules_match_across_tokens_with_their_span() -> None:
    m = compile_rules([rule([r"\d{3}-\d{2}-\d{4}"], kind="regex", action="halt", id="ssn")])
    assert m is not None
    assert stream(m, [b"id 12", b"3-4", b"5-67", b"89 ok"]) == [("ssn", 3, 14)]


def test_a_long_generation_keeps_a_bounded_window() -> None:
    m = compile_rules([rule(["needle"])])
    assert m is not None
    cursor = m.empty
    for _ in range(5000):
        cursor = m.scan(cursor, b" hay").cursor
    assert max(len(w.buf) for w in cursor.windows) < 300
    scan = m.scan(m.scan(cursor, b" need").cursor, b"le")
    assert [(h.start, h.end) for h in scan.hits] == [(20001, 20007)]


# -- compilation errors name the rule and the field ------------------------------------------


@pytest.mark.parametrize(
    "r, message",
    [
        (rule(["(unclosed"], kind="regex", id="bad-rx"), r"rules\[0\] \(id 'bad-rx'\)\.patterns\[0\]: not a regular expression"),
        (rule(["a", "x?"], kind="regex", id="empty"), r"rules\[0\] \(id 'empty'\)\.patterns\[1\]: the regex can match the empty"),
        (rule(["a", r"(a)\1"], kind="regex", id="hs"), r"rules\[0\] \(id 'hs'\)\.patterns\[1\]: invalid regular expression"),
        (
            rule(["a.*b"], kind="regex", id="unb"),
            rf"\(id 'unb'\)\.patterns\[0\]: .* more than {MAX_MATCH_CHARS}",
        ),
        (rule(["\u200b\u200d"], normalize=True, id="zw"), r"\(id 'zw'\)\.patterns\[0\]: the pattern is empty once normalized"),
    ],
)
def test_a_rule_that_cannot_compile_is_named_with_its_field(r: Rule, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compile_rules([r])


def test_actions_compile_to_their_redo_action() -> None:
    m = compile_rules([rule(["a"], action=a, id=a) for a in ("block", "halt", "flag")])
    assert m is not None
    assert [r.action for r in m.rules] == [Action.BLOCK, Action.HALT, Action.FLAG]
