"""Engine-side client: writes logits into the ring, asks for a verdict, verifies it.

:meth:`GuardedSession.step` returns a verified :class:`fse.v1.Verdict` whose token the
engine must force, or raises a :class:`~sidecar.errors.GuardError`:

- :class:`GuardAbort`: the sidecar decided ABORT (``.reasons`` says why);
- :class:`VerdictRejected`: a verdict arrived but its signature, session, step or chain
  link does not verify (forgery, replay, reorder);
- :class:`GuardUnavailable` / :class:`StepRefused`: no verdict within ``step_timeout``,
  the sidecar is gone, or it refused the step.

It never returns a token without a valid verdict; after any error the session is dead
(fail closed) and every further step raises.
"""

from __future__ import annotations

import os
import queue
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias, cast

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.core import chain
from sidecar.core.sampling import SamplingParams
from sidecar.core.vocab import vocab_digest
from sidecar.errors import FseError, GuardAbort, GuardError, GuardUnavailable, StepRefused, VerdictRejected
from sidecar.ring import FrameWriter, RingWriter
from sidecar.signing import TrustedKeys, Verifier, sealed_digest, verdict_digest
from sidecar.wire import params_from_pb, params_to_pb

from .lane import LaneChannel

_CLOSED = object()
Outcome: TypeAlias = "pb.Verdict | GuardError"  # one row of a batch: a verified verdict, or why not
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


_PROBE_VOCAB = [b"\x00fse-probe-0", b"\x00fse-probe-1"]


KEY_FIX = (
    "give the engine the sidecar's public key (the .pub beside its signing_key_file) with --public-key or "
    "FSE_PUBLIC_KEY; during a key rotation, give both"
)


def unreachable_because(target: str) -> str:
    """Why nothing answers at ``target``, and what to do about it, as far as this side can
    tell: for a Unix socket, whether it exists, is a socket, accepts connections and lets
    this user in."""
    if not target.startswith("unix:"):
        return (
            f"nothing answered at {target}: is the sidecar running and listening there (its listen:), and are both "
            "sides configured for TLS alike?"
        )
    path = target.removeprefix("unix:").removeprefix("//")
    if not os.path.lexists(path):
        return (
            f"no socket at {path}: start the sidecar (fse-sidecar serve --config FILE, with listen: unix://{path}), "
            "or point --sidecar / FSE_SIDECAR at the socket it listens on"
        )
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        return f"{path} is not a Unix socket: point --sidecar / FSE_SIDECAR at the socket the sidecar listens on"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except PermissionError:
            return (
                f"permission denied on {path}: the sidecar makes its socket for its own user (mode 0600); "
                "when the engine runs as another user, set unix_socket_group (a group both share) and "
                "unix_socket_mode: 0o660 in the sidecar's configuration"
            )
        except ConnectionRefusedError:
            return f"nothing accepts connections on {path}: the sidecar that made it is not running (a stale socket); start it"
        except OSError as exc:
            return f"cannot connect to {path}: {exc.strerror or exc}"
    return "the sidecar accepts connections but does not say SERVING (starting, stopping, or busy past the deadline)"


def _unavailable(exc: grpc.RpcError, what: str) -> GuardUnavailable:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return GuardUnavailable(f"{what}: sidecar unavailable ({code.name if code else 'error'}: {detail})")


def _rpc_error(exc: grpc.RpcError, what: str) -> GuardUnavailable:
    """Transport trouble (UNAVAILABLE, DEADLINE_EXCEEDED) or a refusal that names its status."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return _unavailable(exc, what)
    return StepRefused(f"{what} refused: {code.name}: {exc.details()}", code.name)


class _Watchdog(threading.Thread):
    """Cancels a call when the step it waits for passes its deadline.

    The waiting thread blocks directly on the response stream (no hand-off between
    threads on the hot path). This thread sleeps until the earliest deadline it knows
    of and is only woken when it was idle, so a busy stream of steps costs it about one
    wake-up per ``step_timeout``, not one per step.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True, name="fse-step-watchdog")
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._call: Any = None
        self._sleeping_until: float | None = None  # None: idle, waiting for a notify
        self._stop = False
        self.fired = False

    def arm(self, call: Any, deadline: float) -> None:
        with self._cond:
            self._call, self._deadline = call, deadline
            self.fired = False
            if self._sleeping_until is None or self._sleeping_until > deadline:
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def run(self) -> None:
        with self._cond:
            while not self._stop:
                if self._deadline is None:
                    self._sleeping_until = None
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self.fired = True
                    self._deadline = None
                    if self._call is not None:
                        self._call.cancel()
                    continue
                self._sleeping_until = self._deadline
                self._cond.wait(remaining)


class StreamCall:
    """A bidirectional stream used as request/response pairs, with a per-message deadline."""

    def __init__(self, method: Any) -> None:
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._call = method(self._request_iter())
        self._watchdog = _Watchdog()
        self._watchdog.start()

    def _request_iter(self) -> Iterator[Any]:
        while True:
            item = self._requests.get()
            if item is _CLOSED:
                return
            yield item

    def roundtrip(self, request: Any, timeout: float, what: str) -> Any:
        self._watchdog.arm(self._call, time.monotonic() + timeout)
        self._requests.put(request)
        try:
            return next(self._call)
        except StopIteration:
            raise GuardUnavailable(f"{what}: the sidecar closed the stream") from None
        except grpc.RpcError as exc:
            if self._watchdog.fired:
                raise GuardUnavailable(f"{what}: no answer within {timeout * 1000:.0f} ms (deadline)") from None
            raise _unavailable(exc, what) from None
        finally:
            self._watchdog.disarm()

    @property
    def finished(self) -> bool:
        """The RPC has ended (the sidecar went away while the stream was idle)."""
        return bool(self._call.done())

    def close(self) -> None:
        self._requests.put(_CLOSED)
        self._watchdog.stop()
        self._call.cancel()


@dataclass(frozen=True, slots=True)
class Expected:
    """What the adapter asked for: the verdict must be for this."""

    session_id: str
    step: int
    prev_chain_hash: bytes  # the previous verdict's chain hash (the genesis before step 0)
    policy_digest: str  # the one OpenSession named
    vocab_size: int  # 0 when unknown to this client


def check_verdict(
    resp: pb.StepResponse, expect: Expected, trusted: TrustedKeys, sealed: tuple[str, bytes] | None = None
) -> pb.Verdict:
    """The verdict in ``resp`` when it may be forced; else raise (VERDICT.md "What an adapter
    checks", in that order): StepRefused for an error answer, VerdictRejected (``.check``
    names the check) for a verdict that does not verify or bind, GuardAbort for a genuine
    ABORT. ``sealed``: the verdict came in a sealed batch whose seal verified: (the seal's
    key id, its digest for this row) stand for the verdict's own signature."""
    step = expect.step
    if resp.HasField("error"):
        e = resp.error
        name = _CODE_NAMES.get(e.code, grpc.StatusCode.UNKNOWN.name)
        raise StepRefused(f"step {step} refused by the sidecar: {name}: {e.message}", name)
    v = resp.verdict
    if not trusted.trusts(v.key_id):
        raise VerdictRejected(f"step {step}: verdict names key {v.key_id!r}, which this adapter does not trust: {KEY_FIX}", "key")
    if sealed is not None:
        if v.key_id != sealed[0] or verdict_digest(v) != sealed[1]:
            raise VerdictRejected(
                f"step {step}: verdict is not the one the batch seal signed for its row "
                "(altered, replayed or moved: its signature does not verify)",
                "seal",
            )
    elif not trusted.verify(v):
        raise VerdictRejected(f"step {step}: verdict signature does not verify with its key {v.key_id}", "signature")
    if v.session_id != expect.session_id:
        raise VerdictRejected(f"step {step}: verdict is for session {v.session_id!r}, not {expect.session_id!r}", "session")
    if v.step != step:
        raise VerdictRejected(f"verdict is for step {v.step}, expected step {step} (stale or reordered)", "step")
    if v.policy_digest != expect.policy_digest:
        raise VerdictRejected(
            f"step {step}: verdict names policy {v.policy_digest[:12]!r}, the session runs under another", "policy"
        )
    if v.prev_chain_hash != expect.prev_chain_hash:
        raise VerdictRejected(f"step {step}: verdict does not link to the previous chain hash (replay or gap)", "link")
    frame = chain.frame_bytes(v.session_id, v.step, v.token_id, v.decision, v.sampler, v.proposals, v.reasons)
    if v.chain_hash != chain.chain_next(expect.prev_chain_hash, frame):
        raise VerdictRejected(f"step {step}: verdict chain hash does not match its contents", "chain")
    if v.decision == pb.DECISION_ABORT:
        why = "; ".join(f"{r.code}: {r.detail}" for r in v.reasons) or "no reason given"
        raise GuardAbort(f"step {step}: guard aborted the sequence ({why})", v.reasons, step)
    if v.decision not in (pb.DECISION_ACCEPT, pb.DECISION_HEALED):
        raise VerdictRejected(f"step {step}: verdict has decision {v.decision}, not ACCEPT/HEALED/ABORT", "decision")
    if v.token_id < 0 or (expect.vocab_size and v.token_id >= expect.vocab_size):
        raise VerdictRejected(f"step {step}: verdict token {v.token_id} is outside the vocabulary", "token")
    return v


@dataclass(frozen=True, slots=True)
class Compact:
    """A COMPACT row as an engine computed it (RING.md "COMPACT payload"): the whole row's
    ``moments`` (f64: log_sum_exp, entropy, varentropy, mean, variance, l2_norm, max,
    reserved) and its k largest logits, highest first, with their ids."""

    moments: np.ndarray
    top_logits: np.ndarray
    top_ids: np.ndarray


@dataclass(frozen=True)
class ClientTls:
    """mTLS toward a sidecar on TCP: the CA that signed the sidecar's certificate, and
    this engine's certificate and key (signed by the CA the sidecar trusts)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes(),
            certificate_chain=Path(self.cert_file).read_bytes(),
        )


LANES = ("grpc", "grpc-unary", "shm")


class GuardClient:
    """A connection to one sidecar. ``target``: ``unix:/path.sock`` or ``host:port``
    (with ``tls`` for a sidecar that serves mTLS)."""

    def __init__(
        self,
        target: str,
        verify_key: Verifier | str | Path | Sequence[Verifier | str | Path],
        *,
        step_timeout: float = 2.0,
        rpc_timeout: float = 10.0,
        tls: ClientTls | None = None,
    ) -> None:
        if step_timeout <= 0 or rpc_timeout <= 0:
            raise ValueError("step_timeout and rpc_timeout must be > 0 seconds")
        self.target = target
        # Ed25519 public key files or shared HMAC secret files (see sidecar.signing): more
        # than one while the sidecar's signing key is being rotated.
        self.trusted = TrustedKeys.load(verify_key)
        self.step_timeout = step_timeout
        self.rpc_timeout = rpc_timeout
        options = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
            # a restarted sidecar (a native sidecar restarts in place) is found again within a
            # second, not after gRPC's default back-off of up to two minutes
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls is not None:
            self._channel = grpc.secure_channel(target, tls.credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GuardServiceStub(self._channel)
        self._vocab_sizes: dict[str, int] = {}
        self._batch_stream: StreamCall | None = None  # opened by the first step_batch

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the sidecar's health service says SERVING."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        end = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="fse.v1.GuardService"), timeout=0.5, wait_for_ready=True)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.05)
        why = unreachable_because(self.target)
        if isinstance(last, grpc.RpcError) and why.startswith("the sidecar accepts"):
            why += f"; the last health check: {last.code().name}: {last.details()}"
        raise GuardUnavailable(f"sidecar at {self.target} not ready after {timeout:.1f}s: {why}")

    def check_usable(self, timeout: float = 1.0) -> str:
        """Readiness: the sidecar is SERVING *and* signs with a key this client trusts (a
        sidecar whose verdicts would all be refused is not ready). A two-token probe
        vocabulary is registered (cheap, idempotent: the same digest each time) for the
        key id it answers with; returns that key id, raises GuardUnavailable or
        VerdictRejected saying why not."""
        self.wait_ready(timeout)
        try:
            r = self._stub.RegisterVocabulary(pb.RegisterVocabularyRequest(tokens=_PROBE_VOCAB), timeout=timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "RegisterVocabulary (readiness probe)") from None
        if not self.trusted.trusts(r.key_id):
            said = f"key {r.key_id}" if r.key_id else "no key id (an older sidecar)"
            raise VerdictRejected(
                f"the sidecar signs with {said}; this engine trusts {', '.join(self.trusted.key_ids)}: {KEY_FIX}", "key"
            )
        return r.key_id

    def register_vocabulary(self, tokens: Sequence[bytes]) -> str:
        try:
            r = self._stub.RegisterVocabulary(pb.RegisterVocabularyRequest(tokens=list(tokens)), timeout=self.rpc_timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "RegisterVocabulary") from None
        expected = vocab_digest(tokens)
        if r.vocab_digest != expected:
            raise VerdictRejected(f"sidecar registered vocabulary {r.vocab_digest}, expected {expected}")
        self._vocab_sizes[expected] = len(tokens)
        return r.vocab_digest

    def open_session(
        self,
        vocab_digest: str,
        sampling: SamplingParams,
        *,
        ring: RingWriter | None = None,
        prompt_token_ids: Sequence[int] = (),
        policy: str = "",
        session_id: str | None = None,
        model_id: str = "",
        lane: str = "grpc",
    ) -> GuardedSession:
        """``lane``: "grpc" (any engine, the default: a Steps stream), "grpc-unary" (one Step
        call per token: for engines or proxies that cannot hold a stream open; each call pays
        its own set-up) or "shm" (co-located: the step and the
        verdict go through ``ring``, which needs a verdict area, and two eventfds)."""
        if lane not in LANES:
            raise ValueError(f"lane must be one of {', '.join(LANES)}, got {lane!r}")
        if lane == "shm" and (ring is None or not ring.layout.lane):
            raise ValueError(
                "the shm lane needs a ring made with a verdict capacity (RingWriter.create(..., verdict_capacity=...))"
            )
        sid = session_id or uuid.uuid4().hex
        req = pb.OpenSessionRequest(
            session_id=sid,
            vocab_digest=vocab_digest,
            sampling=params_to_pb(sampling),
            policy=policy,
            prompt_token_ids=list(prompt_token_ids),
            ring_name=ring.name if ring is not None else "",
            model_id=model_id,
            fast_lane=lane == "shm",
        )
        try:
            r = self._stub.OpenSession(req, timeout=self.rpc_timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "OpenSession") from None
        if r.session_id != sid:
            raise VerdictRejected(f"OpenSession answered for session {r.session_id!r}, asked for {sid!r}")
        if not self.trusted.trusts(r.key_id):
            raise VerdictRejected(f"sidecar signs with key {r.key_id}, this adapter trusts {', '.join(self.trusted.key_ids)}")
        # The genesis must bind what this adapter asked for: its id, sampling, vocabulary and
        # model, a fresh nonce, the policy the sidecar names and the key it signs with.
        opening = chain.Opening(
            sid,
            r.opening_nonce,
            params_from_pb(req.sampling).canonical_bytes(),
            r.policy_digest,
            vocab_digest,
            model_id,
            r.key_id,
        )
        if len(r.opening_nonce) < 16 or len(r.session_secret) < 32 or r.genesis_hash != opening.genesis():
            raise VerdictRejected(
                f"OpenSession for {sid!r}: the genesis does not bind this opening (nonce, sampling, digests, model, key)"
            )
        vocab_size = self._vocab_sizes.get(vocab_digest, ring.layout.vocab_size if ring is not None else 0)
        session = GuardedSession(self, sid, r.session_tag, ring, vocab_size, r.policy_digest, r.genesis_hash, r.session_secret)
        session.unary = lane == "grpc-unary"
        if lane == "shm":
            assert ring is not None
            try:
                session.lane = LaneChannel(r.lane_socket, r.lane_token, ring, self.rpc_timeout)
            except GuardUnavailable:
                session.close()
                raise
        return session

    def step_batch(
        self, rows: Sequence[tuple[GuardedSession, np.ndarray | Compact]], ring: RingWriter | None = None
    ) -> list[Outcome]:
        """One decoding step of many sessions in one round trip: each session's next row,
        FULL (logits) or :class:`Compact`. With ``ring`` (the sessions were opened on it),
        every row goes into one frame of it; without, the rows travel in the message.

        Returns one :data:`Outcome` per row, in order: the verified verdict whose token
        must be forced, or the :class:`GuardError` that ends that session alone (ABORT,
        refusal, a verdict that does not verify; a dead session's own error). A transport
        failure or a missed deadline fails every row of the batch: no token without its
        verdict. Not thread-safe: one engine thread drives a client's batches."""
        out: list[Outcome | None] = [None] * len(rows)
        live = []
        for i, (s, _) in enumerate(rows):
            if s.dead is not None:
                out[i] = GuardUnavailable(f"session {s.session_id} is closed after an earlier failure: {s.dead}")
            elif s.client is not self:
                out[i] = GuardUnavailable(f"session {s.session_id} belongs to another client")
            else:
                live.append(i)
        batch = pb.StepsRequest()
        batch.batch.seal = True  # one signature for the batch: one check here instead of one a row
        slot = None
        try:
            if ring is not None and live:
                slot = ring.acquire()
                refs = []
                with ring.frame(slot) as f:
                    for i in list(live):
                        try:
                            refs.append(self._write_row(f, rows[i][0], rows[i][1]))
                        except FseError as exc:  # this row's own fault (shape, k): its session ends
                            live.remove(i)
                            out[i] = rows[i][0]._failed(exc)
            if not live:
                return cast(list[Outcome], out)
            for n, i in enumerate(live):
                s, row = rows[i]
                r = batch.batch.steps.add()
                r.session_id, r.session_secret, r.step = s.session_id, s._secret, s.next_step
                if ring is not None:
                    r.ring.slot, r.ring.row, r.ring.seq = slot, refs[n], f.seq
                elif isinstance(row, Compact):
                    r.compact.moments[:] = row.moments.tolist()
                    r.compact.top_logits[:] = row.top_logits.tolist()
                    r.compact.top_ids[:] = row.top_ids.tolist()
                else:
                    r.inline.data = np.ascontiguousarray(row, dtype="<f4").tobytes()
                    r.inline.dtype = pb.DTYPE_F32
            if self._batch_stream is not None and self._batch_stream.finished:
                # it ended while idle (a sidecar restart): nothing of this batch went on it
                self._batch_stream.close()
                self._batch_stream = None
            if self._batch_stream is None:
                self._batch_stream = StreamCall(self._stub.Steps)
            resp = self._batch_stream.roundtrip(batch, self.step_timeout, f"a batch of {len(live)} steps").batch
            if len(resp.responses) != len(live):
                raise VerdictRejected(f"a batch of {len(live)} steps was answered with {len(resp.responses)} responses")
            if any(r.HasField("verdict") for r in resp.responses) and not (
                resp.HasField("seal") and self.trusted.verify_seal(resp.seal, len(resp.responses))
            ):
                raise VerdictRejected(
                    f"the batch's seal is missing or does not verify (key {resp.seal.key_id!r}): no row's verdict can be trusted",
                    "seal",
                )
        except Exception as exc:  # no verdict for any row: every session of the batch ends
            if self._batch_stream is not None and isinstance(exc, GuardUnavailable):
                self._batch_stream.close()
                self._batch_stream = None
            for i in live:
                out[i] = rows[i][0]._failed(exc)
            return cast(list[Outcome], out)
        finally:
            if slot is not None:
                ring.release(slot)  # type: ignore[union-attr]
        for n, (i, answer) in enumerate(zip(live, resp.responses, strict=True)):
            s = rows[i][0]
            try:
                out[i] = s._verify(s.next_step, answer, (resp.seal.key_id, sealed_digest(resp.seal, n)))
            except GuardError as exc:
                out[i] = s._failed(exc)
        return cast(list[Outcome], out)

    @staticmethod
    def _write_row(f: FrameWriter, s: GuardedSession, row: np.ndarray | Compact) -> int:
        if isinstance(row, Compact):
            return f.write_compact(s.tag, s.next_step, row.moments, row.top_logits, row.top_ids)
        return f.write_row(s.tag, s.next_step, row)

    def reload_policy(self) -> dict[str, str]:
        """Ask the sidecar to load its configuration file again (ReloadPolicy).

        Returns policy name -> digest now in force for new sessions; raises
        :class:`StepRefused` with the sidecar's reason (naming the rule and field) when the
        file is refused, in which case the old policies stay in force.
        """
        try:
            r = self._stub.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=self.rpc_timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "ReloadPolicy") from None
        return dict(r.policy_digests)

    def close(self) -> None:
        if self._batch_stream is not None:
            self._batch_stream.close()
        self._channel.close()

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Phases(NamedTuple):
    """One step's time in seconds on the engine's side: ``write`` the row (or build the
    request), ``wait`` for the answer, ``verify`` it; ``sidecar`` is the part of ``wait`` the
    sidecar reports it spent judging (fast lane only, unsigned, for measurement; 0 on gRPC)."""

    write: float = 0.0
    wait: float = 0.0
    verify: float = 0.0
    sidecar: float = 0.0


@dataclass(frozen=True, slots=True)
class Pending:
    """A step submitted on the fast lane, its verdict not yet collected."""

    step: int
    slot: int
    seq: int
    deadline: float  # monotonic seconds
    started: float  # perf_counter at the submit, for the phases
    sent: float


class GuardedSession:
    """One sequence's step stream. Not thread-safe: one engine thread drives it."""

    def __init__(
        self,
        client: GuardClient,
        session_id: str,
        tag: int,
        ring: RingWriter | None,
        vocab_size: int,
        policy_digest: str,
        genesis: bytes,
        secret: bytes,
    ) -> None:
        self.client = client
        self._secret = secret  # sent with every step and the close; never logged
        self.policy_digest = policy_digest  # the policy the sidecar opened this session under
        self.vocab_size = vocab_size  # 0 when unknown to this client (registered elsewhere)
        self.session_id = session_id
        self.tag = tag
        self.ring = ring
        self.next_step = 0
        self.genesis = genesis
        self.chain_hash = genesis
        self.receipt: pb.Receipt | None = None  # set by a clean close()
        self.lane: LaneChannel | None = None  # the fast lane, when opened with lane="shm"
        self.phases = Phases()  # the last step's; the adapter's own CPU is write and verify
        self.dead: Exception | None = None
        # The Steps stream (and its threads) only for the gRPC lane, opened at the first
        # step: a fast-lane session never sends a gRPC message per token.
        self._stream: StreamCall | None = None
        self.unary = False  # lane "grpc-unary": one Step call per token instead of the stream

    def step(self, logits: np.ndarray) -> pb.Verdict:
        """Verdict for the next step's logits row; raises GuardError unless it verifies."""
        if self.dead is not None:
            raise GuardUnavailable(f"session {self.session_id} is closed after an earlier failure: {self.dead}")
        step = self.next_step
        try:
            return self._step(step, logits)
        except Exception as exc:
            self._fail(exc)
            raise

    def submit(self, logits: np.ndarray) -> Pending:
        """Fast lane: write the next step's row and ring, without waiting; :meth:`collect`
        gets its verdict. Between the two the engine may compute ahead (speculation)."""
        if self.dead is not None:
            raise GuardUnavailable(f"session {self.session_id} is closed after an earlier failure: {self.dead}")
        if self.lane is None or self.ring is None:
            raise GuardUnavailable("submit/collect need the fast lane (open the session with lane='shm')")
        try:
            t0 = time.perf_counter()
            slot = self.ring.acquire()
            with self.ring.frame(slot) as f:
                f.write_row(self.tag, self.next_step, logits)
            self.lane.send(slot, f.seq, self.client.step_timeout)
            return Pending(self.next_step, slot, f.seq, time.monotonic() + self.client.step_timeout, t0, time.perf_counter())
        except Exception as exc:
            self._fail(exc)
            raise

    def collect(self, p: Pending) -> pb.Verdict:
        """The verified verdict of a :meth:`submit`; raises GuardError unless it verifies."""
        assert self.lane is not None and self.ring is not None
        try:
            try:
                resp = self.lane.wait(p.slot, p.seq, p.deadline, self.client.step_timeout, f"step {p.step}")
            finally:
                self.ring.release(p.slot)
            t2 = time.perf_counter()
            v = self._verify(p.step, resp)
            self.phases = Phases(p.sent - p.started, t2 - p.sent, time.perf_counter() - t2, self.lane.service_s)
            return v
        except Exception as exc:
            self._fail(exc)
            raise

    def _failed(self, exc: Exception) -> GuardError:
        """Fail the session for ``exc``; the GuardError a batch reports for it."""
        self._fail(exc)
        return exc if isinstance(exc, GuardError) else GuardUnavailable(f"session {self.session_id}: {exc}")

    def _fail(self, exc: Exception) -> None:
        self.dead = exc
        self._shutdown()
        if not isinstance(exc, GuardUnavailable) or isinstance(exc, StepRefused):
            self._release()  # the sidecar is there: free the session's slot now, not at the idle reaper

    def _step(self, step: int, logits: np.ndarray) -> pb.Verdict:
        slot = None
        t0 = time.perf_counter()
        try:
            if self.ring is not None:
                slot = self.ring.acquire()
                with self.ring.frame(slot) as f:
                    row = f.write_row(self.tag, step, logits)
                if self.lane is not None:
                    t1 = time.perf_counter()
                    resp = self.lane.roundtrip(slot, f.seq, self.client.step_timeout, f"step {step}")
                    t2 = time.perf_counter()
                    v = self._verify(step, resp)
                    self.phases = Phases(t1 - t0, t2 - t1, time.perf_counter() - t2, self.lane.service_s)
                    return v
                item = self._steps_request(step)
                item.request.ring.slot, item.request.ring.row, item.request.ring.seq = slot, row, f.seq
            else:
                item = self._steps_request(step)
                item.request.inline.data = np.ascontiguousarray(logits, dtype="<f4").tobytes()
                item.request.inline.dtype = pb.DTYPE_F32
            t1 = time.perf_counter()
            if self.unary:
                try:
                    resp = self.client._stub.Step(item.request, timeout=self.client.step_timeout)
                except grpc.RpcError as exc:
                    raise _rpc_error(exc, f"Step {step}") from None
            else:
                if self._stream is None:
                    self._stream = StreamCall(self.client._stub.Steps)
                resp = self._stream.roundtrip(item, self.client.step_timeout, f"step {step}").response
            t2 = time.perf_counter()
        finally:
            if slot is not None:
                self.ring.release(slot)  # type: ignore[union-attr]
        v = self._verify(step, resp)
        self.phases = Phases(t1 - t0, t2 - t1, time.perf_counter() - t2)
        return v

    def _steps_request(self, step: int) -> pb.StepsRequest:
        """A Steps message whose request is filled in place (wrapping a built StepRequest
        would copy it, and an inline row is the whole vocabulary)."""
        item = pb.StepsRequest()
        r = item.request
        r.session_id, r.session_secret, r.step = self.session_id, self._secret, step
        return item

    def _verify(self, step: int, resp: pb.StepResponse, sealed: tuple[str, bytes] | None = None) -> pb.Verdict:
        expect = Expected(self.session_id, step, self.chain_hash, self.policy_digest, self.vocab_size)
        try:
            v = check_verdict(resp, expect, self.client.trusted, sealed)
        except GuardAbort:
            self._advance(step, resp.verdict.chain_hash)  # a genuine ABORT is in the chain too
            raise
        self._advance(step, v.chain_hash)
        return v

    def _advance(self, step: int, chain_hash: bytes) -> None:
        self.chain_hash = chain_hash
        self.next_step = step + 1

    def _shutdown(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self.lane is not None:
            self.lane.close()

    def _close_rpc(self, timeout: float) -> pb.CloseSessionResponse | None:
        try:
            req = pb.CloseSessionRequest(session_id=self.session_id, session_secret=self._secret)
            return self.client._stub.CloseSession(req, timeout=timeout)
        except grpc.RpcError:
            return None

    def _release(self) -> None:
        """Best-effort CloseSession after a fault, with a short deadline: it must not hold
        up the error the caller is about to get."""
        self._close_rpc(min(self.client.rpc_timeout, 1.0))

    def close(self) -> pb.CloseSessionResponse | None:
        """End the stream and close the session on the sidecar (best effort once dead).

        After a run that ended cleanly (or on the sidecar's ABORT), the receipt must be
        signed by a trusted key and hold this session's genesis, chain head and step count:
        it is kept in ``.receipt``; one that does not raises VerdictRejected."""
        was = self.dead
        if self.dead is None:
            self.dead = GuardUnavailable("session closed")
        r = self._close_rpc(self.client.rpc_timeout)  # before the lane's hang-up, which drops the session
        self._shutdown()
        if r is not None and (was is None or isinstance(was, GuardAbort)):
            self.receipt = self._checked_receipt(r.receipt)
        return r

    def _checked_receipt(self, rc: pb.Receipt) -> pb.Receipt:
        if not self.client.trusted.verify_receipt(rc):
            raise VerdictRejected(f"session {self.session_id}: the receipt's signature does not verify (key {rc.key_id})")
        got = (rc.session_id, rc.genesis_hash, rc.chain_hash, rc.steps)
        if got != (self.session_id, self.genesis, self.chain_hash, self.next_step):
            raise VerdictRejected(f"session {self.session_id}: the receipt does not match the verdicts this adapter verified")
        return rc
