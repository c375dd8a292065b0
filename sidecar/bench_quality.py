"""``fse-sidecar bench quality``: does the default policy protect a user who changes nothing?

Runs the embedded SmolLM2-135M on prompt sets of our own, each run twice through a real
sidecar: under the ``default`` policy (what a user gets) and under ``off`` (every guard,
the gate, the loop guard and the drift test disabled: the same sampler, unguarded).

    healthy-greedy   healthy prompts, greedy
    healthy-t0.7     the same prompts at temperature 0.7 (two seeds, the second with a
                     repetition penalty of 1.1), no top-k/top-p/min-p
    garbage-t1.5     the same kind of prompts at temperature 1.5, no top-k/top-p/min-p
    garbage-t3.0     ... at temperature 3.0
    loop-greedy      prompts that make the model repeat itself under greedy decoding

Per group: runs healed or aborted within 16 tokens (of those that reached 16 tokens or
were acted on sooner), runs aborted, runs completed (not aborted, and 32 tokens or the
model's own end), stubs (aborted before 16 tokens), heals per 100 emitted
tokens, the distinct-4-gram ratio of the emitted tokens (mean, and the worst run), the
highest 16-token mean -log p of the emitted text (median and worst run), for loops the
step the loop guard first acted, and the per-token excess -log p - H of the unguarded
runs (what the drift test's ``margin_nats`` is calibrated from). Prints a table, writes
JSON, asserts nothing: the aims are read off the table (README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_adapters.llama_cpp import CHAT

from .bench import _table
from .config import Guard, GuardSet
from .core.sampling import SamplingParams

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


def groups(n_healthy: int, n_garbage: int, n_loops: int) -> list[Group]:
    healthy, garbage = HEALTHY[:n_healthy], HEALTHY[:n_garbage]
    return [
        Group("healthy-greedy", healthy, [SamplingParams()]),
        Group(  # the second with a repetition penalty, which the drift test's margin must allow
            "healthy-t0.7",
            healthy,
            [SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0.7, seed=2, repetition_penalty=1.1)],
        ),
        Group("garbage-t1.5", garbage, [SamplingParams(temperature=1.5, seed=3)]),
        Group("garbage-t3.0", garbage, [SamplingParams(temperature=3.0, seed=4)]),
        Group("loop-greedy", LOOPS[:n_loops], [SamplingParams()]),
    ]


COMPLETE = 32  # a complete answer: not aborted, and at least this many tokens (or the model's own end)


@dataclass
class Run:
    tokens: int
    aborted: bool
    ended: str  # "abort", "eos" (the model's own end) or "length"
    first_action: int | None  # first step HEALED or ABORT
    heals: int
    loop_step: int | None  # first step where the loop guard acted
    distinct4: float
    max_window_nlp: float
    excess: list[float] = field(default_factory=list)  # -log p - H per emitted token


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
    healed = [t.step for t in done.tokens if t.verdict.decision == pb.DECISION_HEALED]
    actions = healed + ([len(done.tokens)] if aborted else [])
    loop_steps = [t.step for t in done.tokens if any(r.code == "loop" for r in t.verdict.reasons)]
    if abort is not None and any(r.code == "loop" for r in abort.reasons):
        loop_steps.append(len(done.tokens))
    m = [t.verdict.metrics for t in done.tokens]
    return Run(
        tokens=len(done.tokens),
        aborted=aborted,
        ended="abort" if aborted else ("length" if len(done.tokens) >= max_tokens else "eos"),
        first_action=min(actions) if actions else None,
        heals=len(healed),
        loop_step=min(loop_steps) if loop_steps else None,
        distinct4=distinct_ratio(done.token_ids),
        max_window_nlp=max_window_mean([x.neg_logprob_nats for x in m]),
        excess=[x.neg_logprob_nats - x.entropy_nats for x in m],
    )


def summarize(runs: list[Run]) -> dict[str, Any]:
    n = len(runs)
    emitted = sum(r.tokens for r in runs)
    excess_means = [statistics.fmean(r.excess) for r in runs if r.excess]
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
        "stubs": sum(1 for r in runs if r.aborted and r.tokens < WITHIN) / n,
        "heals_per_100_tokens": 100.0 * sum(r.heals for r in runs) / max(emitted, 1),
        "tokens_per_run": emitted / n,
        "distinct4_mean": statistics.fmean(r.distinct4 for r in runs),
        "distinct4_worst": min(r.distinct4 for r in runs),
        "max16_nlp_median": statistics.median(r.max_window_nlp for r in runs),
        "max16_nlp_worst": max(r.max_window_nlp for r in runs),
        "loop_caught_within_64": sum(1 for r in runs if r.loop_step is not None and r.loop_step < LOOP_WITHIN) / n,
        "loop_step_median": statistics.median([r.loop_step for r in runs if r.loop_step is not None] or [float("nan")]),
        "excess_per_token_mean": statistics.fmean(excess_means) if excess_means else 0.0,
        "excess_per_token_worst_run": max(excess_means) if excess_means else 0.0,
    }


def bench_quality(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from engine_adapters.client import GuardClient
    from engine_adapters.llama_cpp import GuardedLlama, load_llama

    from .launch import start_local_sidecar

    config: dict[str, Any] = {"policies": {"default": {}, "off": OFF}}
    if args.config:
        import yaml

        config = yaml.safe_load(args.config.read_text()) or {}
        config.setdefault("policies", {}).setdefault("default", {})
        config["policies"]["off"] = OFF
    result: dict[str, Any] = {"max_tokens": args.max_tokens, "groups": {}}
    with tempfile.TemporaryDirectory(prefix="fse-bench-quality-") as tmp:
        sc = start_local_sidecar(Path(tmp), config)
        try:
            client = GuardClient(sc.target, sc.public_key, step_timeout=10.0)
            client.wait_ready(timeout=30)
            llama = load_llama()
            t0 = time.perf_counter()
            with GuardedLlama(llama, client) as guarded:
                for g in groups(args.healthy, args.garbage, args.loops):
                    runs: dict[str, list[Run]] = {"guarded": [], "unguarded": []}
                    for prompt in g.prompts:
                        for sampling in g.samplings:
                            for label, policy in (("guarded", "default"), ("unguarded", "off")):
                                runs[label].append(one_run(guarded, prompt, sampling, policy, args.max_tokens))
                    result["groups"][g.name] = {k: summarize(v) for k, v in runs.items()}
                    log(f"  {g.name}: {len(runs['guarded'])} runs each ({time.perf_counter() - t0:.0f} s)")
            client.close()
        finally:
            sc.stop()
    return result


def print_quality(result: dict[str, Any]) -> None:
    rows = []
    for name, by in result["groups"].items():
        for label in ("guarded", "unguarded"):
            s = by[label]
            loop = f"{s['loop_caught_within_64']:.0%} (step {s['loop_step_median']:.0f})" if name.startswith("loop") else ""
            rows.append(
                [
                    name,
                    label,
                    str(s["runs"]),
                    f"{s['acted_within_16']:.0%}",
                    f"{s['aborted']:.0%}",
                    f"{s['completed']:.0%}",
                    f"{s['stubs']:.0%}",
                    f"{s['heals_per_100_tokens']:.1f}",
                    f"{s['tokens_per_run']:.0f}",
                    f"{s['distinct4_mean']:.2f} / {s['distinct4_worst']:.2f}",
                    f"{s['max16_nlp_median']:.2f} / {s['max16_nlp_worst']:.2f}",
                    loop,
                    f"{s['excess_per_token_mean']:+.2f} / {s['excess_per_token_worst_run']:+.2f}",
                ]
            )
    print(
        _table(
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
                "tokens",
                "distinct-4 mean / worst",
                "max 16-tok -log p med / worst",
                "loop caught <64",
                "-log p - H mean / worst",
            ],
            rows,
        )
    )


def run_quality_bench(args: argparse.Namespace) -> int:
    result = bench_quality(args, lambda m: print(m, file=sys.stderr))
    print_quality(result)
    out: Path = args.out.with_name("bench-quality.json") if args.out.name == "bench.json" else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0
