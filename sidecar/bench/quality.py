"""``fse-sidecar bench quality``: does the default policy protect a user who changes nothing?

Runs the embedded SmolLM2-135M on prompt sets of our own, each run twice through a real
sidecar: under the ``default`` policy (what a user gets) and under ``off`` (every guard,
the gate, the loop guard and the drift test disabled: the same sampler, unguarded).

    healthy-greedy   healthy prompts, greedy
    healthy-t0.7     the same prompts at temperature 0.7, no top-k/top-p/min-p
    healthy-t0.7-penalty  ... with a repetition penalty of 1.1 (llama.cpp's default)
    garbage-t1.5     the same kind of prompts at temperature 1.5, no top-k/top-p/min-p
    garbage-t3.0     ... at temperature 3.0
    loop-greedy      prompts that make the model repeat itself under greedy decoding
    loop-variant-t0.4  looping prompts sampled at 0.4: the loop comes back in variants
                     (case, spacing, punctuation, token splits)
    legit-repeat     repetition that is not a loop: requested repetition, code with
                     repeated identifiers, lists and recipes, tables, counts (greedy)

Per group: runs healed or aborted within 16 tokens (of those that reached 16 tokens or
were acted on sooner), runs aborted, runs completed (not aborted, and 32 tokens or the
model's own end), stubs (ended by the guard before 16 tokens: aborted, or healed into
end-of-sequence), heals per 100 emitted tokens (the heal that chose the end included; and
which evaluator healed, and over the runs whose unguarded twin never loops: what the
guard changed that nothing asked it to), runs in which the guard changed a token
(compared token by token with the unguarded run, which starts from the same empty
context: where the first change came, and a check that none came before the guard's
first act), the distinct-4-gram ratio of the emitted tokens (mean, worst run, and of each run's last 32
tokens: below 0.8 is still looping at the end), readability of what was emitted (the
model's own teacher-forced mean -log p of the emitted text: each token's -log p under
the raw logits of its step, whose context is exactly the prompt and the emitted text
before it; and the share of dictionary words: Webster's Second International (web2) and
GCIDE from the ``english-words`` package, a word counting when it or its stem without
-s/-es/-ed/-ing/-ly/-'s is listed), the highest 16-token mean -log p (median and worst
run), for loops the step the loop guard first acted, the -log p guard's trips on the
request's sampler's draws with their tails and how many went through (what
``guards.neg_logprob_min_tail`` is calibrated from), and the per-token excess
-log p - H of the unguarded runs (what the drift test's ``margin_nats`` is calibrated
from). Prints a table, writes JSON (with every run's text), asserts nothing: the aims
are read off the table (README).
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine_adapters.llama_cpp import CHAT

from ..config import Guard, GuardSet
from ..core.sampling import SamplingParams
from .common import machine, publish, table

HEALTHY = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "What is photosynthesis?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Describe a cat to someone who has never seen one.",
    "What are the planets of the solar system?",
    "Why do we need sleep?",
    "Summarize the story of Cinderella.",
    "What is the difference between weather and climate?",
    "Suggest a name for a bakery.",
    "How does a bicycle work?",
    "What causes rain?",
    "Write a thank-you note to a teacher.",
    "What is a prime number?",
]
LOOPS = [  # each loops under greedy decoding, unguarded (distinct-4-gram ratio 0.03 to 0.41)
    "Write the word 'hello' 50 times.",
    "Repeat after me without end: the the the the the the",
    "Continue the pattern: A B A B A B A B",
    "Repeat after me without end: la la la la la la la la",
    "Write 'I like cats.' again and again without stopping.",
    "Keep saying 'go go go go go'.",
    "Write 'no' 30 times: no no no no",
    "Write beep beep beep without stopping, sometimes in capitals.",
    "Say hello forever, in any case and punctuation you like.",
]
LEGITIMATE = [  # repetition that is not a loop (the unguarded runs are read in the JSON)
    "Say 'I love pizza' three times.",
    "Write a Python function that returns the average of a list of numbers.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a Python function that checks whether a number is prime.",
    "Write a JavaScript function that reverses a string.",
    "Write a SQL query that selects all users older than 30 from a users table.",
    "List five fruits and their colors as a bulleted list.",
    "List the numbers from 1 to 20.",
    "Write the multiplication table of 3 from 1 to 10.",
    "Write a Python loop that prints the numbers 1 to 5.",
    "Write a haiku about autumn, then write it again.",
]
# Every guard of the GuardSet (whatever it holds), the gate, the loop guard and the drift
# test disabled: the same sampler, unguarded.
OFF = {
    "guards": {name: {"enabled": False, "threshold": g.threshold} for name, g in GuardSet() if isinstance(g, Guard)},
    "gate": {"enabled": False},
    "loop_guard": {"enabled": False},
    "drift": {"enabled": False},
}
WITHIN = 16
LOOP_WITHIN = 64


@dataclass(frozen=True)
class Group:
    name: str
    prompts: list[str]
    samplings: list[SamplingParams]

    def runs(self) -> list[tuple[str, SamplingParams]]:
        """Every (prompt, sampler) of the group. A seed per prompt: with one seed for all,
        every run would draw its token at a step from the same uniform number, and one
        number near 1 (a far-tail draw) would land on every run at once."""
        return [
            (prompt, base if base.greedy else replace(base, seed=base.seed + 1000 * i))
            for i, prompt in enumerate(self.prompts)
            for base in self.samplings
        ]


def groups(n_healthy: int, n_garbage: int, n_loops: int, n_legit: int) -> list[Group]:
    healthy, garbage = HEALTHY[:n_healthy], HEALTHY[:n_garbage]
    every = [
        Group("healthy-greedy", healthy, [SamplingParams()]),
        Group("healthy-t0.7", healthy, [SamplingParams(temperature=0.7, seed=1)]),
        # with llama.cpp's default repetition penalty, which the drift test's margin must allow
        Group("healthy-t0.7-penalty", healthy, [SamplingParams(temperature=0.7, seed=2, repetition_penalty=1.1)]),
        Group("garbage-t1.5", garbage, [SamplingParams(temperature=1.5, seed=3)]),
        Group("garbage-t3.0", garbage, [SamplingParams(temperature=3.0, seed=4)]),
        Group("loop-greedy", LOOPS[:n_loops], [SamplingParams()]),
        Group("loop-variant-t0.4", LOOPS[:n_loops], [SamplingParams(temperature=0.4, seed=5)]),
        Group("legit-repeat", LEGITIMATE[:n_legit], [SamplingParams()]),
    ]
    return [g for g in every if g.prompts]  # --healthy 0 etc. leave a group out


COMPLETE = 32  # a complete answer: not aborted, and at least this many tokens (or the model's own end)
# Looping: some LOOP_SPAN tokens in a row whose distinct-4 ratio is below LOOPING (issue 29's measure).
LOOP_SPAN = 32
LOOPING = 0.8


@dataclass
class Run:
    tokens: int
    aborted: bool
    ended: str  # "abort", "eos" (the model's own end), "guard_eos" (a heal chose the end) or "length"
    first_action: int | None  # first step HEALED or ABORT
    first_touch: int | None  # first step HEALED, drawn by the strict sampler, or ABORT
    heals: int
    loop_step: int | None  # first step where the loop guard acted
    distinct4: float
    distinct4_last32: float
    max_window_nlp: float
    mean_nlp: float  # teacher-forced mean -log p of the emitted text
    dictionary_share: float
    text: str
    ids: list[int] = field(default_factory=list)  # the emitted token ids
    heal_causes: dict[str, int] = field(default_factory=dict)  # reason code -> heals it caused
    excess: list[float] = field(default_factory=list)  # -log p - H per emitted token
    # the -log p guard's trips on the request's sampler's draws: (the draw's tail, let through?)
    far_tail: list[tuple[float, bool]] = field(default_factory=list)
    loop_start: int | None = None  # the first of LOOP_SPAN tokens in a row that loop (distinct-4 below LOOPING)
    # where the unguarded run of the same prompt and sampler starts looping (set by the caller)
    twin_loop_start: int | None = None
    # the first step whose token differs from the unguarded run's (set by the caller; None:
    # the same tokens, and the same end)
    changed_at: int | None = None

    @property
    def twin_loops(self) -> bool:
        return self.twin_loop_start is not None


@functools.cache
def dictionary() -> frozenset[str]:
    try:
        from english_words import get_english_words_set
    except ImportError:  # pragma: no cover - a dev extra
        raise SystemExit("bench quality needs the english-words package: pip install -e '.[dev]'") from None
    return frozenset(get_english_words_set(["web2", "gcide"], lower=True, alpha=True))


_SUFFIXES = ("'s", "s", "es", "ed", "d", "ing", "ly")


def dictionary_share(text: str) -> float:
    """The share of the words of ``text`` (runs of ASCII letters) that the dictionary lists."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]+(?:'s)?", text)]
    if not words:
        return 1.0
    known = dictionary()

    def listed(w: str) -> bool:
        return w in known or any(w.endswith(x) and w[: -len(x)] in known for x in _SUFFIXES)

    return sum(map(listed, words)) / len(words)


def distinct_ratio(ids: list[int], n: int = 4) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def max_window_mean(xs: list[float], w: int = WITHIN) -> float:
    if not xs:
        return 0.0
    if len(xs) <= w:
        return sum(xs) / len(xs)
    return max(sum(xs[i : i + w]) / w for i in range(len(xs) - w + 1))


def one_run(guarded: Any, prompt: str, sampling: SamplingParams, policy: str, max_tokens: int) -> Run:
    from sidecar._pb.fse.v1 import guard_pb2 as pb
    from sidecar.errors import GuardAbort

    done = guarded.complete(CHAT.format(prompt), max_tokens=max_tokens, sampling=sampling, policy=policy)
    if done.error is not None and not isinstance(done.error, GuardAbort):
        raise done.error
    abort = done.error if isinstance(done.error, GuardAbort) else None
    aborted = abort is not None
    # every verdict of the run, the one that chose end-of-sequence included (a heal that
    # ends the answer yields no token, but it is the guard's act all the same)
    verdicts = done.verdicts
    healed = [v.step for v in verdicts if v.decision == pb.DECISION_HEALED]
    actions = healed + ([len(done.tokens)] if aborted else [])
    # the first step the guard could have changed: a heal, a token of the strict sampler (a
    # band), or the abort; the twin's tokens must be the same before it
    touched = [v.step for v in verdicts if v.decision != pb.DECISION_ACCEPT or v.sampler != pb.SAMPLER_NORMAL]
    loop_steps = [v.step for v in verdicts if any(r.code == "loop" for r in v.reasons)]
    if abort is not None and any(r.code == "loop" for r in abort.reasons):
        loop_steps.append(len(done.tokens))
    m = [t.verdict.metrics for t in done.tokens]
    causes: dict[str, int] = {}
    for v in verdicts:
        if v.decision == pb.DECISION_HEALED:
            for code in {r.code for r in v.reasons}:
                causes[code] = causes.get(code, 0) + 1
    far_tail = [
        (float(tail.group(1)), r.action == pb.ACTION_FLAG)
        for v in verdicts
        for r in v.reasons
        if r.code == "neg_logprob" and r.sampler == pb.SAMPLER_NORMAL and (tail := _TAIL.search(r.detail))
    ]
    text = b"".join(t.text for t in done.tokens).decode(errors="replace")
    nlp = [x.neg_logprob_nats for x in m]
    ids = done.token_ids
    windows = [distinct_ratio(ids[i : i + LOOP_SPAN]) for i in range(max(len(ids) - LOOP_SPAN + 1, 1))]
    return Run(
        tokens=len(done.tokens),
        aborted=aborted,
        ended=_ended(done, max_tokens),
        first_action=min(actions) if actions else None,
        first_touch=min(touched + ([len(done.tokens)] if aborted else []), default=None),
        heals=len(healed),
        loop_step=min(loop_steps) if loop_steps else None,
        distinct4=distinct_ratio(done.token_ids),
        distinct4_last32=distinct_ratio(done.token_ids[-LOOP_SPAN:]),
        loop_start=next((i for i, d in enumerate(windows) if d < LOOPING), None) if len(ids) >= LOOP_SPAN else None,
        max_window_nlp=max_window_mean(nlp),
        mean_nlp=statistics.fmean(nlp) if nlp else 0.0,
        dictionary_share=dictionary_share(text),
        text=text,
        ids=list(ids),
        heal_causes=causes,
        excess=[x.neg_logprob_nats - x.entropy_nats for x in m],
        far_tail=far_tail,
    )


_TAIL = re.compile(r"the sampler's tail was ([0-9.e+-]+)")  # the -log p trip's detail (sidecar.core.guards)


def _ended(done: Any, max_tokens: int) -> str:
    from sidecar._pb.fse.v1 import guard_pb2 as pb

    if done.error is not None:
        return "abort"
    if done.end is not None:
        return "guard_eos" if done.end.decision == pb.DECISION_HEALED else "eos"
    return "length" if len(done.tokens) >= max_tokens else "eos"


def first_difference(mine: Run, theirs: Run) -> int | None:
    """The first step whose token (or end) differs between two runs of one prompt and
    sampler; None when they emitted the same tokens and ended the same way. Exact: every
    run starts from an empty llama.cpp context, and the sidecar's sampler is a pure
    function of the row, the history, the seed and the step."""
    n = min(len(mine.ids), len(theirs.ids))
    i = next((i for i in range(n) if mine.ids[i] != theirs.ids[i]), None)
    if i is None and (len(mine.ids) != len(theirs.ids) or mine.ended != theirs.ended):
        i = n
    return i


def _caught(r: Run) -> bool:
    """The loop guard acted within LOOP_WITHIN tokens of where the unguarded twin's loop starts."""
    return r.loop_step is not None and r.twin_loop_start is not None and r.loop_step < r.twin_loop_start + LOOP_WITHIN


def summarize(runs: list[Run]) -> dict[str, Any]:
    n = len(runs)
    emitted = sum(r.tokens for r in runs)
    excess_means = [statistics.fmean(r.excess) for r in runs if r.excess]
    looping = [r for r in runs if r.twin_loops]
    return {
        "runs": n,
        # of the runs that reached 16 tokens or were acted on before (a run that ended
        # cleanly sooner, "The capital of France is Paris.", had nothing to act on)
        "acted_within_16": sum(1 for r in runs if r.first_action is not None and r.first_action < WITHIN)
        / max(sum(1 for r in runs if r.tokens >= WITHIN or (r.first_action is not None and r.first_action < WITHIN)), 1),
        "aborted": sum(r.aborted for r in runs) / n,
        # a whole answer: not aborted, and at least COMPLETE tokens or the model's own end
        "completed": sum(1 for r in runs if not r.aborted and (r.tokens >= COMPLETE or r.ended == "eos")) / n,
        # an answer cut off early: aborted before WITHIN tokens ("The sky", then ABORT)
        # ended by the guard (an abort, or a heal that chose end-of-sequence) before WITHIN tokens
        "stubs": sum(1 for r in runs if r.ended in ("abort", "guard_eos") and r.tokens < WITHIN) / n,
        "heals_per_100_tokens": 100.0 * sum(r.heals for r in runs) / max(emitted, 1),
        # heals on the runs whose unguarded twin never loops (no 32 tokens in a row with a
        # distinct-4 ratio below 0.8): what the guard changed that nothing asked it to (a
        # loop caught in healthy text is a catch, not a false heal)
        "heals_per_100_where_unguarded_does_not_loop": 100.0
        * sum(r.heals for r in runs if not r.twin_loops)
        / max(sum(r.tokens for r in runs if not r.twin_loops), 1),
        "heals_by_cause": {
            c: sum(r.heal_causes.get(c, 0) for r in runs) for c in sorted({c for r in runs for c in r.heal_causes})
        },
        # runs in which the guard healed a token or aborted (its own verdicts)
        "acted": sum(1 for r in runs if r.heals or r.aborted) / n,
        # runs whose tokens differ from the unguarded run's (compared token by token), and
        # where the first difference came; "unexplained": a difference before the guard's
        # first heal, strict-sampler token or abort (none: the comparison is like for like)
        "changed": sum(1 for r in runs if r.changed_at is not None) / n,
        "changed_at_median": statistics.median([r.changed_at for r in runs if r.changed_at is not None] or [float("nan")]),
        "changed_unexplained": sum(
            1 for r in runs if r.changed_at is not None and (r.first_touch is None or r.changed_at < r.first_touch)
        ),
        "distinct4_last32_worst": min(r.distinct4_last32 for r in runs),
        # still looping where it ended: a run that was not halted whose last 32 tokens have a
        # distinct-4 ratio below 0.8 (a halted run stopped; its end is where the loop was)
        "looping_at_end": sum(1 for r in runs if not r.aborted and r.tokens >= LOOP_SPAN and r.distinct4_last32 < LOOPING) / n,
        "mean_nlp_median": statistics.median(r.mean_nlp for r in runs),
        "mean_nlp_worst": max(r.mean_nlp for r in runs),
        "dictionary_share_median": statistics.median(r.dictionary_share for r in runs),
        "dictionary_share_worst": min(r.dictionary_share for r in runs),
        "tokens_per_run": emitted / n,
        "distinct4_mean": statistics.fmean(r.distinct4 for r in runs),
        "distinct4_worst": min(r.distinct4 for r in runs),
        "max16_nlp_median": statistics.median(r.max_window_nlp for r in runs),
        "max16_nlp_worst": max(r.max_window_nlp for r in runs),
        "loop_caught_within_64": sum(1 for r in runs if r.loop_step is not None and r.loop_step < LOOP_WITHIN) / n,
        # of the runs whose unguarded twin loops: the guard acted on a loop within 64 tokens
        # of where the twin's loop starts, or the guarded run never loops at all
        "twin_loops": len(looping),
        "loops_caught": sum(1 for r in looping if r.loop_start is None or _caught(r)),
        "loop_step_median": statistics.median([r.loop_step for r in runs if r.loop_step is not None] or [float("nan")]),
        # the -log p guard's trips on the request's sampler's draws, and their tails (the
        # sampler's chance of a token that improbable): the calibration of neg_logprob_min_tail
        "far_tail_draws": sum(len(r.far_tail) for r in runs),
        "far_tail_let_through": sum(flag for r in runs for _, flag in r.far_tail),
        "far_tail_tail_min": min((t for r in runs for t, _ in r.far_tail), default=None),
        "far_tail_tail_median": statistics.median([t for r in runs for t, _ in r.far_tail] or [float("nan")]),
        "far_tail_tail_max": max((t for r in runs for t, _ in r.far_tail), default=None),
        "excess_per_token_mean": statistics.fmean(excess_means) if excess_means else 0.0,
        "excess_per_token_worst_run": max(excess_means) if excess_means else 0.0,
    }


def bench_quality(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from engine_adapters.client import GuardClient
    from engine_adapters.llama_cpp import GuardedLlama, load_llama

    from ..launch import start_local_sidecar

    config: dict[str, Any] = {"policies": {"default": {}, "off": OFF}}
    if args.config:
        import yaml

        config = yaml.safe_load(args.config.read_text()) or {}
        config.setdefault("policies", {}).setdefault("default", {})
        config["policies"]["off"] = OFF
    result: dict[str, Any] = {"machine": machine(), "max_tokens": args.max_tokens, "groups": {}}
    with tempfile.TemporaryDirectory(prefix="fse-bench-quality-") as tmp:
        sc = start_local_sidecar(Path(tmp), config)
        try:
            client = GuardClient(sc.target, sc.public_key, step_timeout=10.0)
            client.wait_ready(timeout=30)
            llama = load_llama()
            t0 = time.perf_counter()
            with GuardedLlama(llama, client) as guarded:
                for g in groups(args.healthy, args.garbage, args.loops, args.legit):
                    runs: dict[str, list[Run]] = {"guarded": [], "unguarded": []}
                    texts = []
                    for prompt, sampling in g.runs():
                        for label, policy in (("guarded", "default"), ("unguarded", "off")):
                            # an empty context for every run: a prompt evaluated after its twin
                            # reuses its KV entries and gets logits a rounding apart from a
                            # fresh evaluation, and greedy decoding follows near-ties either way
                            llama.reset()
                            runs[label].append(one_run(guarded, prompt, sampling, policy, args.max_tokens))
                        mine, theirs = runs["guarded"][-1], runs["unguarded"][-1]
                        mine.twin_loop_start = theirs.loop_start
                        mine.changed_at = first_difference(mine, theirs)
                        texts.append(
                            {"prompt": prompt, "sampling": repr(sampling), "guarded": mine.text, "unguarded": theirs.text}
                        )
                    result["groups"][g.name] = {k: summarize(v) for k, v in runs.items()} | {"texts": texts}
                    log(f"  {g.name}: {len(runs['guarded'])} runs each ({time.perf_counter() - t0:.0f} s)")
            client.close()
        finally:
            sc.stop()
    return result


def _changed(s: dict[str, Any]) -> str:
    at = s["changed_at_median"]
    return f"{s['changed']:.0%}" + ("" if math.isnan(at) else f" ({at:.0f})")


def render(result: dict[str, Any]) -> str:
    """The table ``run_quality_bench`` prints, from its JSON."""
    rows = []
    for name, by in result["groups"].items():
        for label in ("guarded", "unguarded"):
            s = by[label]
            # not for legitimate repetition: there the twin's "loop" is what the prompt asked for
            shown = label == "guarded" and s["twin_loops"] and not name.startswith("legit")
            loop = f"{s['loops_caught']} of {s['twin_loops']}" if shown else ""
            rows.append(
                [
                    name,
                    label,
                    str(s["runs"]),
                    f"{s['acted_within_16']:.0%}",
                    f"{s['aborted']:.0%}",
                    f"{s['completed']:.0%}",
                    f"{s['stubs']:.0%}",
                    f"{s['heals_per_100_tokens']:.2f}",
                    f"{s['heals_per_100_where_unguarded_does_not_loop']:.2f}" if label == "guarded" else "",
                    _changed(s) if label == "guarded" else "",
                    f"{s['tokens_per_run']:.0f}",
                    f"{s['distinct4_mean']:.2f} / {s['distinct4_worst']:.2f}",
                    f"{s['looping_at_end']:.0%}",
                    f"{s['mean_nlp_median']:.2f} / {s['mean_nlp_worst']:.2f}",
                    f"{s['dictionary_share_median']:.0%} / {s['dictionary_share_worst']:.0%}",
                    f"{s['max16_nlp_median']:.2f} / {s['max16_nlp_worst']:.2f}",
                    loop,
                    f"{s['excess_per_token_mean']:+.2f} / {s['excess_per_token_worst_run']:+.2f}",
                ]
            )
    out = [
        table(
            f"quality: SmolLM2-135M, up to {result['max_tokens']} tokens a run, default policy against everything off",
            [
                "group",
                "policy",
                "runs",
                "acted <16",
                "aborted",
                "completed",
                "stubs",
                "heals/100",
                "heals/100 not looping",
                "changed (first step med)",
                "tokens",
                "distinct-4 mean / worst",
                "looping at end",
                "mean -log p med / worst",
                "dictionary words med / worst",
                "max 16-tok -log p med / worst",
                "twin's loops caught <64",
                "-log p - H mean / worst",
            ],
            rows,
        )
    ]
    odd = {name: n for name, by in result["groups"].items() if (n := by["guarded"]["changed_unexplained"])}
    if odd:  # the comparison is not like for like: the "changed" column is not the guard's doing alone
        out.append(f"\nWARNING: tokens differ from the unguarded run before the guard acted: {odd}")
    causes = {name: by["guarded"]["heals_by_cause"] for name, by in result["groups"].items() if by["guarded"]["heals_by_cause"]}
    if causes:
        out.append("\nheals by cause (guarded): " + "; ".join(f"{g}: {c}" for g, c in causes.items()))
    tails = [
        f"{name}: {s['far_tail_draws']}, let through {s['far_tail_let_through']}, tail min {s['far_tail_tail_min']:.2g} "
        f"/ median {s['far_tail_tail_median']:.2g} / max {s['far_tail_tail_max']:.2g}"
        for name, by in result["groups"].items()
        if (s := by["guarded"]).get("far_tail_draws")
    ]
    if tails:
        out.append("far-tail draws (the -log p guard's trips on the request's sampler; guarded): " + "; ".join(tails))
    return "\n".join(out)


def run_quality_bench(args: argparse.Namespace) -> int:
    result = bench_quality(args, lambda m: print(m, file=sys.stderr))
    return publish(result, args.out, "quality", render)
