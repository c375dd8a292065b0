"""``fse-sidecar bench batch``: what the sidecar spends per row of a batched decoding step,
FULL against COMPACT frames, at a 128k vocabulary (Llama 3's 128,256 ids).

For each batch size (1, 8, 64, 256) and frame kind, a real ring holds one frame of that
many rows (FULL: every logit, f32; COMPACT: the moments and the top 64, what a GPU
engine ships), and the sidecar answers the batch as its gRPC handler does
(:func:`sidecar.server.answer_batch`): the read out of the ring (one pass per frame),
statistics, the seeded sampler, the default policy's guards, the chain, the response, and
one Ed25519 seal over the batch (what the client asks for). Beside them, COMPACT batches
answered with an Ed25519 signature per verdict (no seal), and the engine's check of each
answer's signatures (the seal and a digest a row, or a signature a row). Half the sessions
sample greedily, half with top-k 40 at T = 0.8 (both coverable by 64 entries). Each row
is one of 16 model-like rows rotated by a random offset (the same distribution, other token
ids): a session fed a repeating cycle of rows would loop, and the default policy's loop
guard would rightly redo a sixth of its steps, timing the redo instead of a healthy step. Timed in
one process, the sizes and kinds interleaved round after round so that machine noise
falls on all of them alike; per-row costs are medians of (batch time / rows) (a sample of
a small batch is the median of 16 / batch steps), ratios are medians of per-round
ratios. The engine's writes into the ring are not timed (they are the engine's cost).

Prints a table, writes JSON, asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import accel
from .._pb.fse.v1 import guard_pb2 as pb
from ..config import SidecarConfig
from ..core.compact import moments_and_top
from ..core.sampling import SamplingParams
from ..core.session import Session
from ..core.vocab import Vocabulary
from ..ring import RingWriter
from ..server import answer_batch
from ..service import GuardService
from ..signing import Ed25519Signer, Ed25519Verifier, TrustedKeys, sealed_digest, verdict_digest
from ..wire import params_to_pb
from .common import machine, publish, table

VOCAB = 128_256
BATCHES = (1, 8, 64, 256)
K = 64
POOL = 16  # distinct logits rows cycled through (model-like: a broad mass, a few peaks)


def _rows(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(-2.0, 2.5, VOCAB).astype(np.float32)
        x[rng.choice(VOCAB, 12, replace=False)] += rng.uniform(6.0, 14.0, 12).astype(np.float32)
        out.append(x)
    return out


KINDS = ("FULL", "COMPACT", "COMPACT signed each")


class _Lane:
    """One batch size and frame kind: a ring, its sessions, and the next frame to judge."""

    def __init__(self, service: GuardService, trusted: TrustedKeys, digest: str, batch: int, kind: str, pool: list[Any]) -> None:
        self.service, self.batch, self.kind, self.pool, self.digest = service, batch, kind, pool, digest
        self.trusted, self.sealed = trusted, kind != "COMPACT signed each"
        self.ring = RingWriter.create(slots=1, rows=batch, vocab_size=VOCAB, topk=K)
        self.sessions = [
            self._open(
                f"{kind.replace(' ', '_')}-{batch}-{i}",
                SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.8, top_k=40, seed=i),
            )
            for i in range(batch)
        ]
        self.turn = itertools.count()
        self.rng = np.random.default_rng(batch)

    def _open(self, session_id: str, params: SamplingParams) -> Session:
        req = pb.OpenSessionRequest(
            session_id=session_id, vocab_digest=self.digest, sampling=params_to_pb(params), ring_name=self.ring.name
        )
        return self.service.open_session(req)

    def frame(self) -> list[pb.StepRequest]:
        """Write the next frame (not timed) and the batch request that names its rows."""
        t = next(self.turn)
        with self.ring.frame(0) as f:
            for i, s in enumerate(self.sessions):
                row = self.pool[(t + i) % len(self.pool)]
                # Rotated by a random offset: the same distribution, other token ids, so that
                # no session's tokens cycle (one that loops is rightly redone by the loop guard).
                off = int(self.rng.integers(VOCAB))
                if self.kind == "FULL":
                    f.write_row(s.tag, s.next_step, np.roll(row, off))
                else:
                    moments, vals, ids = row
                    f.write_compact(s.tag, s.next_step, moments, vals, ((ids.astype(np.int64) + off) % VOCAB).astype(np.uint32))
        return [
            pb.StepRequest(
                session_id=s.session_id, session_secret=s.secret, step=s.next_step, ring=pb.RingRef(slot=0, row=i, seq=f.seq)
            )
            for i, s in enumerate(self.sessions)
        ]

    def step(self) -> tuple[float, float]:
        """Seconds the sidecar spends on one batch step of this lane, and the engine's
        check of the answer's signatures."""
        reqs = self.frame()
        t0 = time.perf_counter()
        resp = answer_batch(self.service, reqs, seal=self.sealed)
        t1 = time.perf_counter()
        ok = self.check(resp)
        t2 = time.perf_counter()
        bad = [r.error.message for r in resp.responses if r.HasField("error")]
        if bad or not ok:
            raise RuntimeError(f"{self.kind} batch of {self.batch}: {bad[0] if bad else 'signatures do not verify'}")
        if any(r.verdict.decision == pb.DECISION_ABORT for r in resp.responses):
            self.reopen()
        return t1 - t0, t2 - t1

    def check(self, resp: pb.StepBatchResponse) -> bool:
        """What the engine's client checks of the signatures (engine_adapters.client)."""
        if not self.sealed:
            return all(self.trusted.verify(r.verdict) for r in resp.responses)
        return self.trusted.verify_seal(resp.seal, len(resp.responses)) and all(
            verdict_digest(r.verdict) == sealed_digest(resp.seal, i) for i, r in enumerate(resp.responses)
        )

    def reopen(self) -> None:
        """Sessions that aborted are replaced (the bench measures steps, not their outcomes)."""
        for i, s in enumerate(self.sessions):
            if s.aborted:
                self.service.close_session(s.session_id, s.secret)
                self.sessions[i] = self._open(f"{s.session_id}.r", s.params)

    def close(self) -> None:
        self.ring.close()


def bench_batch(rounds: int, batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    full = _rows(POOL)
    compact = [moments_and_top(x, K) for x in full]
    config = SidecarConfig(max_batch_rows=max(batches), max_sessions=8192)
    private = Ed25519PrivateKey.generate()
    service = GuardService(config, Ed25519Signer(private))
    trusted = TrustedKeys([Ed25519Verifier(private.public_key())])
    digest = service.add_vocabulary(Vocabulary.build([f"t{i}".encode() for i in range(VOCAB)], VOCAB)).digest
    lanes = {(b, k): _Lane(service, trusted, digest, b, k, full if k == "FULL" else compact) for b in batches for k in KINDS}
    times: dict[tuple[int, str], list[float]] = {key: [] for key in lanes}
    checks: dict[tuple[int, str], list[float]] = {key: [] for key in lanes}
    try:
        for lane in lanes.values():
            lane.step()  # warm: buffers, caches, first allocations
        for _ in range(rounds):
            for key, lane in lanes.items():
                # Small batches: the median of several steps per sample (a step's own spikes,
                # an allocator's page faults say, would otherwise weigh 16x at batch 1).
                steps = [lane.step() for _ in range(max(1, 16 // key[0]))]
                times[key].append(statistics.median(s for s, _ in steps) / key[0] * 1e6)
                checks[key].append(statistics.median(c for _, c in steps) / key[0] * 1e6)
    finally:
        for lane in lanes.values():
            lane.close()
        service.close()
    rows = []
    for b in batches:
        f, c = times[(b, "FULL")], times[(b, "COMPACT")]
        rows.append(
            {
                "batch": b,
                "full_us_per_row_p50": round(statistics.median(f), 1),
                "compact_us_per_row_p50": round(statistics.median(c), 1),
                "compact_signed_each_us_per_row_p50": round(statistics.median(times[(b, "COMPACT signed each")]), 1),
                "engine_check_sealed_us_per_row_p50": round(statistics.median(checks[(b, "COMPACT")]), 1),
                "engine_check_signed_each_us_per_row_p50": round(statistics.median(checks[(b, "COMPACT signed each")]), 1),
                "compact_over_full": round(statistics.median(x / y for x, y in zip(c, f, strict=True)), 3),
                "full_over_batch1": round(statistics.median(x / y for x, y in zip(f, times[(1, "FULL")], strict=True)), 3),
                "compact_over_batch1": round(statistics.median(x / y for x, y in zip(c, times[(1, "COMPACT")], strict=True)), 3),
            }
        )
    return {
        "vocab": VOCAB,
        "k": K,
        "rounds": rounds,
        "bytes_per_row": {"FULL": 4 * VOCAB, "COMPACT": 64 + 8 * K, "descriptor": 48},
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    """The table ``run_batch_bench`` prints, from its JSON."""
    b = result["bytes_per_row"]
    out = [
        table(
            f"sidecar µs per row of a sealed batch step, vocab {VOCAB:,} "
            f"(FULL {b['FULL']:,} B/row, COMPACT k={K} {b['COMPACT']} B/row); medians over rounds",
            [
                "batch",
                "FULL",
                "COMPACT",
                "COMPACT signed each",
                "COMPACT/FULL",
                "FULL/batch 1",
                "COMPACT/batch 1",
                "engine check: sealed / each",
            ],
            [
                [
                    str(r["batch"]),
                    f"{r['full_us_per_row_p50']:.1f}",
                    f"{r['compact_us_per_row_p50']:.1f}",
                    f"{r['compact_signed_each_us_per_row_p50']:.1f}",
                    f"{r['compact_over_full']:.3f}",
                    f"{r['full_over_batch1']:.2f}",
                    f"{r['compact_over_batch1']:.2f}",
                    f"{r['engine_check_sealed_us_per_row_p50']:.1f} / {r['engine_check_signed_each_us_per_row_p50']:.1f}",
                ]
                for r in result["rows"]
            ],
        )
    ]
    at64 = next((r for r in result["rows"] if r["batch"] == 64), None)
    if at64 is not None:
        out.append(
            f"\naims at batch 64: COMPACT/FULL {at64['compact_over_full']:.3f} (aim <= 0.1); "
            f"per row vs batch 1: FULL {at64['full_over_batch1']:.2f}, "
            f"COMPACT {at64['compact_over_batch1']:.2f} (aim: well under 1)"
        )
    return "\n".join(out)


def run_batch_bench(args: argparse.Namespace) -> int:
    print(f"sidecar core: {accel.status().describe()}")
    result = bench_batch(args.batch_rounds)
    result["machine"] = machine()
    return publish(result, args.out, "batch", render)
