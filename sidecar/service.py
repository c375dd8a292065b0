"""The guard service's logic, independent of the transport.

Holds the registered vocabularies, the open sessions and the attached rings; turns a
step request into a signed :class:`fse.v1.Verdict`. Raises :mod:`sidecar.errors` types,
which the gRPC layer maps to status codes. No gRPC here, so it is tested directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import math
import secrets
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np

from ._pb.fse.v1 import guard_pb2 as pb
from .audit import AuditDir, SessionAudit
from .config import SidecarConfig
from .core import ledger
from .core.batch_draw import Draw, first_draws
from .core.chain import Opening, Tally, checkpoint_bytes
from .core.compact import BatchedRow, CompactBatch, CompactRow
from .core.guards import Action, Sampler, Trip, health_band
from .core.policy import CompiledPolicy, compile_policies
from .core.redo import StepOutcome
from .core.sampling import Row
from .core.session import Session
from .core.values import Value
from .core.vocab import Vocabulary
from .errors import (
    AuditError,
    DuplicateSession,
    FseError,
    MalformedMessage,
    NotSessionOwner,
    RowError,
    TooManySessions,
    TooManyVocabularies,
    UnknownPolicy,
    UnknownSession,
    UnknownVocabulary,
    VocabularyError,
    shown,
)
from .record import Recorder
from .ring import BatchRow, RingReader
from .signing import VERDICT_METRIC_FIELDS, VERDICT_STREAM_FIELDS, Signer, verdict_fields_bytes
from .wire import params_from_pb, reason, receipt_json

# Inline row element types (PROTOCOL.md "Logits"): bf16 travels as its 16 bits (<u2).
_INLINE_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_F32: np.dtype("<f4"),
    pb.DTYPE_F16: np.dtype("<f2"),
    pb.DTYPE_BF16: np.dtype("<u2"),
}


MAX_MODEL_ID_BYTES = 256


# A verdict as the fields to build it with: a batch's verdicts are built in place, in one
# StepBatchResponse, rather than built one by one and copied into it.
VerdictFields = dict[str, Any]


class Judged(Value):
    """A batch row's verdict, as its fields; ``digest``: SHA-256 of its canonical bytes when
    the batch is sealed (the seal's entry for the row), else empty (the verdict is signed
    itself)."""

    _fields = ("fields", "digest")
    __slots__ = _fields

    def __init__(self, fields: VerdictFields, digest: bytes) -> None:
        self.fields: Final = fields
        self.digest: Final = digest


@dataclass
class _RingUse:
    reader: RingReader
    sessions: int = 0


@dataclass(frozen=True)
class Closed:
    """A closed session, its signed receipt, and its audit file still to sync and close."""

    session: Session
    receipt: pb.Receipt
    audit: SessionAudit | None


def session_opened(s: Session, key_id: str) -> pb.OpenSessionResponse:
    """OpenSession's answer for ``s``: what the engine needs to step and verify it."""
    return pb.OpenSessionResponse(
        session_id=s.session_id,
        session_tag=s.tag,
        genesis_hash=s.genesis_hash,
        opening_nonce=s.opening.opening_nonce if s.opening else b"",
        session_secret=s.secret,
        key_id=key_id,
        policy_digest=s.policy.digest,
    )


class GuardService:
    def __init__(
        self,
        config: SidecarConfig,
        signer: Signer,
        policies: dict[str, CompiledPolicy] | None = None,
        nonces: Callable[[], bytes] | None = None,
    ) -> None:
        """``nonces``: where opening nonces come from (16 random bytes each by default; a
        test that compares two openings byte for byte gives a fixed source)."""
        self.config = config
        self._nonce = nonces or (lambda: secrets.token_bytes(16))
        self.signer = signer
        # Compiled once here (start-up: a bad rule stops the sidecar before it listens)
        # and swapped whole by :meth:`use_policies` on a reload.
        self.policies = policies if policies is not None else compile_policies(config.policies)
        self._vocabs: OrderedDict[str, Vocabulary] = OrderedDict()  # least recently used first
        self._vocab_users: Counter[str] = Counter()  # open sessions per vocabulary digest
        self._session_vocab: dict[str, str] = {}
        self._sessions: dict[str, Session] = {}
        self._rings: dict[tuple[int, int], _RingUse] = {}  # by the segment (dev, inode), not its name
        self._session_ring: dict[str, tuple[int, int]] = {}
        self._client_sessions: Counter[str] = Counter()
        self._session_client: dict[str, str] = {}
        self._tags = itertools.count(1)
        self.audit = AuditDir(config.audit) if config.audit.dir is not None else None
        self.recorder = Recorder(config.record_dir) if config.record_dir is not None else None
        # Told of every session that goes, and why: "closed" or "aborted" (CloseSession after
        # a clean run or an ABORT), "reaped" (idle), "dropped" (its engine went), "shutdown".
        self.on_drop: list[Callable[[str, str], None]] = []
        self._audits: dict[str, SessionAudit] = {}

    # -- vocabularies -------------------------------------------------------------------
    def register_vocabulary(self, tokens: Sequence[bytes]) -> Vocabulary:
        """``tokens`` may be the request's repeated field: its size is checked before any copy."""
        return self.add_vocabulary(Vocabulary.build(tokens, self.config.max_vocab_size))

    def add_vocabulary(self, vocab: Vocabulary) -> Vocabulary:
        """Register a built vocabulary (the server builds big ones off the event loop)."""
        if vocab.size > self.config.max_vocab_size:
            raise VocabularyError(f"vocabulary of {vocab.size} tokens exceeds max_vocab_size {self.config.max_vocab_size}")
        if vocab.digest in self._vocabs:
            self._vocabs.move_to_end(vocab.digest)
            return self._vocabs[vocab.digest]
        if len(self._vocabs) >= self.config.max_vocabularies:
            unused = next((d for d in self._vocabs if not self._vocab_users[d]), None)
            if unused is None:
                raise TooManyVocabularies(
                    f"max_vocabularies ({self.config.max_vocabularies}) are registered and each is used by an open session"
                )
            del self._vocabs[unused]
        self._vocabs[vocab.digest] = vocab
        return vocab

    def vocabulary(self, digest: str) -> Vocabulary:
        try:
            vocab = self._vocabs[digest]
        except KeyError:
            raise UnknownVocabulary(f"vocabulary {shown(digest)} is not registered; call RegisterVocabulary first") from None
        self._vocabs.move_to_end(digest)
        return vocab

    # -- sessions -------------------------------------------------------------------------
    @property
    def live_sessions(self) -> int:
        return len(self._sessions)

    def open_session(
        self, req: pb.OpenSessionRequest, client: str | None = None, prompt_ids: np.ndarray | None = None
    ) -> Session:
        """Open ``req``'s session for ``client`` (the connection or certificate it came
        over; None where the transport cannot tell clients apart). ``prompt_ids`` is the
        request's prompt already converted (the server does that off the event loop)."""
        vocab = self.vocabulary(req.vocab_digest)
        policy_name = req.policy or "default"
        policy = self.policies.get(policy_name)
        if policy is None:
            raise UnknownPolicy(f"policy {shown(policy_name)} is not configured (known: {sorted(self.policies)})")
        sid = req.session_id or uuid.uuid4().hex
        if sid in self._sessions:
            raise DuplicateSession(f"session {sid!r} is already open")
        if len(self._sessions) >= self.config.max_sessions:
            raise TooManySessions(f"max_sessions ({self.config.max_sessions}) sessions are open; close one first")
        if client is not None and self._client_sessions[client] >= self.config.max_sessions_per_client:
            raise TooManySessions(
                f"max_sessions_per_client ({self.config.max_sessions_per_client}) sessions are open "
                "from this client; close one first"
            )
        if req.fast_lane and not req.ring_name:
            raise RowError("the fast lane goes through a ring: name one (ring_name) with a fast-lane area")
        if len(req.model_id.encode()) > MAX_MODEL_ID_BYTES:
            raise MalformedMessage(f"model_id must be at most {MAX_MODEL_ID_BYTES} bytes, got {len(req.model_id.encode())}")
        params = params_from_pb(req.sampling)
        if params.repetition_window > self.config.max_repetition_window:  # the ids a session keeps
            raise RowError(
                f"sampling.repetition_window {params.repetition_window} exceeds max_repetition_window "
                f"({self.config.max_repetition_window})"
            )
        n_prompt = len(req.prompt_token_ids)
        if n_prompt > self.config.max_prompt_tokens:
            raise RowError(f"a prompt of {n_prompt} tokens exceeds max_prompt_tokens ({self.config.max_prompt_tokens})")
        ids = np.asarray(req.prompt_token_ids if prompt_ids is None else prompt_ids, dtype=np.int64)  # one C pass
        bad = ids[ids >= vocab.size]
        if bad.size:
            raise RowError(f"prompt token ids {bad[:5].tolist()} are outside the vocabulary of {vocab.size}")
        prompt = ids[-params.repetition_window :].tolist() if params.repetition_window else []
        session = Session(
            session_id=sid,
            tag=next(self._tags),
            params=params,
            policy=policy,
            tokens=vocab.tokens,
            history=prompt,
            # a compact copy (not a view of the request's ids, nor a list of int objects: a
            # session keeps it for the recorder); prompt_chars tokens hold >= that many characters
            prompt=ids[len(ids) - min(len(ids), policy.loop_guard.prompt_chars) :].astype(np.uint32),
            ring_name=req.ring_name,
            last_active=time.monotonic(),
            opening=Opening(
                sid,
                self._nonce(),
                params.canonical_bytes(),
                policy.digest,
                vocab.digest,
                req.model_id,
                self.signer.key_id,
            ),
            secret=secrets.token_bytes(32),
        )
        if req.ring_name:
            # Opened anew each time: a name the engine re-created is another segment, and
            # the session must read the one the name means now (issue 8, item 5).
            reader = RingReader(req.ring_name)
            use = self._rings.get(reader.identity)
            if use is None:
                use = _RingUse(reader)
            else:
                reader.close()
            if req.fast_lane and not use.reader.layout.lane:
                if use.sessions == 0:
                    use.reader.close()
                raise RowError(f"ring {shown(req.ring_name)} has no fast-lane area: create it with a verdict capacity (RING.md)")
            lay = use.reader.layout
            if req.fast_lane and (lay.slot_count > self.config.max_lane_slots or lay.row_capacity > self.config.max_batch_rows):
                # a doorbell reads every slot's request and answers up to a frame's rows on the
                # loop all sessions share: the ring's shape bounds that work
                if use.sessions == 0:
                    use.reader.close()
                raise RowError(
                    f"ring {shown(req.ring_name)} has {lay.slot_count} slots of {lay.row_capacity} rows; a fast-lane ring "
                    f"may have at most max_lane_slots ({self.config.max_lane_slots}) of max_batch_rows "
                    f"({self.config.max_batch_rows})"
                )
            if use.reader.layout.vocab_size != vocab.size:
                if use.sessions == 0:
                    use.reader.close()
                raise RowError(
                    f"ring {shown(req.ring_name)} holds rows of {use.reader.layout.vocab_size} logits, "
                    f"the vocabulary has {vocab.size} tokens"
                )
            use.sessions += 1
            self._rings[use.reader.identity] = use
            self._session_ring[sid] = use.reader.identity
        if self.audit is not None:
            assert session.opening is not None
            genesis = ledger.genesis_record(session.opening, params, policy_name, self.signer.algorithm, time.time_ns())
            try:
                self._audits[sid] = self.audit.open(sid, session.opening.opening_nonce, genesis)
            except AuditError:
                self._release_ring(sid)
                raise
        self._sessions[sid] = session
        if self.recorder is not None:
            self.recorder.open(session, vocab.digest, vocab.tokens)
        if client is not None:
            self._client_sessions[client] += 1
            self._session_client[sid] = client
        self._session_vocab[sid] = vocab.digest
        self._vocab_users[vocab.digest] += 1
        return session

    def session(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSession(f"session {session_id!r} is not open") from None

    def owned_session(self, session_id: str, secret: bytes) -> Session:
        """The session, if ``secret`` is its opener's (constant-time comparison)."""
        s = self.session(session_id)
        if not hmac.compare_digest(secret, s.secret):
            raise NotSessionOwner(f"session {session_id}: the request does not carry this session's secret")
        return s

    def close_session(self, session_id: str, secret: bytes) -> Closed:
        """Close on the opener's request (its secret): the signed receipt, written as the
        audit file's close record. The caller syncs and closes the file (off the loop)."""
        s = self.owned_session(session_id, secret)
        receipt = pb.Receipt(
            session_id=s.session_id,
            genesis_hash=s.genesis_hash,
            chain_hash=s.chain_hash,
            steps=s.tally.steps,
            accepted=s.tally.accepted,
            healed=s.tally.healed,
            aborted=s.tally.aborted,
            first_timestamp_ns=s.tally.first_timestamp_ns,
            last_timestamp_ns=s.tally.last_timestamp_ns,
            policy_digest=s.policy.digest,
        )
        self.signer.sign_receipt(receipt)
        log = self._audits.pop(session_id, None)
        if log is not None:
            record = {"kind": "close", "session": s.session_id, "receipt": receipt_json(receipt), "timestamp_ns": time.time_ns()}
            with contextlib.suppress(AuditError):  # the frames are all there; verify says "not closed"
                log.append(record)
        self._drop(session_id, "aborted" if s.aborted else "closed")
        return Closed(s, receipt, log)

    def drop_session(self, session_id: str) -> None:
        """Close a session whose engine went away (no receipt: nobody is there to take it)."""
        if session_id in self._sessions:
            self._drop(session_id, "dropped")

    def ring_reader(self, session_id: str) -> RingReader:
        ring = self._session_ring.get(session_id)
        if ring is None:
            raise RowError(f"session {session_id} was opened without a ring")
        return self._rings[ring].reader

    def _drop(self, session_id: str, why: str) -> Session:
        s = self._sessions.pop(session_id, None)
        if s is None:
            raise UnknownSession(f"session {session_id!r} is not open")
        for hook in self.on_drop:
            hook(session_id, why)
        self._vocab_users[self._session_vocab.pop(session_id)] -= 1
        self._release_ring(session_id)
        if self.recorder is not None:
            self.recorder.close(session_id)
        log = self._audits.pop(session_id, None)
        if log is not None:  # reaped, dropped or shut down: no receipt, a signed final checkpoint instead
            self._checkpoint(s, log, s.tally, s.chain_hash, ended=why)
            log.close()
        client = self._session_client.pop(session_id, None)
        if client is not None:
            self._client_sessions[client] -= 1
            if not self._client_sessions[client]:
                del self._client_sessions[client]
        return s

    def _release_ring(self, session_id: str) -> None:
        ring = self._session_ring.pop(session_id, None)
        if ring is not None:
            use = self._rings[ring]
            use.sessions -= 1
            if use.sessions == 0:
                del self._rings[ring]
                use.reader.close()

    def close(self) -> None:
        for sid in list(self._sessions):
            self._drop(sid, "shutdown")
        if self.audit is not None:
            self.audit.close()
        if self.recorder is not None:
            self.recorder.stop()

    def use_policies(self, policies: dict[str, CompiledPolicy]) -> None:
        """New sessions get ``policies``; open sessions keep the policy they opened with."""
        if "default" not in policies:
            raise UnknownPolicy("a policy set must define 'default'")
        self.policies = dict(policies)

    def reap_idle(self, now: float) -> list[str]:
        """Close sessions with no activity since ``now - session_idle_timeout_s``."""
        cutoff = now - self.config.session_idle_timeout_s
        idle = [sid for sid, s in self._sessions.items() if s.last_active < cutoff]
        for sid in idle:
            self._drop(sid, "reaped")
        return idle

    # -- steps ------------------------------------------------------------------------------
    def step(self, req: pb.StepRequest) -> pb.Verdict:
        """Judge, commit and sign one step. Raises on a step that cannot be judged."""
        s = self.owned_session(req.session_id, req.session_secret)
        s.last_active = time.monotonic()
        s.check_step(req.step)
        return pb.Verdict(**self._verdict(s, req.step, self._row(s, req))[0])

    def step_batch(self, reqs: Sequence[pb.StepRequest], sealed: bool = False) -> list[Judged | FseError]:
        """Many sessions' steps (a batched engine's decoding step): each row's verdict, or
        the error that refused that row alone, in the request's order. ``sealed``: the
        verdicts are left unsigned, each with its digest for one seal over the batch
        (:meth:`Signer.seal_rows`).

        The rows that one ring frame holds are read in one pass (one read of its
        descriptors, one seqlock check for all; a FULL row is read when its turn comes);
        each row is then judged, committed and signed in order, so two rows of one session
        are its two next steps."""
        out: list[Judged | FseError | None] = [None] * len(reqs)
        sessions: dict[int, Session] = {}
        frames: dict[tuple[tuple[int, int], int, int], list[int]] = {}
        for i, req in enumerate(reqs):
            try:
                s = sessions[i] = self.owned_session(req.session_id, req.session_secret)
                if req.WhichOneof("logits") == "ring":
                    ring = self._session_ring.get(s.session_id)
                    if ring is not None:
                        frames.setdefault((ring, req.ring.slot, req.ring.seq), []).append(i)
            except FseError as exc:
                out[i] = exc
        rows: dict[int, BatchRow] = {}
        for (ring, slot, seq), idx in frames.items():
            wanted = [(reqs[i].ring.row, sessions[i].tag, reqs[i].step) for i in idx]
            rows.update(zip(idx, self._rings[ring].reader.rows(slot, seq, wanted), strict=True))
        draws = self._first_draws(reqs, sessions, rows)
        for i, req in enumerate(reqs):
            if out[i] is not None:
                continue
            s = sessions[i]
            try:
                s.last_active = time.monotonic()
                s.check_step(req.step)
                got = rows[i] if i in rows else self._row(s, req)
                if isinstance(got, FseError):
                    raise got
                v, data = self._verdict(s, req.step, got, sign=not sealed, draw=draws.get(i))
                out[i] = Judged(v, hashlib.sha256(data).digest() if sealed else b"")
            except FseError as exc:
                out[i] = exc
        return cast(list[Judged | FseError], out)

    @staticmethod
    def _first_draws(reqs: Sequence[pb.StepRequest], sessions: dict[int, Session], rows: dict[int, BatchRow]) -> dict[int, Draw]:
        """The first proposal of every COMPACT row of the batch, drawn per frame in one
        vectorised pass (rows it does not cover are judged one by one)."""
        by_batch: dict[int, tuple[CompactBatch, list[int], list[int]]] = {}  # the batch, request rows, batch rows
        for i, got in rows.items():
            if isinstance(got, BatchedRow) and got.batch.vocab_size == sessions[i].vocab_size:
                _, idx, at = by_batch.setdefault(id(got.batch), (got.batch, [], []))
                idx.append(i)
                at.append(got.index)
        draws: dict[int, Draw] = {}
        for batch, idx, at in by_batch.values():
            found = first_draws(
                batch,
                at,
                [sessions[i].params for i in idx],
                [reqs[i].step for i in idx],
                [sessions[i].history for i in idx],
            )
            draws.update((i, d) for i, d in zip(idx, found, strict=True) if d is not None)
        return draws

    def _row(self, s: Session, req: pb.StepRequest) -> Row:
        """The step's logits: a copy from the ring, or the inline row (FULL or COMPACT)."""
        which = req.WhichOneof("logits")
        if which == "ring":
            ring = self._session_ring.get(s.session_id)
            if ring is None:
                raise RowError(f"session {s.session_id} was opened without a ring; send inline logits")
            ref = req.ring
            return self._rings[ring].reader.row(ref.slot, ref.row, ref.seq, s.tag, req.step)  # a whole copy, or refused
        if which == "compact":
            c = req.compact
            ids = np.asarray(c.top_ids, dtype=np.int64)
            return CompactRow.from_top(s.vocab_size, np.asarray(c.moments), np.asarray(c.top_logits, dtype=np.float32), ids)
        if which == "inline":
            dt = _INLINE_DTYPES.get(req.inline.dtype)
            if dt is None:
                raise RowError(f"inline logits dtype {req.inline.dtype} is not supported (F32, F16 or BF16)")
            data = req.inline.data
            if len(data) != s.vocab_size * dt.itemsize:
                raise RowError(
                    f"session {s.session_id}: inline logits hold {len(data)} bytes, "
                    f"expected {s.vocab_size} x {dt.itemsize} for the registered vocabulary"
                )
            row = np.frombuffer(data, dtype=dt)
            if req.inline.dtype == pb.DTYPE_BF16:  # the top half of a float32: widen with 16 zero bits
                return (row.astype(np.uint32) << 16).view(np.float32)
            return row.astype(np.float32) if dt.itemsize != 4 else row
        raise RowError("step request carries no logits (set ring, inline or compact)")

    def _verdict(
        self, s: Session, step: int, got: Row | Callable[[], Row], sign: bool = True, draw: Draw | None = None
    ) -> tuple[VerdictFields, bytes]:
        """The step's verdict (its fields) and its canonical bytes. ``got``: the row, or a
        function that reads it (a FULL row of a batch, read just before it is judged; a
        COMPACT row of a batch, built only if it is needed); ``draw``: its first proposal
        drawn with the batch's, taken when it stands."""
        outcome = s.accept_drawn(draw, step) if draw is not None else None
        row = None
        if outcome is None or self.recorder is not None:
            row = got() if callable(got) else got
        if outcome is None:
            assert row is not None
            outcome = s.judge(row, step)
        ts = time.time_ns()
        if self.recorder is not None:
            assert row is not None
            self.recorder.row(s.session_id, step, row)
        return self._commit_and_sign(s, step, self._audited(s, step, outcome, ts), ts, sign)

    def _audited(self, s: Session, step: int, o: StepOutcome, timestamp_ns: int) -> StepOutcome:
        """Write the step's frame before anything else sees the outcome; an outcome that
        cannot be written becomes an ABORT that names the audit (no unaudited token)."""
        log = self._audits.get(s.session_id)
        if log is None and self.recorder is None:
            return o
        chain_hash = s.next_chain_hash(step, o)
        record = ledger.frame_record(s.session_id, step, o, s.chain_hash, chain_hash, timestamp_ns, self.signer.key_id)
        try:
            if log is not None:
                log.append(record)
                if log.checkpoint_due(self.config.audit, timestamp_ns):
                    self._checkpoint(s, log, s.tally.add(int(o.decision), timestamp_ns), chain_hash)
        except AuditError as exc:
            trip = Trip(
                "audit", math.nan, 0.0, o.sampler or Sampler.NORMAL, f"the step's audit frame was not written: {exc}", Action.HALT
            )
            o = o.aborted(trip)
            record = ledger.frame_record(
                s.session_id, step, o, s.chain_hash, s.next_chain_hash(step, o), timestamp_ns, self.signer.key_id
            )
        if self.recorder is not None:
            self.recorder.frame(s.session_id, record)
        return o

    def _checkpoint(self, s: Session, log: SessionAudit, tally: Tally, chain_hash: bytes, ended: str = "") -> None:
        """Append a signed checkpoint of the file so far (its frames are written first)."""
        if log.broken:
            return
        key_id, now = self.signer.key_id, time.time_ns()
        signature = self.signer.sign_bytes(
            checkpoint_bytes(s.session_id, s.genesis_hash, chain_hash, tally, s.policy.digest, key_id)
        )
        statement = ledger.receipt_record(s.session_id, s.genesis_hash, chain_hash, tally, s.policy.digest, key_id, signature)
        record = ledger.checkpoint_record(statement, now, ended)
        with contextlib.suppress(AuditError):  # the file is then broken: the next frame's append says so
            log.append(record)
            log.checkpointed(now)

    def _commit_and_sign(
        self, s: Session, step: int, o: StepOutcome, timestamp_ns: int, sign: bool = True
    ) -> tuple[VerdictFields, bytes]:
        """Commit ``o`` and make its verdict: the message's fields and its canonical bytes
        (what its signature, or a batch seal's digest, covers), written from the values
        rather than read back out of a message."""
        prev, chain = s.commit(step, o, timestamp_ns)
        m = o.metrics
        metrics = [
            m.entropy,
            m.neg_logprob,
            m.margin,
            m.selected_prob,
            m.max_prob,
            m.logit_variance,
            m.l2_norm,
            m.varentropy,
            m.running_ppl,
        ]
        rank = max(m.rank, 0)
        band = health_band(m.running_ppl) if m.finite else pb.HEALTH_BAND_HALT
        g = s.gate_view()
        if g is None:
            gate_band = pending = 0
            stream = [0.0, 0.0, 0.0, 0.0, s.e_value]
        else:
            gate_band, pending = int(g.band), int(g.pending or 0)
            stream = [g.risk, g.signals.nlp, g.signals.ent, g.signals.ppl, s.e_value]
        decision, sampler, key_id = int(o.decision), int(o.sampler or 0), self.signer.key_id
        data = verdict_fields_bytes(
            s.session_id,
            step,
            decision,
            o.token,
            sampler,
            o.reasons,
            metrics,
            rank,
            band,
            prev,
            chain,
            key_id,
            s.policy.digest,
            gate_band,
            pending,
            stream,
            o.proposals,
        )
        # Nested messages as dicts: built in place with the message (a message given is copied in).
        metrics_pb: dict[str, float] = dict(zip(VERDICT_METRIC_FIELDS, metrics, strict=True))
        metrics_pb["rank"] = rank
        fields = dict(
            session_id=s.session_id,
            step=step,
            decision=cast(pb.Decision, decision),
            token_id=o.token,
            sampler=cast(pb.Sampler, sampler),
            reasons=[reason(r) for r in o.reasons],
            metrics=metrics_pb,
            band=cast(pb.HealthBand, band),
            prev_chain_hash=prev,
            chain_hash=chain,
            key_id=key_id,
            signature=self.signer.sign_bytes(data) if sign else b"",
            policy_digest=s.policy.digest,
            stream=dict(zip(VERDICT_STREAM_FIELDS, stream, strict=True), band=gate_band, pending=pending),
            proposals=[{"token_id": p.token_id, "sampler": int(p.sampler), "reasons": p.reasons} for p in o.proposals],
        )
        return fields, data
