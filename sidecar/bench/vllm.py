"""``fse-sidecar bench vllm``: real vLLM (the CPU build, ``make setup-vllm``), guarded against
unguarded output tokens/s at batch 1, 8 and 32, through vLLM's OpenAI server.

Two servers run side by side on the embedded model (float32, eager): ``fse-vllm serve``
with a sidecar of its own, and vLLM's plain server. Each round sends every batch size to
both, the order rotating round by round (:func:`sidecar.bench.rotation`) so that machine
noise falls on both alike: ``batch`` chat completions at once (greedy, ``--tokens`` each,
one of eight prompts that ask for long answers, so requests rarely end early), timed from
the first send to the last answer; tokens/s is the completion tokens vLLM reports over
that time. Ratios are medians of per-round ratios.
``--guarded-url`` and ``--plain-url`` measure servers already running instead.

Prints a table, writes JSON, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .common import machine, publish, rotation, table

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List everything you know about the ocean.",
    "Describe a walk through a busy city market.",
    "Tell me about the history of writing.",
    "Write a letter to a friend about your week.",
    "Explain why the sky changes colour at sunset.",
    "Describe how bread is made from wheat.",
]


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return dict(json.loads(r.read()))


def _batch(base_url: str, model: str, batch: int, tokens: int, pool: ThreadPoolExecutor) -> tuple[float, int]:
    """(seconds, completion tokens) of ``batch`` greedy chat completions sent at once."""

    def one(i: int) -> int:
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0}
        return int(_post(f"{base_url}/chat/completions", body)["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    done = sum(pool.map(one, range(batch)))
    return time.perf_counter() - t0, done


def render(result: dict[str, Any]) -> str:
    """The table ``run_vllm_bench`` prints, from its JSON."""
    rows = []
    for b, r in result["batches"].items():
        rows.append([b, f"{r['unguarded_tok_s']:.1f}", f"{r['guarded_tok_s']:.1f}", f"{r['ratio']:.3f}", r["ratios"]])
    return table(
        f"real vLLM {result['vllm']}, {result['tokens']} greedy tokens a request, {result['rounds']} rotated rounds "
        "(tokens/s: medians; ratio: median of per-round guarded/unguarded)",
        ["batch", "unguarded tok/s", "guarded tok/s", "ratio", "per round"],
        rows,
    )


def run_vllm_bench(args: argparse.Namespace) -> int:
    from engine_adapters import vllm_process

    batches = [int(b) for b in args.vllm_batches.split(",")]
    servers: list[Any] = []
    sidecar = None
    if args.guarded_url and args.plain_url:
        urls = {"guarded": args.guarded_url.rstrip("/"), "unguarded": args.plain_url.rstrip("/")}
    else:
        from ..launch import start_local_sidecar

        why = vllm_process.missing()
        if why:
            raise SystemExit(f"bench vllm: {why}")
        work = Path(tempfile.mkdtemp(prefix="fse-bench-vllm-"))
        sidecar = start_local_sidecar(work / "sidecar", {"max_batch_rows": max(64, *batches)})
        sidecar.wait_started()
        env = {"FSE_SIDECAR": sidecar.target, "FSE_PUBLIC_KEY": str(sidecar.public_key)}
        seqs = max(batches)
        servers = [
            vllm_process.start_vllm(work / "guarded.log", guarded=True, env=env, max_num_seqs=seqs),
            vllm_process.start_vllm(work / "unguarded.log", guarded=False, max_num_seqs=seqs),
        ]
        for s in servers:
            s.wait_ready()
        urls = {"guarded": servers[0].base_url, "unguarded": servers[1].base_url}
    try:
        result = _measure(urls, batches, args)
    finally:
        for s in servers:
            s.stop()
        if sidecar is not None:
            sidecar.stop()
    result["tokens"], result["rounds"] = args.tokens, args.vllm_rounds
    return publish(result, args.out, "vllm", render)


def _measure(urls: dict[str, str], batches: list[int], args: argparse.Namespace) -> dict[str, Any]:
    with urllib.request.urlopen(urls["unguarded"] + "/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    with urllib.request.urlopen(urls["unguarded"].removesuffix("/v1") + "/version", timeout=30) as r:
        version = json.loads(r.read()).get("version", "?")
    speeds: dict[tuple[int, str], list[float]] = {(b, k): [] for b in batches for k in urls}
    with ThreadPoolExecutor(max(batches)) as pool:
        for name in urls:  # warm-up: the first requests of a server pay for its start
            _batch(urls[name], model, min(batches), 4, pool)
        for i in range(args.vllm_rounds):
            for b in batches:
                for name in rotation(list(urls), i):
                    seconds, tokens = _batch(urls[name], model, b, args.tokens, pool)
                    speeds[(b, name)].append(tokens / seconds)
    out: dict[str, Any] = {
        "machine": machine(),
        "vllm": version,
        "tokens": args.tokens,
        "rounds": args.vllm_rounds,
        "batches": {},
    }
    for b in batches:
        g, u = speeds[(b, "guarded")], speeds[(b, "unguarded")]
        ratios = [x / y for x, y in zip(g, u, strict=True)]
        out["batches"][str(b)] = {
            "guarded_tok_s": statistics.median(g),
            "unguarded_tok_s": statistics.median(u),
            "ratio": statistics.median(ratios),
            "ratios": " ".join(f"{r:.2f}" for r in ratios),
            "guarded_all": g,
            "unguarded_all": u,
        }
    return out
