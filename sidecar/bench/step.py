"""``fse-sidecar bench step``: the guard's own CPU per token, warm and with cold caches.

In the token loop the sidecar judges a row right after the engine's forward pass, which has
streamed the model's weights through the caches: the code and data of the step are cold, and
a step costs several times what it costs back to back. The model benchmark sees that inside
the scheduler's noise (two processes, wake-ups, a busy machine); this suite takes the noise
out. One process runs the per-token path on real rows of the embedded model (captured once
from a T=0.7 generation, then fed in order): the engine's ring write, the sidecar's answer on
either lane (:func:`~sidecar.server.answer_step`, the response serialised as the fast lane
writes it), and the engine's check of it (:func:`~engine_adapters.client.check_verdict`).

Three settings side by side, in blocks of eight rows, the order rotating: ``warm`` (steps back
to back), ``cold`` (``--evict-mb`` of memory read before each step, as a forward pass would)
and ``idle`` (the process sleeps ``--idle-ms`` before each step, as the sidecar waits out the
engine's forward pass, and nothing else runs: on a shared virtual machine the core's caches
are as cold after that as after the eviction); for HMAC and Ed25519 verdicts, the default
policy, no audit file. The sum of the three stages is the guard's own CPU per token, without
the wake-ups. Prints a table and writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._pb.fse.v1 import guard_pb2 as pb
from ..config import parse_config
from ..core.sampling import SamplingParams, sample_normal
from ..ring import RingWriter
from ..server import answer_step
from ..service import GuardService
from ..signing import Signer, TrustedKeys, generate_hmac_key, generate_keypair
from ..wire import params_to_pb
from .common import machine, publish, rotation, table

SIGNERS = ("hmac", "ed25519")
SETTINGS = ("warm", "cold", "idle")
STAGES = ("write", "sidecar", "verify")
BLOCK = 8  # rows a loop steps through before the next loop's turn
STORY = "Write a long story about a dragon who learns to paint."
SAMPLING = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, seed=1)


def capture_rows(n: int, threads: int) -> tuple[np.ndarray, list[bytes]]:
    """``n`` logits rows of the embedded model, generating at T=0.7, and its vocabulary."""
    from engine_adapters.llama_cpp import CHAT, last_logits, load_llama, vocabulary_of

    llama = load_llama(n_threads=threads)
    vocab = vocabulary_of(llama)
    ids = llama.tokenize(CHAT.format(STORY).encode(), add_bos=True, special=True)
    llama.eval(ids)
    rows, history = [], list(ids)
    for step in range(n):
        row = last_logits(llama).copy()
        rows.append(row)
        token = sample_normal(row, history, SAMPLING, step)
        history.append(token)
        llama.eval([token])
    return np.stack(rows), vocab


class _Loop:
    """One session's per-token path, engine and sidecar in this process."""

    def __init__(self, service: GuardService, trusted: TrustedKeys, digest: str, vocab_size: int) -> None:
        self.service, self.trusted, self.vocab_size = service, trusted, vocab_size
        self.ring = RingWriter.create(slots=2, vocab_size=vocab_size)
        req = pb.OpenSessionRequest(vocab_digest=digest, ring_name=self.ring.name, sampling=params_to_pb(SAMPLING))
        self.session = service.open_session(req)
        self.prev = self.session.chain_hash
        self.step = 0

    def run(self, row: np.ndarray) -> tuple[float, float, float]:
        from engine_adapters.client import Expected, check_verdict

        s, step = self.session, self.step
        t0 = time.perf_counter()
        slot = self.ring.acquire()
        with self.ring.frame(slot) as f:
            r = f.write_row(s.tag, step, row)
        t1 = time.perf_counter()
        req = pb.StepRequest(
            session_id=s.session_id, session_secret=s.secret, step=step, ring=pb.RingRef(slot=slot, row=r, seq=f.seq)
        )
        data = answer_step(self.service, req).SerializeToString(deterministic=True)
        t2 = time.perf_counter()
        expect = Expected(s.session_id, step, self.prev, s.policy.digest, self.vocab_size)
        v = check_verdict(pb.StepResponse.FromString(data), expect, self.trusted)
        t3 = time.perf_counter()
        self.ring.release(slot)
        self.prev, self.step = v.chain_hash, step + 1
        return t1 - t0, t2 - t1, t3 - t2

    def close(self) -> None:
        self.service.drop_session(self.session.session_id)
        self.ring.close()


def bench_step(rows: np.ndarray, vocab: list[bytes], evict_mb: int, passes: int, idle_ms: float) -> dict[str, Any]:
    flush = np.ones(evict_mb << 18, dtype=np.float32)  # evict_mb MiB
    times: dict[str, list[tuple[float, float, float]]] = {f"{s}/{c}": [] for s in SIGNERS for c in SETTINGS}
    loops: dict[str, _Loop] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SIGNERS:
            if name == "hmac":
                key = generate_hmac_key(Path(tmp) / "hmac")
                private, public = key, key
            else:
                private, public = generate_keypair(Path(tmp) / "ed")
            service = GuardService(parse_config({}), Signer.from_file(private))
            digest = service.register_vocabulary(vocab).digest
            for setting in SETTINGS:
                loops[f"{name}/{setting}"] = _Loop(service, TrustedKeys.load(public), digest, len(vocab))
        # Blocks of BLOCK rows, the loops in turn: a warm loop's steps run back to back (the
        # first of each block, which follows another loop's, is not counted); a cold one
        # reads the flush buffer before every step, an idle one sleeps.
        names = list(loops)
        for i in range(max(passes * len(rows) // BLOCK, 2)):
            for name in rotation(names, i):
                setting = name.split("/")[1]
                for j in range(BLOCK):
                    if setting == "cold":
                        flush.sum()  # what the forward pass does to the caches between two steps
                    elif setting == "idle":
                        time.sleep(idle_ms / 1e3)  # the wait for the forward pass, nothing else
                    t = loops[name].run(rows[(i * BLOCK + j) % len(rows)])
                    if i and (setting != "warm" or j):  # the first round warms the code up
                        times[name].append(t)
        for lp in loops.values():
            lp.close()
    out: dict[str, Any] = {"rows": len(rows), "passes": passes, "evict_mb": evict_mb, "idle_ms": idle_ms}
    for name, ts in times.items():
        out[name] = {f"{stage}_us_p50": round(statistics.median(t[k] for t in ts) * 1e6, 1) for k, stage in enumerate(STAGES)}
        out[name]["total_us_p50"] = round(statistics.median(sum(t) for t in ts) * 1e6, 1)
    for name in SIGNERS:
        warm_us = statistics.median(sum(t) for t in times[f"{name}/warm"])
        for setting in ("cold", "idle"):
            us = statistics.median(sum(t) for t in times[f"{name}/{setting}"])
            out[f"{name}_{setting}_over_warm"] = round(us / warm_us, 2)
    return out


def render(result: dict[str, Any]) -> str:
    """The table ``run_step_bench`` prints, from its JSON."""
    r = result["step"]
    rows = []
    for name in SIGNERS:
        for setting in SETTINGS:
            m = r[f"{name}/{setting}"]
            ratio = f"{r[f'{name}_{setting}_over_warm']:.2f}x" if setting != "warm" else ""
            rows.append([name, setting, *(f"{m[f'{s}_us_p50']:.0f}" for s in STAGES), f"{m['total_us_p50']:.0f}", ratio])
    return table(
        f"the guard's CPU per token in one process (µs, p50; {r['rows']} SmolLM2 rows x {r['passes']}; "
        f"cold: {r['evict_mb']} MiB read before each step; idle: {r['idle_ms']:g} ms asleep before each step)",
        ["verdicts", "caches", "engine write", "sidecar step", "engine verify", "total", "over warm"],
        rows,
    )


def run_step_bench(args: argparse.Namespace) -> int:
    rows, vocab = capture_rows(args.step_rows, args.threads)
    result = {"machine": machine(), "step": bench_step(rows, vocab, args.evict_mb, args.step_passes, args.idle_ms)}
    return publish(result, args.out, "step", render)
