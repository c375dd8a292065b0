"""``fse-sidecar bench http``: what fse-engine-llama's HTTP layer costs. The same guarded
generation, side by side against one sidecar:

- **in process**: ``GuardedLlama.generate`` on the embedded model in this process;
- **HTTP**: the same chat request (same prompt, template, sampling and seed, so the same
  tokens) streamed from ``fse-engine-llama`` over a local TCP connection, read as SSE.

Time to first token (in process: from the call to the first verified token; HTTP: from the
request's first byte sent to the first chunk with text) and tokens/s over the whole answer
(the tokens over the time from the start to the last token, or to ``[DONE]``). The two run
in turn, the order rotating each round; a pause between runs lets the idle one's OpenMP
threads stop spinning. Ratios are medians of per-round ratios.

Prints a table, writes JSON, asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
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
from .vllm import PROMPTS


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_run(port: int, body: dict[str, Any]) -> tuple[float, float, int, str]:
    """(ttft s, total s, completion tokens, text) of one streamed chat completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"bench http: the server answered {r.status}: {r.read()[:300]!r}")
    ttft, tokens, parts, last = 0.0, 0, [], 0.0
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = int(event["usage"]["completion_tokens"])
            continue
        text = event["choices"][0]["delta"].get("content")
        if text:
            last = time.perf_counter()
            ttft = ttft or last - t0
            parts.append(text)
    conn.close()
    return ttft, last - t0, tokens, "".join(parts)


def render(result: dict[str, Any]) -> str:
    """The table ``run_http_bench`` prints, from its JSON."""
    rows = [[name, f"{result[name]['tok_s']:.1f}", f"{result[name]['ttft_ms']:.1f}"] for name in ("in_process", "http")]
    return "\n".join(
        [
            table(
                f"fse-engine-llama's HTTP layer: {result['tokens']} tokens a chat answer (T=0.7, seeded), "
                f"{result['rounds']} rotated rounds, medians; same text both ways: {result['same_text']}",
                ["path", "tok/s", "TTFT ms"],
                rows,
            ),
            f"HTTP/in-process tokens/s: {result['tok_s_ratio']:.3f} (the HTTP layer costs {result['http_cost_pct']:.1f}%); "
            f"time to first token: +{result['ttft_extra_ms']:.1f} ms",
        ]
    )


def run_http_bench(args: argparse.Namespace) -> int:
    from engine_adapters.chat_template import ChatTemplate
    from engine_adapters.client import GuardClient
    from engine_adapters.llama_cpp import GuardedLlama, load_llama
    from engine_adapters.openai_schema import ChatRequest

    from ..launch import start_local_sidecar

    work = Path(tempfile.mkdtemp(prefix="fse-bench-http-"))
    sidecar = start_local_sidecar(work / "sidecar")
    sidecar.wait_started()
    port = _free_port()
    log = (work / "engine.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "engine_adapters.llama_server", "--listen", f"127.0.0.1:{port}",
         "--n-threads", str(args.threads), "--n-ctx", "2048", "--max-tokens", str(args.tokens)],
        env={**os.environ, "FSE_SIDECAR": sidecar.target, "FSE_PUBLIC_KEY": str(sidecar.public_key)},
        stderr=log,
    )  # fmt: skip
    client = GuardClient(sidecar.target, [str(sidecar.public_key)])
    llama = load_llama(n_threads=args.threads, n_ctx=2048)
    guarded = GuardedLlama(llama, client)
    template = ChatTemplate.of(llama)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench http: fse-engine-llama did not start (log: {work / 'engine.log'})")
            time.sleep(0.2)

        def in_process(body: dict[str, Any]) -> tuple[float, float, int, str]:
            req = ChatRequest.model_validate(body)
            prompt = template.render([{"role": m.role, "content": str(m.content)} for m in req.messages])
            t0 = time.perf_counter()
            ttft, parts, last = 0.0, [], 0.0
            for tok in guarded.generate(prompt, max_tokens=args.tokens, sampling=req.sampling()):
                last = time.perf_counter()
                ttft = ttft or last - t0
                parts.append(tok.text)
            return ttft, last - t0, len(parts), b"".join(parts).decode("utf-8", "replace")

        runs = {"in_process": in_process, "http": lambda body: _http_run(port, body)}
        got: dict[str, list[tuple[float, float, int, str]]] = {k: [] for k in runs}
        same = True
        for i in range(args.http_rounds + 1):  # round 0 warms both up and is not counted
            body = {
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": args.tokens,
                "temperature": 0.7,
                "seed": 1000 + i,
            }
            answers = {}
            for name in rotation(list(runs), i):
                time.sleep(0.5)  # the other process's OpenMP workers stop spinning
                answers[name] = runs[name](body)
                if i:
                    got[name].append(answers[name])
            same = same and answers["in_process"][3] == answers["http"][3]
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        guarded.close()
        client.close()
        sidecar.stop()

    def rate(r: tuple[float, float, int, str]) -> float:
        return r[2] / r[1]

    ip, h = got["in_process"], got["http"]
    result: dict[str, Any] = {
        **run_header(args, args.http_rounds),
        "same_text": same,
        "in_process": {"tok_s": statistics.median(map(rate, ip)), "ttft_ms": 1e3 * statistics.median(r[0] for r in ip)},
        "http": {"tok_s": statistics.median(map(rate, h)), "ttft_ms": 1e3 * statistics.median(r[0] for r in h)},
        "tok_s_ratio": statistics.median(rate(b) / rate(a) for a, b in zip(ip, h, strict=True)),
        "ttft_extra_ms": 1e3 * statistics.median(b[0] - a[0] for a, b in zip(ip, h, strict=True)),
        "per_round": [
            {"in_process": {"ttft_s": a[0], "s": a[1], "tokens": a[2]}, "http": {"ttft_s": b[0], "s": b[1], "tokens": b[2]}}
            for a, b in zip(ip, h, strict=True)
        ],
    }
    result["http_cost_pct"] = 100 * (1 - result["tok_s_ratio"])
    return publish(result, args.out, "http", render)
