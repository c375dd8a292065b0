"""The fault matrix's harness: lanes, a session under test, the four checks every fault
must pass, and a man in the middle on the gRPC path.

Every fault of tests/test_fault_matrix.py is tried on every lane it applies to and must
show: no token without a verified verdict (the step raised, the session is dead and steps
no more), a clear error naming the cause, the audit file intact up to the fault (its chain
verifies and holds every verdict the engine verified, in order), and the other sessions
unaffected (a bystander opened beside the victim steps on and closes with a receipt that
matches its audit file) — or, where the fault takes every session down (a killed sidecar),
every session failed closed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from engine_adapters.client import GuardClient, GuardedSession
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core import ledger
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardError
from sidecar.ring import RingWriter
from sidecar.signing import TrustedKeys, verdict_digest
from sidecar.wire import receipt_json

V = 1000
VOCAB = [f"t{i} ".encode() for i in range(V)]
GREEDY = SamplingParams()
# The lanes a verdict can travel (docs/reliability.md): the gRPC Steps stream, one unary
# Step call per token, a batch on the stream (StepBatch's path), the shared-memory lane.
LANES = ("stream", "unary", "batch", "shm")
_CLIENT_LANE = {"stream": "grpc", "unary": "grpc-unary", "batch": "grpc", "shm": "shm"}

MATRIX: dict[str, Fault] = {}


@dataclass(frozen=True)
class Fault:
    id: str
    group: str
    what: str  # the fault, in a few words (the table in docs/reliability.md)
    held: str  # what the test requires of the outcome, in a few words
    lanes: tuple[str, ...]


def fault(id: str, group: str, what: str, held: str, lanes: tuple[str, ...] = LANES) -> Callable[[Any], Any]:
    """Register a test as the fault ``id`` of the matrix, run on each of ``lanes``."""

    def wrap(fn: Any) -> Any:
        if id in MATRIX:
            raise ValueError(f"fault {id} registered twice")
        MATRIX[id] = Fault(id, group, what, held, lanes)
        fn = pytest.mark.fault(id)(fn)
        return pytest.mark.parametrize("lane", lanes)(fn)

    return wrap


def row(i: int) -> np.ndarray:
    """A model-like row peaked at token ``i`` (greedy picks it; the guards pass it)."""
    x = np.random.default_rng(i).standard_normal(V).astype(np.float32)
    x[i % V] = 12.0
    return x


@dataclass
class Guarded:
    """One session under test on its lane; ``verdicts``: the verified verdicts whose tokens
    the engine emitted, step by step."""

    s: GuardedSession
    lane: str
    ring: RingWriter
    verdicts: list[pb.Verdict] = field(default_factory=list)

    def step(self, logits: np.ndarray) -> pb.Verdict:
        if self.lane == "batch":
            (o,) = self.s.client.step_batch([(self.s, logits)], self.ring)
            if isinstance(o, Exception):
                raise o
            v = o
        else:
            v = self.s.step(logits)
        self.verdicts.append(v)
        return v

    def run(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            self.step(row(i))


class Rig:
    """A sidecar (its socket, key and audit directory) and a client on one lane."""

    def __init__(self, target: str, public_key: Path, audit_dir: Path | None, lane: str, step_timeout: float = 2.0) -> None:
        self.target, self.public_key, self.audit_dir, self.lane = target, public_key, audit_dir, lane
        self.client = GuardClient(target, public_key, step_timeout=step_timeout)
        self.client.wait_ready()
        self.digest = self.client.register_vocabulary(VOCAB)
        self.rings: list[RingWriter] = []
        self.opened: list[Guarded] = []

    def ring(self, **kw: Any) -> RingWriter:
        r = RingWriter.create(
            slots=2, vocab_size=kw.pop("vocab_size", V), verdict_capacity=8192 if self.lane == "shm" else 0, **kw
        )
        self.rings.append(r)
        return r

    def open(self, session_id: str | None = None, ring: RingWriter | None = None, params: SamplingParams = GREEDY) -> Guarded:
        ring = ring or self.ring()
        s = self.client.open_session(self.digest, params, ring=ring, session_id=session_id, lane=_CLIENT_LANE[self.lane])
        g = Guarded(s, self.lane, ring)
        self.opened.append(g)
        return g

    def pair(self, steps: int = 3) -> tuple[Guarded, Guarded]:
        """A victim and a bystander, each ``steps`` steps in."""
        victim, bystander = self.open(), self.open()
        victim.run(steps)
        bystander.run(steps)
        return victim, bystander

    # -- the checks -----------------------------------------------------------------------
    def failed_closed(self, g: Guarded) -> None:
        """No token without a verdict: the session is dead and refuses to step again."""
        assert g.s.dead is not None, "the session survived its fault"
        before = len(g.verdicts)
        with pytest.raises(GuardError):
            g.step(row(1))
        assert len(g.verdicts) == before

    def audit_file(self, g: Guarded) -> Path:
        """The file of this opening of the session (an id opened again has a file per opening)."""
        assert self.audit_dir is not None
        mine = [
            f
            for f in self.audit_dir.glob(f"{g.s.session_id}.*.audit")
            if json.loads(f.read_bytes().split(b"\n", 1)[0])["genesis_hash"] == g.s.genesis.hex()
        ]
        assert len(mine) == 1, f"{len(mine)} audit files for this opening of {g.s.session_id}"
        return mine[0]

    def audit_intact(self, g: Guarded, closed: bool | None = None, through: int | None = None) -> ledger.Report:
        """The file's chain verifies and holds, in order, every verdict the engine verified
        (its frame ``next_step - 1`` has the engine's chain head; with ``through``, its frame
        ``through - 1`` has the chain head of the engine's token ``through - 1``). Frames
        after it are steps the sidecar judged whose verdicts never became tokens."""
        f = self.audit_file(g)
        lines = f.read_bytes().splitlines(keepends=True)
        receipt = receipt_json(g.s.receipt) if g.s.receipt is not None else None
        rep = ledger.verify(lines, receipt, TrustedKeys.load(self.public_key).check)
        assert rep.ok, f"{f.name}: {rep.error}"
        n = g.s.next_step if through is None else through
        assert rep.frames >= n, f"{f.name}: {rep.frames} frames for {n} verified verdicts"
        if n:
            frames = [r for r in map(json.loads, lines[1:]) if r.get("kind") == "frame"]  # checkpoints between them
            frame = frames[n - 1]
            head = g.s.chain_hash if through is None else g.verdicts[n - 1].chain_hash
            assert frame["step"] == n - 1 and bytes.fromhex(frame["chain_hash"]) == head
        if closed is not None:
            assert rep.closed == closed
        return rep

    def unaffected(self, g: Guarded, steps: int = 3) -> None:
        """A bystander steps on, closes with a receipt, and its audit file matches it."""
        g.run(steps, start=len(g.verdicts))
        g.s.close()
        assert g.s.receipt is not None and g.s.receipt.steps == len(g.verdicts)
        if self.audit_dir is not None:
            self.audit_intact(g, closed=True)

    def held(self, victim: Guarded, bystander: Guarded, **audit: Any) -> ledger.Report:
        """The checks after a fault that ended ``victim`` alone: it failed closed, its audit
        file is intact up to the fault (``audit``: :meth:`audit_intact`'s options), and the
        bystander was unaffected. Returns the victim's audit report."""
        self.failed_closed(victim)
        rep = self.audit_intact(victim, **audit)
        self.unaffected(bystander)
        return rep

    def close(self) -> None:
        for g in self.opened:
            if g.s.dead is None:
                g.s.close()
        self.client.close()
        for r in self.rings:
            r.close()


@dataclass
class _Call:
    name: str
    streaming: bool


class Mitm:
    """A man in the middle on the gRPC path (a compromised proxy or network): forwards every
    call to the real sidecar untouched, except that, once armed for a session, it alters
    the next verdict of that session it carries back (then disarms). It only re-sends what
    it saw: it holds no signing key."""

    MODES = ("forged", "replayed", "cross_session", "cross_opening", "reordered", "unsealed", "resealed")

    def __init__(self, upstream: str, sock: Path) -> None:
        self.upstream = grpc.insecure_channel(upstream)
        self.target = f"unix:{sock}"
        self.mode = ""
        self.victim = ""
        self.fired = 0
        self.seen: dict[tuple[str, int], list[bytes]] = {}  # honest verdicts by (session, step), oldest opening first
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        calls = [_Call(m.name, m.client_streaming) for m in pb.DESCRIPTOR.services_by_name["GuardService"].methods]
        handlers = {c.name: self._handler(f"/fse.v1.GuardService/{c.name}", c) for c in calls}
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("fse.v1.GuardService", handlers),
                grpc.method_handlers_generic_handler(
                    "grpc.health.v1.Health", {"Check": self._handler("/grpc.health.v1.Health/Check", _Call("Check", False))}
                ),
            )
        )
        self.server.add_insecure_port(self.target)
        self.server.start()

    def arm(self, mode: str, victim: str) -> None:
        assert mode in self.MODES
        self.mode, self.victim = mode, victim

    def _handler(self, path: str, call: _Call) -> grpc.RpcMethodHandler:
        if call.streaming:
            upstream_s = self.upstream.stream_stream(path)

            def stream(requests: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
                try:
                    for raw in upstream_s(requests):
                        yield self._alter(call.name, raw)
                except grpc.RpcError as exc:
                    ctx.abort(exc.code(), exc.details())

            return grpc.stream_stream_rpc_method_handler(stream)
        upstream_u = self.upstream.unary_unary(path)

        def unary(raw: bytes, ctx: grpc.ServicerContext) -> bytes:
            try:
                return self._alter(call.name, upstream_u(raw, timeout=ctx.time_remaining()))
            except grpc.RpcError as exc:
                ctx.abort(exc.code(), exc.details())
                raise

        return grpc.unary_unary_rpc_method_handler(unary)

    def _alter(self, method: str, raw: bytes) -> bytes:
        if method == "Step":
            r = pb.StepResponse.FromString(raw)
            self._one(r)
            return r.SerializeToString()
        if method == "Steps":
            m = pb.StepsResponse.FromString(raw)
            if m.HasField("batch"):
                self._batch(m.batch)
            else:
                self._one(m.response)
            return m.SerializeToString()
        if method == "StepBatch":
            b = pb.StepBatchResponse.FromString(raw)
            self._batch(b)
            return b.SerializeToString()
        return raw

    def _batch(self, batch: pb.StepBatchResponse) -> None:
        responses = batch.responses
        if self.mode in ("unsealed", "resealed") and any(r.verdict.session_id == self.victim for r in responses):
            if self.mode == "unsealed":
                batch.ClearField("seal")
            else:  # alter the victim's verdict and put its new digest in the seal: the signature no longer covers it
                n = next(i for i, r in enumerate(responses) if r.verdict.session_id == self.victim)
                v = responses[n].verdict
                v.token_id = (v.token_id + 1) % V
                d = bytearray(batch.seal.digests)
                d[32 * n : 32 * (n + 1)] = verdict_digest(v)
                batch.seal.digests = bytes(d)
            self.mode, self.fired = "", self.fired + 1
            return
        if self.mode == "reordered" and any(r.verdict.session_id == self.victim for r in responses) and len(responses) > 1:
            order = [pb.StepResponse() for _ in responses]
            for dst, src in zip(order, reversed(list(responses)), strict=True):
                dst.CopyFrom(src)
            for dst, src in zip(responses, order, strict=True):
                dst.CopyFrom(src)
            self.mode, self.fired = "", self.fired + 1
            return
        for r in responses:
            self._one(r)

    def _one(self, r: pb.StepResponse) -> None:
        if not r.HasField("verdict"):
            return
        v = r.verdict
        key = (v.session_id, v.step)
        self.seen.setdefault(key, []).append(v.SerializeToString())
        if v.session_id != self.victim or self.mode in ("", "reordered"):
            return
        if self.mode == "forged":
            v.token_id = (v.token_id + 1) % V  # the signature no longer covers it
        elif self.mode == "replayed":
            v.ParseFromString(self.seen[(v.session_id, v.step - 1)][-1])
        elif self.mode == "cross_session":
            other = next(b for (sid, step), bs in self.seen.items() if sid != v.session_id and step == v.step for b in bs)
            v.ParseFromString(other)
        elif self.mode == "cross_opening":
            v.ParseFromString(self.seen[key][0])  # the same id and step, from its earlier opening
        self.mode, self.fired = "", self.fired + 1

    def close(self) -> None:
        self.server.stop(0)
        self.upstream.close()
