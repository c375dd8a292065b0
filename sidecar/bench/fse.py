"""``fse-sidecar bench fse``: the streaming matcher against rescanning, side by side.

Over 2 000 tokens of real English text (Python's own documentation, cut by the embedded
model's tokenizer when it is installed, else by a GPT-2-style word splitter):

1. FSE: the cost of checking one token and committing it through the session's policy
   evaluator (what the step path runs), with 10 / 1 000 / 10 000 / 100 000 literal rules,
   100 000 literals under ``normalize``, and 10 / 100 / 1 000 regular expressions. The rule
   sets run in turn, round after round; ratios are medians of per-round ratios.
2. The post-hoc way (LLM Guard's BanSubstrings, NeMo's output rails): one Python ``re``
   alternation of the same rules, rescanning the whole text so far after a token, timed
   at three text lengths (a tenth, half and all of the tokens: 200, 1 000, 2 000); beside
   it, FSE's cost at the same places in the stream (median over the tenth before each).

3. Reload: the step latency of a session on a real sidecar process while a reload
   compiles 100 000 literals and 1 000 regexes in its worker thread, against the same
   steps with no reload (the claim: compilation stays off the step path).

Every rule set also holds the same five flag rules on words the text does contain, so
each run takes the hit path equally. Prints a table and writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import inspect
import random
import re
import statistics
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Rule
from ..core.evaluators import PolicyRules, Proposal
from ..core.fse import compile_rules
from ..core.guards import Sampler, TokenMetrics
from .common import machine, publish, table

LITERAL_COUNTS = (10, 1_000, 10_000, 100_000)
REGEX_COUNTS = (10, 100, 1_000)
HIT_WORDS = ("argument", "function", "default", "object", "value")  # all in the corpus
_METRICS = TokenMetrics(0, 0.0, 0.0, 0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0)
# GPT-2's pre-tokenizer without \p classes: the fallback when no model tokenizer is there
_SPLIT = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+")


def corpus_text() -> str:
    """Real prose that ships with every Python: docstrings of well-documented modules."""
    import argparse as a
    import collections
    import json as j
    import logging
    import subprocess
    import threading
    import unittest

    parts = [inspect.getdoc(m) or "" for m in (a, collections, j, logging, subprocess, threading, unittest)]
    parts += [inspect.getdoc(f) or "" for f in (a.ArgumentParser.add_argument, subprocess.run, subprocess.Popen, logging.Logger)]
    return "\n\n".join(parts)


def tokenize(text: str, n: int) -> tuple[list[bytes], str]:
    """``n`` tokens of ``text`` (repeated if short), and the tokenizer's name."""
    try:
        from llama_cpp import Llama

        from engine_adapters.llama_cpp import default_model_path

        llama = Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)
        ids = llama.tokenize(text.encode(), add_bos=False, special=False)
        pieces = [llama._model.detokenize([i], special=False) for i in ids]
        name = "SmolLM2-135M (llama.cpp)"
    except Exception:  # noqa: BLE001 - no model installed: the word splitter still gives real text
        pieces = [p.encode() for p in _SPLIT.findall(text)]
        name = "GPT-2-style word splitter"
    out: list[bytes] = []
    while len(out) < n:
        out += pieces
    return out[:n], name


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(6, 12)))


def literal_rules(n: int, normalize: bool = False) -> list[Rule]:
    rng = random.Random(n)
    words = [_word(rng) for _ in range(n)]
    banned = Rule(id="banned", kind="literal", patterns=words, action="block", normalize=normalize)
    return [banned, *_hit_rules()]


def regex_rules(n: int) -> list[Rule]:
    rng = random.Random(n)
    patterns = [rf"{_word(rng)}[ _-]?(key|token|secret)\d{{0,3}}" for _ in range(n)]
    return [Rule(id="banned-rx", kind="regex", patterns=patterns, action="block"), *_hit_rules()]


def _hit_rules() -> list[Rule]:
    return [Rule(id=f"hit-{w}", kind="literal", patterns=[w], action="flag") for w in HIT_WORDS]


def alternation(rules: Sequence[Rule]) -> re.Pattern[str]:
    """The same rules as one Python regex, the way post-hoc scanners compile them."""
    alts = [re.escape(p) if r.kind == "literal" else p for r in rules for p in r.patterns]
    return re.compile("|".join(alts), re.IGNORECASE if any(r.normalize for r in rules) else 0)


@dataclass
class _Case:
    name: str
    rules: list[Rule]
    compile_s: float = 0.0
    per_token_ns: list[list[int]] | None = None  # per round, per token


def _stream(matcher: Any, tokens: list[bytes]) -> list[int]:
    ev = PolicyRules(matcher, tokens)
    times = []
    clock = time.perf_counter_ns
    for i in range(len(tokens)):
        p = Proposal(i, Sampler.NORMAL, _METRICS, i, i)
        t0 = clock()
        ev.check(p)
        ev.commit(p)
        times.append(clock() - t0)
    return times


def _med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def positions(n_tokens: int) -> tuple[int, int, int]:
    return max(n_tokens // 10, 1), max(n_tokens // 2, 1), n_tokens


def bench_fse(n_tokens: int, rounds: int, rescan_reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    pos = positions(n_tokens)
    seg = pos[0]
    text = corpus_text()
    tokens, tokenizer = tokenize(text, n_tokens)
    cases = [_Case(f"{n} literals", literal_rules(n)) for n in LITERAL_COUNTS]
    cases.append(_Case(f"{LITERAL_COUNTS[-1]} literals, normalize", literal_rules(LITERAL_COUNTS[-1], normalize=True)))
    cases += [_Case(f"{n} regexes", regex_rules(n)) for n in REGEX_COUNTS]
    matchers = {}
    for c in cases:
        t0 = time.perf_counter()
        matchers[c.name] = compile_rules(c.rules)
        c.compile_s = time.perf_counter() - t0
        c.per_token_ns = []
        log(f"  compiled {c.name} in {c.compile_s:.2f} s")
    for r in range(rounds):  # every rule set once per round, in turn
        for c in cases:
            assert c.per_token_ns is not None
            c.per_token_ns.append(_stream(matchers[c.name], tokens))
        log(f"  FSE round {r + 1}/{rounds}")

    rows: list[dict[str, Any]] = []
    base = cases[0]
    assert base.per_token_ns is not None
    for c in cases:
        assert c.per_token_ns is not None
        means = [sum(run) / len(run) for run in c.per_token_ns]
        base_means = [sum(run) / len(run) for run in base.per_token_ns]
        at = {str(p): _med([t for run in c.per_token_ns for t in run[p - seg : p]]) / 1e3 for p in pos}
        rows.append(
            {
                "rules": c.name,
                "compile_s": c.compile_s,
                "fse_us_per_token_median": _med([t for run in c.per_token_ns for t in run]) / 1e3,
                "fse_us_per_token_mean": _med(means) / 1e3,
                "fse_over_10_literals_median": _med([a / b for a, b in zip(means, base_means, strict=True)]),
                "fse_us_at_token": at,
                "fse_last_over_first_segment": at[str(pos[-1])] / at[str(pos[0])],
            }
        )
    # the post-hoc way, at three text lengths; FSE's figure at the same places is above
    for c, row in zip(cases, rows, strict=True):
        t0 = time.perf_counter()
        rx = alternation(c.rules)
        row["rescan_compile_s"] = time.perf_counter() - t0
        row["rescan_us_at_token"] = {}
        for p in pos:
            so_far = b"".join(tokens[:p]).decode("utf-8", "replace")
            reps = []
            for _ in range(rescan_reps):
                t1 = time.perf_counter_ns()
                for _m in rx.finditer(so_far):
                    pass
                reps.append(time.perf_counter_ns() - t1)
            row["rescan_us_at_token"][str(p)] = _med(reps) / 1e3
        rs = row["rescan_us_at_token"]
        row["rescan_last_over_first"] = rs[str(pos[-1])] / rs[str(pos[0])]
        row["rescan_over_fse_at_last"] = rs[str(pos[-1])] / row["fse_us_at_token"][str(pos[-1])]
        log(f"  rescan {c.name}")
    return {
        "tokens": n_tokens,
        "text_bytes": sum(len(t) for t in tokens),
        "tokenizer": tokenizer,
        "rounds": rounds,
        "rescan_reps": rescan_reps,
        "positions": list(pos),
        "rows": rows,
    }


def _timed_steps(session: Any, base: Any, steps: int, stop: Callable[[], bool]) -> dict[str, float]:
    """Steps whose greedy token walks the vocabulary (no loop for the loop guard to see)."""
    import numpy as np

    lat = []
    for i in range(steps):
        row = base.copy()
        row[(i * 7919) % row.shape[0]] = 20.0  # a confident model: the guards pass
        t0 = time.perf_counter()
        session.step(row)
        lat.append(time.perf_counter() - t0)
        if stop():
            break
    us = np.asarray(lat) * 1e6
    return {"steps": len(lat), "p50_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)), "max_us": float(us.max())}


def bench_reload(log: Callable[[str], None], steps: int = 2000) -> dict[str, Any]:
    """Step latency during a big reload against idle, on a sidecar in its own process."""
    import tempfile
    import threading

    import numpy as np
    import yaml

    from engine_adapters.client import GuardClient

    from ..core.sampling import SamplingParams
    from ..launch import start_local_sidecar

    rules = literal_rules(LITERAL_COUNTS[-1]) + regex_rules(1_000)[:1]  # the hit rules once
    vocab = [f"<{i}>".encode() for i in range(32_000)]
    base = np.random.default_rng(0).standard_normal(len(vocab)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="fse-bench-reload-") as tmp:
        sc = start_local_sidecar(Path(tmp))
        try:
            client = GuardClient(sc.target, sc.public_key, step_timeout=10.0, rpc_timeout=120.0)
            client.wait_ready(timeout=30)
            digest = client.register_vocabulary(vocab)
            cfg = yaml.safe_load(sc.config.read_text())
            cfg["policies"] = {"default": {"rules": [r.model_dump() for r in rules]}}
            sc.config.write_text(yaml.safe_dump(cfg))

            session = client.open_session(digest, SamplingParams())
            idle = _timed_steps(session, base, steps, lambda: False)
            session.close()

            took: list[float] = []

            def reload() -> None:
                t0 = time.perf_counter()
                client.reload_policy()
                took.append(time.perf_counter() - t0)

            session = client.open_session(digest, SamplingParams())
            th = threading.Thread(target=reload)
            th.start()
            during = _timed_steps(session, base, steps * 100, lambda: bool(took))
            th.join()
            session.close()
            client.close()
            log("  reload bench done")
        finally:
            sc.stop()
    return {"idle": idle, "reloading": during, "reload_s": took[0]}


def render_fse(result: dict[str, Any]) -> str:
    """The matcher's table, from the "fse" part of the JSON."""
    first, middle, last = result["positions"]
    return table(
        f"FSE: check + commit one token (µs), {result['tokens']} tokens ({result['text_bytes']} bytes, "
        f"{result['tokenizer']}), {result['rounds']} rounds; rescan = one Python re alternation over the whole text so far",
        [
            "rules",
            "compile s",
            "FSE µs/token p50",
            "vs 10 literals",
            f"FSE @{first} / @{last}",
            f"rescan µs @{first}",
            f"@{middle}",
            f"@{last}",
            "rescan / FSE @last",
        ],
        [
            [
                r["rules"],
                f"{r['compile_s']:.2f}",
                f"{r['fse_us_per_token_median']:.2f}",
                f"{r['fse_over_10_literals_median']:.2f}x",
                f"{r['fse_us_at_token'][str(first)]:.2f} / {r['fse_us_at_token'][str(last)]:.2f}",
                *(f"{r['rescan_us_at_token'][str(p)]:.0f}" for p in result["positions"]),
                f"{r['rescan_over_fse_at_last']:.0f}x",
            ]
            for r in result["rows"]
        ],
    )


def render(result: dict[str, Any]) -> str:
    """What ``run_fse_bench`` prints, from its JSON."""
    r = result["reload"]
    reload_table = table(
        f"step latency on a sidecar while ReloadPolicy compiles {LITERAL_COUNTS[-1]} literals + 1000 regexes "
        f"({r['reload_s']:.2f} s) in a child process, against idle (µs, 32k vocab, inline f32 logits)",
        ["steps", "n", "p50", "p99", "max"],
        [[k, str(r[k]["steps"]), *(f"{r[k][q]:.0f}" for q in ("p50_us", "p99_us", "max_us"))] for k in ("idle", "reloading")],
    )
    return render_fse(result["fse"]) + "\n\n" + reload_table


def run_fse_bench(args: argparse.Namespace) -> int:
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    result = {"machine": machine(), "fse": bench_fse(args.fse_tokens, args.fse_rounds, args.rescan_reps, log)}
    result["reload"] = bench_reload(log)
    return publish(result, args.out, "fse", render)
