"""The sidecar as deployed (its own process, Unix socket) driven by the engine client."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_adapters.client import GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort, GuardUnavailable, StepRefused, VerdictRejected
from sidecar.ring import RingWriter
from sidecar.signing import Signer

from .tampering import start_tampering_server

V = 1000
VOCAB = [f"t{i}".encode() for i in range(V)]


def peaked(top: int = 10) -> np.ndarray:
    x = np.random.default_rng(top).standard_normal(V).astype(np.float32)
    x[top] = 12.0
    return x


@pytest.fixture
def sidecar(start_sidecar):
    return start_sidecar()


@pytest.fixture
def client(sidecar, keys):
    c = GuardClient(sidecar.target, keys.public, step_timeout=2.0)
    c.wait_ready()
    yield c
    c.close()


def test_health_service_reports_serving(sidecar, client) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sidecar.target))
    for name in ("", "fse.v1.GuardService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_ring_steps_get_signed_verdicts_that_chain(client) -> None:
    digest = client.register_vocabulary(VOCAB)
    with RingWriter.create(slots=2, vocab_size=V) as ring:
        s = client.open_session(digest, SamplingParams(), ring=ring)
        verdicts = [s.step(peaked(top)) for top in (10, 20, 30)]
        assert [v.token_id for v in verdicts] == [10, 20, 30]
        assert [v.decision for v in verdicts] == [pb.DECISION_ACCEPT] * 3
        assert verdicts[1].prev_chain_hash == verdicts[0].chain_hash
        closed = s.close()
        assert closed.steps == 3 and closed.chain_hash == verdicts[-1].chain_hash


def test_inline_logits_give_the_same_verdict_as_the_ring(client) -> None:
    digest = client.register_vocabulary(VOCAB)
    params = SamplingParams(temperature=1.0, top_k=50, seed=9)
    with RingWriter.create(slots=1, vocab_size=V) as ring:
        a = client.open_session(digest, params, ring=ring, session_id="same-a")
        ra = [a.step(peaked(t)).token_id for t in range(5)]
    b = client.open_session(digest, params, session_id="same-b")
    rb = [b.step(peaked(t)).token_id for t in range(5)]
    assert ra == rb


def test_nan_logits_abort_with_the_reason(client) -> None:
    digest = client.register_vocabulary(VOCAB)
    with RingWriter.create(slots=1, vocab_size=V) as ring:
        s = client.open_session(digest, SamplingParams(), ring=ring)
        x = peaked()
        x[3] = np.nan
        with pytest.raises(GuardAbort) as err:
            s.step(x)
        assert [r.code for r in err.value.reasons] == ["non_finite"]
        with pytest.raises(GuardUnavailable, match="earlier failure"):
            s.step(peaked())  # the session stays closed


def test_row_size_mismatch_is_refused_with_a_clear_error(client) -> None:
    digest = client.register_vocabulary(VOCAB)
    s = client.open_session(digest, SamplingParams())
    with pytest.raises(StepRefused, match="INVALID_ARGUMENT.*3996 bytes, expected 1000 x 4") as err:
        s.step(np.zeros(V - 1, np.float32))
    assert err.value.code == "INVALID_ARGUMENT"
    with RingWriter.create(slots=1, vocab_size=V + 1) as ring:
        with pytest.raises(StepRefused, match="holds rows of 1001 logits, the vocabulary has 1000"):
            client.open_session(digest, SamplingParams(), ring=ring)


def test_status_codes_say_what_went_wrong(sidecar, client) -> None:
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sidecar.target))
    digest = client.register_vocabulary(VOCAB)

    def code(fn, req) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            fn(req, timeout=5)
        return err.value.code()

    assert code(stub.RegisterVocabulary, pb.RegisterVocabularyRequest(tokens=[b"x"])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(stub.OpenSession, pb.OpenSessionRequest(vocab_digest="nope")) == grpc.StatusCode.NOT_FOUND
    assert code(stub.OpenSession, pb.OpenSessionRequest(vocab_digest=digest, policy="nope")) == grpc.StatusCode.NOT_FOUND
    bad_params = pb.OpenSessionRequest(vocab_digest=digest, sampling=pb.SamplingParams(top_p=0.0))
    assert code(stub.OpenSession, bad_params) == grpc.StatusCode.INVALID_ARGUMENT
    stub.OpenSession(pb.OpenSessionRequest(vocab_digest=digest, session_id="dup"), timeout=5)
    assert code(stub.OpenSession, pb.OpenSessionRequest(vocab_digest=digest, session_id="dup")) == grpc.StatusCode.ALREADY_EXISTS
    assert (
        code(stub.OpenSession, pb.OpenSessionRequest(vocab_digest=digest, ring_name="fse-missing"))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code(stub.CloseSession, pb.CloseSessionRequest(session_id="never")) == grpc.StatusCode.NOT_FOUND
    # a step for an unknown session is refused in-band; the stream stays up for the others
    responses = [
        r.response for r in stub.Steps(iter([pb.StepsRequest(request=pb.StepRequest(session_id="never", step=0))]), timeout=5)
    ]
    assert responses[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_unary_step_gives_the_same_signed_verdict_as_the_stream(sidecar, client) -> None:
    digest = client.register_vocabulary(VOCAB)
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sidecar.target))
    data = peaked(42).tobytes()
    secrets = {
        sid: stub.OpenSession(pb.OpenSessionRequest(vocab_digest=digest, session_id=sid), timeout=5).session_secret
        for sid in ("unary", "stream")
    }
    logits = pb.InlineLogits(data=data, dtype=pb.DTYPE_F32)
    req = pb.StepRequest(session_id="unary", session_secret=secrets["unary"], step=0, inline=logits)
    unary = stub.Step(req, timeout=5).verdict
    req.session_id, req.session_secret = "stream", secrets["stream"]
    stream = next(iter(stub.Steps(iter([pb.StepsRequest(request=req)]), timeout=5))).response.verdict
    assert unary.token_id == stream.token_id == 42
    assert client.trusted.verify(unary) and client.trusted.verify(stream)
    refused = stub.Step(pb.StepRequest(session_id="unary", session_secret=secrets["unary"], step=5), timeout=5)
    assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_out_of_order_step_is_refused(sidecar, client) -> None:
    digest = client.register_vocabulary(VOCAB)
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sidecar.target))
    secret = stub.OpenSession(pb.OpenSessionRequest(vocab_digest=digest, session_id="order"), timeout=5).session_secret
    logits = pb.InlineLogits(data=peaked().tobytes(), dtype=pb.DTYPE_F32)
    reqs = [pb.StepRequest(session_id="order", session_secret=secret, step=s, inline=logits) for s in (0, 0, 2)]
    out = [r.response for r in stub.Steps(iter(pb.StepsRequest(request=r) for r in reqs), timeout=5)]
    assert out[0].HasField("verdict")
    assert out[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "expected 1" in out[1].error.message
    assert out[2].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_sidecar_killed_mid_session_makes_the_next_step_fail_closed(sidecar, client) -> None:
    digest = client.register_vocabulary(VOCAB)
    with RingWriter.create(slots=1, vocab_size=V) as ring:
        s = client.open_session(digest, SamplingParams(), ring=ring)
        s.step(peaked())
        sidecar.kill()
        t0 = time.monotonic()
        with pytest.raises(GuardUnavailable, match="unavailable"):
            s.step(peaked())
        assert time.monotonic() - t0 < client.step_timeout + 1.0


def test_stopped_sidecar_answers_within_the_step_deadline(sidecar, keys) -> None:
    c = GuardClient(sidecar.target, keys.public, step_timeout=0.3)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    with RingWriter.create(slots=1, vocab_size=V) as ring:
        s = c.open_session(digest, SamplingParams(), ring=ring)
        s.step(peaked())
        sidecar.proc.send_signal(19)  # SIGSTOP: alive but silent, the worst case
        try:
            t0 = time.monotonic()
            with pytest.raises(GuardUnavailable, match="no answer within 300 ms"):
                s.step(peaked())
            assert time.monotonic() - t0 < 1.5
        finally:
            sidecar.proc.send_signal(18)  # SIGCONT


@pytest.mark.parametrize(
    "mode, message",
    [
        ("other_key", "which this adapter does not trust"),
        ("bad_signature", "signature does not verify"),
        ("bad_decision", "decision 7, not ACCEPT/HEALED/ABORT"),
        ("wrong_session", "for session 'someone-else'"),
        ("stale_step", "stale or reordered"),
        ("other_policy", "names policy '000000000000', the session runs under another"),
        ("other_token", "chain hash does not match"),
        ("out_of_vocab", "outside the vocabulary"),
    ],
)
def test_forged_or_misbound_verdicts_are_rejected(tmp_path, keys, other_keys, mode: str, message: str) -> None:
    trusted = Signer.from_file(keys.private)
    server, target = start_tampering_server(tmp_path, trusted, Signer.from_file(other_keys.private), mode, from_step=1)
    try:
        c = GuardClient(target, keys.public)
        digest = c.register_vocabulary(VOCAB)
        with RingWriter.create(slots=1, vocab_size=V) as ring:
            s = c.open_session(digest, SamplingParams(), ring=ring)
            s.step(peaked())  # step 0 is honest
            with pytest.raises(VerdictRejected, match=message):
                s.step(peaked(20))
            with pytest.raises(GuardUnavailable):
                s.step(peaked(30))  # and nothing after it
        c.close()
    finally:
        server.stop(0)


@pytest.mark.parametrize("mode", ["other_genesis", "short_nonce"])
def test_an_opening_whose_genesis_or_nonce_does_not_bind_it_is_refused(tmp_path, keys, mode: str) -> None:
    # mutation audit: the client not checking the genesis hash, or the opening nonce's length
    server, target = start_tampering_server(tmp_path, Signer.from_file(keys.private), None, mode)
    try:
        c = GuardClient(target, keys.public)
        digest = c.register_vocabulary(VOCAB)
        with pytest.raises(VerdictRejected, match="the genesis does not bind this opening"):
            c.open_session(digest, SamplingParams())
        c.close()
    finally:
        server.stop(0)


def test_adapter_refuses_a_sidecar_signing_with_an_untrusted_key(start_sidecar, keys, other_keys) -> None:
    sc = start_sidecar(signing=other_keys)
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    with pytest.raises(VerdictRejected, match="sidecar signs with key"):
        c.open_session(digest, SamplingParams())
    c.close()


def test_sidecar_refuses_to_start_without_a_key_and_says_how_to_make_one(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"listen: unix://{tmp_path / 's.sock'}\n")
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "no signing key configured" in r.stderr and "fse-sidecar keygen" in r.stderr


def test_bad_config_stops_start_up_naming_the_field(tmp_path, keys) -> None:
    cfg = tmp_path / "c.yaml"
    bad = {
        "signing_key_file": str(keys.private),
        "policies": {"default": {"guards": {"entropy": {"enabled": True, "threshold": "lots"}}}},
    }
    cfg.write_text(yaml.safe_dump(bad))
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "policies.default.guards.entropy.threshold" in r.stderr


def test_hmac_signed_sidecar_and_adapter_agree(tmp_path, start_sidecar) -> None:
    from sidecar.signing import generate_hmac_key

    from .conftest import Keys

    secret = generate_hmac_key(tmp_path / "hmac")
    sc = start_sidecar(signing=Keys(secret, secret))
    c = GuardClient(sc.target, secret)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    with RingWriter.create(slots=1, vocab_size=V) as ring:
        s = c.open_session(digest, SamplingParams(), ring=ring)
        assert [s.step(peaked(t)).token_id for t in (10, 20)] == [10, 20]
    c.close()


def test_sidecar_serves_over_tcp_when_configured(tmp_path, keys) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"signing_key_file": str(keys.private)}))
    cmd = [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg), "--listen", f"tcp://127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        c = GuardClient(f"127.0.0.1:{port}", keys.public)
        c.wait_ready(timeout=30)
        digest = c.register_vocabulary(VOCAB)
        assert c.open_session(digest, SamplingParams()).step(peaked(7)).token_id == 7
        c.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM is a clean shutdown


def test_second_sidecar_on_a_live_socket_refuses_and_a_stale_socket_is_reclaimed(sidecar, tmp_path, keys) -> None:
    import socket

    cfg = tmp_path / "again.yaml"
    cfg.write_text(yaml.safe_dump({"signing_key_file": str(keys.private), "listen": f"unix://{sidecar.socket}"}))
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "already listening" in r.stderr
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a crashed process leaves behind
    cfg.write_text(yaml.safe_dump({"signing_key_file": str(keys.private), "listen": f"unix://{stale}"}))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)])
    try:
        c = GuardClient(f"unix:{stale}", keys.public)
        c.wait_ready(timeout=30)
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_sidecar_closes_a_session_its_engine_abandoned(tmp_path, keys) -> None:
    from sidecar.launch import start_local_sidecar

    sc = start_local_sidecar(tmp_path, {"session_idle_timeout_s": 0.4}, (keys.private, keys.public))
    try:
        sc.wait_started()
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
        s.step(peaked())
        time.sleep(1.5)  # the engine went quiet without CloseSession
        with pytest.raises(StepRefused, match="NOT_FOUND.*is not open"):
            s.step(peaked())
        assert "without a step" in sc.log_text()
        c.close()
    finally:
        sc.stop()
