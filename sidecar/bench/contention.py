"""``fse-sidecar bench contention``: guarded llama.cpp on a busy node.

A fixed background load (``--load-procs`` busy processes at normal priority, by default
one per core) or none; in each, llama.cpp with each OpenMP wait policy of
``--omp-policies`` (engine_adapters/omp.py: default, bounded, passive, active). Each is a
child process of its own (libgomp reads its wait settings once, when it loads)
that runs, in turn with the order rotating each round: unguarded greedy decoding, then the
same generation guarded on the gRPC lane, the fast lane, and the fast lane with
speculation, against one sidecar (which the load slows too). Reported: medians of tokens/s,
the median of per-round guarded/unguarded ratios, and every step that failed (a guarded
generation that ended in an error with the sidecar alive: a false abort).

Prints a table, writes JSON, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import publish, rotation, run_header, table

PATHS = ("unguarded", "grpc", "shm", "shm_spec")
PROMPT = "Write a long story about a dragon who learns to paint."


def _child(target: str, public_key: str, tokens: int, rounds: int, threads: int) -> dict[str, Any]:
    """One configuration's runs (in the child process, its OMP_WAIT_POLICY already set)."""
    from engine_adapters.client import GuardClient
    from engine_adapters.llama_cpp import GuardedLlama, load_llama, unguarded_greedy
    from sidecar.core.sampling import SamplingParams

    from ..demo import CHAT

    llama = load_llama(n_threads=threads)
    ids = llama.tokenize(CHAT.format(PROMPT).encode(), add_bos=True, special=True)
    client = GuardClient(target, [public_key])  # the default step deadline, as users run it
    client.wait_ready(30)
    guarded = {
        "grpc": GuardedLlama(llama, client),
        "shm": GuardedLlama(llama, client, lane="shm"),
        "shm_spec": GuardedLlama(llama, client, lane="shm", speculate=True),
    }
    greedy = SamplingParams(temperature=0.0)
    tps: dict[str, list[float]] = {p: [] for p in PATHS}
    failures: list[dict[str, Any]] = []

    def run(path: str) -> int:
        if path == "unguarded":
            return len(unguarded_greedy(llama, ids, tokens))
        done = guarded[path].complete(ids, max_tokens=tokens, sampling=greedy)
        if done.error is not None:
            error = f"{type(done.error).__name__}: {done.error}"
            failures.append({"path": path, "after_tokens": len(done.tokens), "error": error})
        return len(done.tokens)

    for i in range(rounds + 1):  # round 0 warms up and is not counted
        for path in rotation(list(PATHS), i):
            llama.reset()
            t0 = time.perf_counter()
            n = run(path)
            if i:
                tps[path].append(n / (time.perf_counter() - t0))
    for g in guarded.values():
        g.close()
    client.close()
    return {"tok_s": tps, "failures": failures}


def _omp_env(policy: str) -> dict[str, str]:
    from engine_adapters.omp import POLICIES

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **POLICIES[policy]}


def render(result: dict[str, Any]) -> str:
    """The table ``run_contention_bench`` prints, from its JSON."""
    rows = [
        [key, f"{r['tok_s_median']['unguarded']:.1f}"]
        + [f"{r['tok_s_median'][p]:.1f} ({r['over_unguarded_median'][p]:.2f})" for p in PATHS[1:]]
        + [str(len(r["failures"]))]
        for key, r in result["runs"].items()
    ]
    out = [
        table(
            f"{result['tokens']} greedy tokens, n_threads={result['threads']}, {result['rounds']} rotated rounds; loaded: "
            f"{result['load_procs']} busy processes; tok/s medians (median of per-round ratios to unguarded)",
            ["load/OpenMP wait", "unguarded", "gRPC lane", "fast lane", "fast + speculation", "failed"],
            rows,
        )
    ]
    for key, r in result["runs"].items():
        for f in r["failures"]:
            out.append(f"  {key} {f['path']}: after {f['after_tokens']} tokens: {f['error']}")
    return "\n".join(out)


def run_contention_bench(args: argparse.Namespace) -> int:
    from ..launch import start_local_sidecar

    work = Path(tempfile.mkdtemp(prefix="fse-bench-contention-"))
    sidecar = start_local_sidecar(work / "sidecar")
    sidecar.wait_started()
    procs = args.load_procs if args.load_procs is not None else os.cpu_count() or 2
    result: dict[str, Any] = {**run_header(args, args.contention_rounds), "load_procs": procs, "runs": {}}
    try:
        for load in ("quiet", "loaded"):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(procs if load == "loaded" else 0)]
            try:
                for policy in args.omp_policies.split(","):
                    print(f"{load}, OpenMP wait {policy} ...", file=sys.stderr)
                    child = subprocess.run(
                        [sys.executable, "-m", "sidecar.bench.contention", sidecar.target, str(sidecar.public_key),
                         str(args.tokens), str(args.contention_rounds), str(args.threads)],
                        env=_omp_env(policy),
                        capture_output=True, text=True, timeout=3600,
                    )  # fmt: skip
                    if child.returncode != 0:
                        raise SystemExit(f"bench contention: the {load}/{policy} run failed:\n{child.stderr[-3000:]}")
                    result["runs"][f"{load}/{policy}"] = json.loads(child.stdout.strip().splitlines()[-1])
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    finally:
        sidecar.stop()
    for r in result["runs"].values():
        t = r["tok_s"]
        r["tok_s_median"] = {p: statistics.median(t[p]) for p in PATHS}
        r["over_unguarded_median"] = {
            p: statistics.median(g / u for g, u in zip(t[p], t["unguarded"], strict=True)) for p in PATHS[1:]
        }
    return publish(result, args.out, "contention", render)


if __name__ == "__main__":  # the child of one configuration: prints its JSON
    target, key, tokens, rounds, threads = sys.argv[1:6]
    print(json.dumps(_child(target, key, int(tokens), int(rounds), int(threads))))
