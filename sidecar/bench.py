"""``fse-sidecar bench``: every comparison measured side by side, in one run, as medians.

1. transport: the verdict round trip through the shm ring, the same with the logits
   inside the gRPC message, and a bare echo on the same kind of stream (the floor),
   interleaved round by round, at 32k and 128k vocabularies; once back to back and once
   paced like a decoding engine (a pause between steps, so threads go idle as they do
   between forward passes).
2. metrics: row_stats + candidate against one ``np.exp`` pass over the row (the memory
   floor) and a naive ``np.partition`` top-2, interleaved.
3. model: tokens/s of the real SmolLM2-135M, guarded vs unguarded, alternating runs.

Prints a table and writes JSON. No assertion here: these machines are shared and noisy,
so read the ratios, which are taken pair by pair within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._pb.fse.v1 import guard_pb2 as pb
from .launch import start_local_sidecar
from .metrics import candidate, row_stats
from .sampling import SamplingParams

SAMPLING = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=1)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _summ(xs: list[float]) -> dict[str, float]:
    return {"p50_us": _pct(xs, 50) * 1e6, "p99_us": _pct(xs, 99) * 1e6, "n": len(xs)}


def _interleave(fns: dict[str, Callable[[], object]], rounds: int, pace_s: float, warmup: int = 50) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + warmup):
        for name, fn in fns.items():
            if pace_s:
                time.sleep(pace_s)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def bench_transport(target: str, pub: Path, rounds: int, paced_rounds: int) -> list[dict[str, Any]]:
    from engine_adapters.client import GuardClient, StreamCall

    from .ring import RingWriter

    rows: list[dict[str, Any]] = []
    client = GuardClient(target, pub, step_timeout=5.0)
    client.wait_ready(30)
    rng = np.random.default_rng(0)
    for vocab in (32768, 131072):
        digest = client.register_vocabulary([i.to_bytes(4, "little") for i in range(vocab)])
        pool = [(rng.standard_normal(vocab) * 3).astype(np.float32) for _ in range(8)]
        for pace_ms, n in ((0.0, rounds), (7.0, paced_rounds)):
            with RingWriter.create(slots=2, vocab_size=vocab) as ring:
                ring_s = client.open_session(digest, SAMPLING, ring=ring)
                inline_s = client.open_session(digest, SAMPLING)
                echo = StreamCall(client._stub.Echo)
                msg = pb.EchoMessage(payload=b"\0" * 64)
                k = iter(range(1 << 62))
                t = _interleave(
                    {
                        "echo": lambda: echo.roundtrip(msg, 5.0, "echo"),
                        "ring": lambda: ring_s.step(pool[next(k) % 8]),
                        "inline": lambda: inline_s.step(pool[next(k) % 8]),
                    },
                    n,
                    pace_ms / 1e3,
                )
                echo.close()
                ring_s.close()
                inline_s.close()
            ratio = [r / e for r, e in zip(t["ring"], t["echo"], strict=True)]
            ratio_inline = [r / e for r, e in zip(t["inline"], t["echo"], strict=True)]
            rows.append(
                {
                    "vocab": vocab,
                    "pace_ms": pace_ms,
                    "echo": _summ(t["echo"]),
                    "ring": _summ(t["ring"]),
                    "inline": _summ(t["inline"]),
                    "ring_over_echo_median": statistics.median(ratio),
                    "inline_over_echo_median": statistics.median(ratio_inline),
                }
            )
    client.close()
    return rows


def bench_metrics(reps: int) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(1)
    for vocab in (32768, 49152, 131072):
        x = (rng.standard_normal(vocab) * 3).astype(np.float32)

        def metrics(x: np.ndarray = x) -> None:
            st = row_stats(x)
            candidate(x, st, 7)

        t = _interleave(
            {
                "exp_pass": lambda x=x: np.exp(x),
                "metrics": metrics,
                "partition_top2": lambda x=x: np.partition(x, x.shape[0] - 2)[-2:],
            },
            reps,
            0.0,
        )
        ratio = [m / e for m, e in zip(t["metrics"], t["exp_pass"], strict=True)]
        rows.append(
            {
                "vocab": vocab,
                "exp_pass_us": _pct(t["exp_pass"], 50) * 1e6,
                "metrics_us": _pct(t["metrics"], 50) * 1e6,
                "partition_top2_us": _pct(t["partition_top2"], 50) * 1e6,
                "metrics_over_exp_median": statistics.median(ratio),
            }
        )
    return rows


def bench_model(target: str, pub: Path, tokens: int, repeats: int) -> dict[str, Any]:
    from engine_adapters.client import GuardClient
    from engine_adapters.llama_cpp import GuardedLlama, load_llama, unguarded_greedy

    from .demo import CHAT

    llama = load_llama()
    client = GuardClient(target, pub, step_timeout=5.0)
    client.wait_ready(30)
    prompt = CHAT.format("Write a long story about a dragon who learns to paint.")
    ids = llama.tokenize(prompt.encode(), add_bos=True, special=True)
    greedy = SamplingParams(temperature=0.0)
    guarded_tps, bare_tps, same = [], [], []
    with GuardedLlama(llama, client) as g:

        def unguarded() -> list[int]:
            return unguarded_greedy(llama, ids, tokens)

        def guarded() -> list[int]:
            done = g.complete(ids, max_tokens=tokens, sampling=greedy)
            if done.error is not None:
                raise done.error
            return done.token_ids

        for i in range(repeats + 1):  # the first pair warms caches and is not counted
            llama.reset()
            t0 = time.perf_counter()
            a = unguarded()
            t1 = time.perf_counter()
            llama.reset()
            b = guarded()
            t2 = time.perf_counter()
            if i:
                bare_tps.append(len(a) / (t1 - t0))
                guarded_tps.append(len(b) / (t2 - t1))
                same.append(a == b)
    client.close()
    ratios = [gt / bt for gt, bt in zip(guarded_tps, bare_tps, strict=True)]
    return {
        "tokens": tokens,
        "repeats": repeats,
        "n_threads": llama.n_threads,
        "unguarded_tok_s_median": statistics.median(bare_tps),
        "guarded_tok_s_median": statistics.median(guarded_tps),
        "guarded_over_unguarded_median": statistics.median(ratios),
        "overhead_ms_per_token_median": statistics.median(1e3 / g - 1e3 / b for g, b in zip(guarded_tps, bare_tps, strict=True)),
        "identical_greedy_output": all(same),
    }


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def run_bench(args: argparse.Namespace) -> int:
    import grpc

    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    }
    with tempfile.TemporaryDirectory(prefix="fse-bench-") as tmp:
        sc = start_local_sidecar(Path(tmp))
        try:
            print("transport ...", file=sys.stderr)
            result["transport"] = bench_transport(sc.target, sc.public_key, args.rounds, max(args.rounds // 10, 50))
            print("metrics ...", file=sys.stderr)
            result["metrics"] = bench_metrics(args.rounds)
            if not args.skip_model:
                print("model ...", file=sys.stderr)
                result["model"] = bench_model(sc.target, sc.public_key, args.tokens, args.repeats)
        finally:
            sc.stop()
    t = result["transport"]
    print(
        _table(
            "verdict round trip (µs, p50 / p99; ratio = median of per-round ratios to the echo)",
            ["vocab", "pace", "echo", "ring", "inline", "ring/echo", "inline/echo"],
            [
                [
                    str(r["vocab"]),
                    f"{r['pace_ms']:.0f} ms",
                    f"{r['echo']['p50_us']:.0f} / {r['echo']['p99_us']:.0f}",
                    f"{r['ring']['p50_us']:.0f} / {r['ring']['p99_us']:.0f}",
                    f"{r['inline']['p50_us']:.0f} / {r['inline']['p99_us']:.0f}",
                    f"{r['ring_over_echo_median']:.2f}x",
                    f"{r['inline_over_echo_median']:.2f}x",
                ]
                for r in t
            ],
        )
    )
    print()
    print(
        _table(
            "metrics of one row (µs, p50)",
            ["vocab", "exp pass", "metrics", "metrics/exp", "np.partition top-2"],
            [
                [str(r["vocab"]), f"{r['exp_pass_us']:.1f}", f"{r['metrics_us']:.1f}", f"{r['metrics_over_exp_median']:.2f}x", f"{r['partition_top2_us']:.1f}"]
                for r in result["metrics"]
            ],
        )
    )
    if "model" in result:
        m = result["model"]
        print()
        print(
            _table(
                f"SmolLM2-135M, greedy, {m['tokens']} tokens, {m['repeats']} alternating pairs",
                ["unguarded tok/s", "guarded tok/s", "guarded/unguarded", "overhead ms/token", "same output"],
                [[
                    f"{m['unguarded_tok_s_median']:.1f}",
                    f"{m['guarded_tok_s_median']:.1f}",
                    f"{m['guarded_over_unguarded_median']:.3f}",
                    f"{m['overhead_ms_per_token_median']:.2f}",
                    str(m["identical_greedy_output"]),
                ]],
            )
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0
