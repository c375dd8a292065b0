"""GuardService without a transport: the logic the gRPC layer maps onto status codes."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.config import Policy, Rule, SidecarConfig
from sidecar.core.policy import compile_policies
from sidecar.errors import FseError, RowError, TooManySessions, UnknownVocabulary, VocabularyError
from sidecar.service import GuardService
from sidecar.signing import Signer, Verifier, verdict_bytes

V = 100


@pytest.fixture
def service(keys) -> GuardService:
    return GuardService(SidecarConfig(max_sessions=2, max_vocab_size=1000), Signer.from_file(keys.private))


def inline(s, step: int, x: np.ndarray, dtype: int = pb.DTYPE_F32) -> pb.StepRequest:
    logits = pb.InlineLogits(data=x.tobytes(), dtype=dtype)
    return pb.StepRequest(session_id=s.session_id, session_secret=s.secret, step=step, inline=logits)


def test_vocabulary_limits_are_enforced(service: GuardService) -> None:
    with pytest.raises(VocabularyError, match="exceeds max_vocab_size 1000"):
        service.register_vocabulary([b"x"] * 1001)
    with pytest.raises(UnknownVocabulary, match="RegisterVocabulary first"):
        service.vocabulary("0" * 64)
    a = service.register_vocabulary([b"a", b"b"])
    assert service.register_vocabulary([b"a", b"b"]) is a  # deduplicated by digest


def test_session_limit_is_resource_exhausted(service: GuardService) -> None:
    d = service.register_vocabulary([bytes([i]) for i in range(V)]).digest
    service.open_session(pb.OpenSessionRequest(vocab_digest=d))
    service.open_session(pb.OpenSessionRequest(vocab_digest=d))
    with pytest.raises(TooManySessions) as err:
        service.open_session(pb.OpenSessionRequest(vocab_digest=d))
    assert err.value.grpc_code == "RESOURCE_EXHAUSTED"


def test_float16_inline_rows_are_judged_and_prompt_ids_are_checked(service: GuardService, keys) -> None:
    d = service.register_vocabulary([bytes([i]) for i in range(V)]).digest
    with pytest.raises(RowError, match=r"prompt token ids \[100\]"):
        service.open_session(pb.OpenSessionRequest(vocab_digest=d, prompt_token_ids=[1, 100]))
    s = service.open_session(pb.OpenSessionRequest(vocab_digest=d, session_id="half"))
    x = np.zeros(V, np.float16)
    x[33] = 9.0
    v = service.step(inline(s, 0, x, pb.DTYPE_F16))
    assert v.token_id == 33 and Verifier.from_file(keys.public).verify(v)
    with pytest.raises(RowError, match="dtype 0 is not supported"):
        service.step(inline(s, 1, x, pb.DTYPE_UNSPECIFIED))
    with pytest.raises(RowError, match="carries no logits"):
        service.step(pb.StepRequest(session_id=s.session_id, session_secret=s.secret, step=1))


def test_bfloat16_inline_rows_give_the_same_verdict_as_the_float32_row_they_round(service: GuardService) -> None:
    d = service.register_vocabulary([bytes([i]) for i in range(V)]).digest
    x = np.linspace(-2.0, 1.0, V).astype(np.float32)
    x[17] = 7.5
    bf16 = (x.view(np.uint32) >> 16).astype("<u2")  # exactly representable: truncation is exact here
    widened = (bf16.astype(np.uint32) << 16).view(np.float32)
    assert widened[17] == 7.5
    a = service.open_session(pb.OpenSessionRequest(vocab_digest=d, session_id="bf16"))
    b = service.open_session(pb.OpenSessionRequest(vocab_digest=d, session_id="f32"))
    vb = service.step(inline(a, 0, bf16, pb.DTYPE_BF16))
    vf = service.step(inline(b, 0, widened, pb.DTYPE_F32))
    assert vb.token_id == vf.token_id == 17 and vb.metrics == vf.metrics
    with pytest.raises(RowError, match=f"expected {V} x 2"):
        service.step(inline(a, 1, bf16[:-1], pb.DTYPE_BF16))


def test_idle_sessions_are_reaped_and_release_their_slot(keys) -> None:
    svc = GuardService(SidecarConfig(max_sessions=1, session_idle_timeout_s=30), Signer.from_file(keys.private))
    d = svc.register_vocabulary([bytes([i]) for i in range(V)]).digest
    s = svc.open_session(pb.OpenSessionRequest(vocab_digest=d, session_id="sleepy"))
    assert svc.reap_idle(s.last_active + 29) == []
    assert svc.reap_idle(s.last_active + 31) == ["sleepy"]
    svc.open_session(pb.OpenSessionRequest(vocab_digest=d))  # the slot is free again


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_a_frame_torn_while_the_sidecar_copies_it_gives_no_verdict(service: GuardService, monkeypatch, dtype: str) -> None:
    """The engine starts the next frame in the slot just after the sidecar copied the row:
    the seqlock check after the copy refuses the step, and nothing is committed. A frame
    rewritten later, while the copy is being judged, changes nothing: the copy is judged."""
    from sidecar.core.session import Session
    from sidecar.errors import TornFrameError
    from sidecar.ring import RingReader, RingWriter

    d = service.register_vocabulary([bytes([i]) for i in range(V)]).digest
    with RingWriter.create(slots=1, vocab_size=V, dtype=dtype) as ring:
        s = service.open_session(pb.OpenSessionRequest(vocab_digest=d, ring_name=ring.name))
        x = np.zeros(V, np.float32)
        x[7] = 9.0
        with ring.frame(0) as f:
            row = f.write_row(s.tag, 0, x)
        req = pb.StepRequest(
            session_id=s.session_id, session_secret=s.secret, step=0, ring=pb.RingRef(slot=0, row=row, seq=f.seq)
        )
        read = RingReader._read_exact
        reads: list[int] = []

        def read_then_tear(self, buf, offset):
            read(self, buf, offset)
            reads.append(offset)
            if len(reads) == 2:  # the slot head, then the logits: the engine strikes now
                ring.begin_raw(0)

        with monkeypatch.context() as m:
            m.setattr(RingReader, "_read_exact", read_then_tear)
            with pytest.raises(TornFrameError, match="torn"):
                service.step(req)
        assert s.next_step == 0 and s.history == []  # nothing committed

        with ring.frame(0) as f:
            row = f.write_row(s.tag, 0, x)
        judge = Session.judge

        def judge_then_rewrite(self, *args, **kwargs):
            with ring.frame(0) as g:  # under the judge: the sidecar's copy does not change
                g.write_row(s.tag, 0, -x)
            return judge(self, *args, **kwargs)

        monkeypatch.setattr(Session, "judge", judge_then_rewrite)
        req.ring.seq = f.seq
        assert service.step(req).token_id == 7


def test_a_long_session_keeps_only_the_history_its_samplers_read(service: GuardService) -> None:
    d = service.register_vocabulary([bytes([i]) for i in range(V)]).digest
    prompt = list(range(V)) * 30  # 3 000 prompt ids
    req = pb.OpenSessionRequest(vocab_digest=d, prompt_token_ids=prompt, sampling=pb.SamplingParams(repetition_window=16))
    s = service.open_session(req)
    assert s.history == prompt[-16:]
    stream: list[int] = []
    tokens = np.random.default_rng(5).integers(0, V, 2000)  # no n-gram loop for the loop guard
    for step, t in enumerate(tokens):
        x = np.zeros(V, np.float32)
        x[t] = 9.0
        v = service.step(inline(s, step, x))
        assert v.decision != pb.DECISION_ABORT
        stream.append(v.token_id)
        assert len(s.history) <= 2 * 16 + 64
        assert s.history[-16:] == (prompt + stream)[-16:]  # what the repetition penalty reads


def test_the_loop_guard_reads_the_prompt_for_requested_repetition(service: GuardService) -> None:
    """The prompt's end (not only the repetition penalty's window of it) reaches the loop
    guard: a sentence the prompt holds may repeat prompt_repeats times; unasked, its
    fourth repetition is refused and healed."""
    pieces = [b"Say", b" '", b"I", b" love", b" pizza", b"'", b" four", b" times", b".", b"!", b"x"]
    d = service.register_vocabulary(pieces).digest
    asked = [*range(9)] + [10] * 200  # the request, then 200 ids the penalty window leaves out
    sentence = [2, 3, 4, 9]  # "I love pizza!"

    def run(prompt: list[int]) -> list[int]:
        req = pb.OpenSessionRequest(vocab_digest=d, prompt_token_ids=prompt, sampling=pb.SamplingParams(repetition_window=16))
        s = service.open_session(req)
        # kept for the recorder as a compact copy: not a view of the request's ids, no int objects
        assert s.prompt.dtype == np.uint32 and s.prompt.base is None and s.prompt.tolist() == prompt
        decisions = []
        for step, t in enumerate(sentence * 4):
            x = np.zeros(len(pieces), np.float32)
            x[t] = 9.0
            decisions.append(service.step(inline(s, step, x)).decision)
        service.close_session(s.session_id, s.secret)
        return decisions

    assert run(asked) == [pb.DECISION_ACCEPT] * 16
    assert run([10] * 9)[12] == pb.DECISION_HEALED  # the fourth "I": refused, the redo took another


def test_a_prompt_over_the_limit_is_refused_naming_it(keys) -> None:
    svc = GuardService(SidecarConfig(max_prompt_tokens=1000), Signer.from_file(keys.private))
    d = svc.register_vocabulary([bytes([i]) for i in range(V)]).digest
    with pytest.raises(RowError, match=r"a prompt of 5000 tokens exceeds max_prompt_tokens \(1000\)") as err:
        svc.open_session(pb.OpenSessionRequest(vocab_digest=d, prompt_token_ids=[1] * 5000))
    assert err.value.grpc_code == "INVALID_ARGUMENT"
    assert svc.open_session(pb.OpenSessionRequest(vocab_digest=d, prompt_token_ids=[1] * 1000)).history == [1] * 64


def test_vocabularies_are_bounded_and_the_least_recently_used_unused_one_is_dropped(keys) -> None:
    from sidecar.errors import TooManyVocabularies

    svc = GuardService(SidecarConfig(max_vocabularies=2, max_vocab_size=1000), Signer.from_file(keys.private))
    a = svc.register_vocabulary([b"a", b"b"])
    b = svc.register_vocabulary([b"c", b"d"])
    s = svc.open_session(pb.OpenSessionRequest(vocab_digest=a.digest))  # a is in use (and recently used)
    c = svc.register_vocabulary([b"e", b"f"])  # b is dropped: least recently used, unused
    with pytest.raises(UnknownVocabulary):
        svc.vocabulary(b.digest)
    assert svc.vocabulary(a.digest) is a and svc.vocabulary(c.digest) is c
    svc.open_session(pb.OpenSessionRequest(vocab_digest=c.digest))
    with pytest.raises(TooManyVocabularies, match=r"max_vocabularies \(2\)") as err:
        svc.register_vocabulary([b"g", b"h"])  # both in use: refused, nothing dropped
    assert err.value.grpc_code == "RESOURCE_EXHAUSTED"
    svc.close_session(s.session_id, s.secret)
    svc.register_vocabulary([b"g", b"h"])  # a is free again: it goes
    with pytest.raises(UnknownVocabulary):
        svc.vocabulary(a.digest)


def test_an_oversized_vocabulary_is_refused_from_the_request_field(service: GuardService) -> None:
    req = pb.RegisterVocabularyRequest(tokens=[b"x"] * 1001)
    with pytest.raises(VocabularyError, match="exceeds max_vocab_size 1000"):
        service.register_vocabulary(req.tokens)
    ok = service.register_vocabulary(pb.RegisterVocabularyRequest(tokens=[bytes([i]) for i in range(V)]).tokens)
    assert ok.size == V and ok.tokens[7] == b"\x07"


def test_sessions_per_client_are_counted_only_where_the_transport_names_the_client(keys) -> None:
    svc = GuardService(SidecarConfig(max_sessions=10, max_sessions_per_client=2), Signer.from_file(keys.private))
    d = svc.register_vocabulary([bytes([i]) for i in range(V)]).digest
    a = [svc.open_session(pb.OpenSessionRequest(vocab_digest=d), client="ipv4:127.0.0.1:1") for _ in range(2)]
    with pytest.raises(TooManySessions, match=r"max_sessions_per_client \(2\)"):
        svc.open_session(pb.OpenSessionRequest(vocab_digest=d), client="ipv4:127.0.0.1:1")
    svc.open_session(pb.OpenSessionRequest(vocab_digest=d), client="x509:engine-b")
    for _ in range(3):
        svc.open_session(pb.OpenSessionRequest(vocab_digest=d), client=None)  # a Unix socket: max_sessions only
    svc.close_session(a[0].session_id, a[0].secret)
    svc.open_session(pb.OpenSessionRequest(vocab_digest=d), client="ipv4:127.0.0.1:1")


def test_the_bytes_signed_and_sealed_are_the_canonical_bytes_of_the_verdicts_sent(keys) -> None:
    """The sidecar writes a verdict's signed bytes from its values as it builds the message
    (not read back out of it): they must be verdict_bytes of the message the engine gets,
    for an accepted step, a healed one (reasons with a rule's span), a step that aborts on
    NaN metrics, and a session without the gate; signed each or sealed in a batch."""
    policies = {
        "default": Policy(rules=[Rule(id="no-q", kind="literal", patterns=["q"], action="block")]),
        "bare": Policy(gate={"enabled": False}, drift={"enabled": False}),
    }
    signer = Signer.from_file(keys.private)
    svc = GuardService(SidecarConfig(max_sessions=8, max_vocab_size=1000), signer)
    svc.use_policies(compile_policies(policies))
    verifier = Verifier.from_file(keys.public)
    d = svc.register_vocabulary([b"q" if i == 7 else bytes([65 + i % 26]) for i in range(V)]).digest
    opened = [
        svc.open_session(pb.OpenSessionRequest(vocab_digest=d, session_id=f"s{i}", policy=p))
        for i, p in enumerate(["default", "default", "default", "bare"])
    ]
    x = np.linspace(-3.0, 0.0, V).astype(np.float32)
    x[7], x[9] = 8.0, 7.5  # greedy picks "q": the rule blocks it, the redo heals to 9
    nan = x.copy()
    nan[3] = np.nan
    rows = [x, np.roll(x, 20), nan, x]
    for step in range(2):
        live = [(s, r) for s, r in zip(opened, rows, strict=True) if not s.aborted]
        signed = [svc.step(inline(s, step, r)) for s, r in live[:2]]
        for v in signed:
            assert verifier.verify(v)
        batch = svc.step_batch([inline(s, s.next_step, r) for s, r in live[2:]], sealed=True)
        for j in batch:
            assert not isinstance(j, FseError)
            v = pb.Verdict(**j.fields)
            assert j.digest == hashlib.sha256(verdict_bytes(v)).digest()
            signed.append(v)
        outcomes = {(v.session_id, v.decision) for v in signed}
        if step == 0:
            assert {("s0", pb.DECISION_HEALED), ("s1", pb.DECISION_ACCEPT), ("s2", pb.DECISION_ABORT)} <= outcomes
            healed = next(v for v in signed if v.session_id == "s0")
            assert healed.token_id == 9 and healed.reasons[0].code == "no-q" and healed.reasons[0].span_end == 1
            assert math.isnan(next(v for v in signed if v.session_id == "s2").metrics.entropy_nats)
            bare = next(v for v in signed if v.session_id == "s3")
            assert bare.stream.band == 0 and bare.stream.e_value == 1.0  # no gate, no drift test
