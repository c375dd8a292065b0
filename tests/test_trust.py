"""Trust boundaries between the clients of one sidecar (issue 8), each attack reproduced
against a real sidecar process: it must fail safely while the victim keeps its session."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import grpc
import numpy as np
import pytest

from engine_adapters.client import GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.core.sampling import SamplingParams
from sidecar.errors import VerdictRejected
from sidecar.ring import RingWriter

V = 1000
VOCAB = [f"t{i}".encode() for i in range(V)]


def peaked(top: int) -> np.ndarray:
    x = np.random.default_rng(top).standard_normal(V).astype(np.float32)
    x[top] = 12.0
    return x


@pytest.fixture
def debug_sidecar(tmp_path, keys):
    """A sidecar that logs at DEBUG, so that what it logs of client input is all visible."""
    from sidecar.launch import start_local_sidecar

    sc = start_local_sidecar(tmp_path, {"log_level": "debug"}, (keys.private, keys.public))
    sc.wait_started()
    yield sc
    sc.stop()


def test_another_client_cannot_step_or_close_a_session_it_did_not_open(start_sidecar, keys) -> None:
    sc = start_sidecar()
    victim = GuardClient(sc.target, keys.public)
    victim.wait_ready()
    digest = victim.register_vocabulary(VOCAB)
    with RingWriter.create(slots=2, vocab_size=V) as ring:
        s = victim.open_session(digest, SamplingParams(), ring=ring)
        assert s.step(peaked(10)).token_id == 10

        # the attacker knows the id (ids used to be logged at INFO), not the secret
        attacker = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target))
        own = pb.InlineLogits(data=peaked(666).tobytes(), dtype=pb.DTYPE_F32)
        for secret in (b"", b"\0" * 32, s._secret[:-1] + bytes([s._secret[-1] ^ 1])):
            hijack = pb.StepRequest(session_id=s.session_id, session_secret=secret, step=1, inline=own)
            r = attacker.Step(hijack, timeout=5)
            assert not r.HasField("verdict")
            assert r.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "secret" in r.error.message
            with pytest.raises(grpc.RpcError) as err:
                attacker.CloseSession(pb.CloseSessionRequest(session_id=s.session_id, session_secret=secret), timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # the victim's session is intact: its next step is step 1, from its own logits
        v = s.step(peaked(20))
        assert (v.step, v.token_id) == (1, 20)
        assert s.close() is not None


def test_a_verdict_from_an_earlier_opening_of_the_same_id_does_not_link(start_sidecar, keys) -> None:
    sc = start_sidecar()
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    first = c.open_session(digest, SamplingParams(), session_id="reused")
    recorded = first.step(peaked(10))
    first.close()
    second = c.open_session(digest, SamplingParams(), session_id="reused")
    assert second.chain_hash != first.chain_hash or second.next_step == 0
    assert recorded.prev_chain_hash != second.chain_hash  # a fresh nonce in the genesis
    with pytest.raises(VerdictRejected, match="does not link"):
        second._verify(0, pb.StepResponse(verdict=recorded))  # replayed into the new opening
    assert second.step(peaked(10)).token_id == 10  # the real one does


def test_a_newline_in_a_session_id_forges_no_log_line_and_ids_are_not_logged_at_info(debug_sidecar, keys) -> None:
    sc = debug_sidecar
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target))
    forged = "x\n2026-01-01 00:00:00,000 fse.server ERROR FORGED"
    r = stub.Step(pb.StepRequest(session_id=forged, step=0), timeout=5)
    assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and r.error.session_id == ""
    assert "FORGED" not in r.error.message
    digest = c.register_vocabulary(VOCAB)
    s = c.open_session(digest, SamplingParams())
    s.step(peaked(3))
    s.close()
    time.sleep(0.3)
    lines = sc.log_text().splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in lines)  # no forged line
    assert any("\\n2026-01-01" in line for line in lines)  # it is there, escaped, on one line
    assert not any(s.session_id in line and " INFO " in line for line in lines)
    assert any(s.session_id in line and " DEBUG " in line for line in lines)


def test_a_huge_session_id_is_refused_cheaply_without_echo(start_sidecar, keys) -> None:
    sc = start_sidecar()
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target, options=[("grpc.max_send_message_length", 16 << 20)]))
    huge = "a" * (4 << 20)
    before = len(sc.log_text())
    r = stub.Step(pb.StepRequest(session_id=huge, step=0), timeout=10)
    assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert r.ByteSize() < 1000  # the answer does not carry the id back
    for call, req, code in (
        (stub.OpenSession, pb.OpenSessionRequest(vocab_digest=digest, session_id=huge), grpc.StatusCode.INVALID_ARGUMENT),
        # over CloseSession's own 64 KiB limit: refused unparsed, the limit named (not an echo on metadata)
        (stub.CloseSession, pb.CloseSessionRequest(session_id=huge), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(req, timeout=10)
        assert err.value.code() == code
        assert len(err.value.details()) < 200 and "aaaa" not in err.value.details()
    assert len(sc.log_text()) - before < 10_000
    s = c.open_session(digest, SamplingParams())  # the sidecar serves on
    assert s.step(peaked(7)).token_id == 7


def test_the_sidecar_logger_escapes_what_it_shows() -> None:
    from sidecar.errors import shown as _shown

    assert _shown("a\nb") == "'a\\nb'"
    assert _shown("x" * 1000).endswith("... (1000 chars)") and len(_shown("x" * 1000)) < 100
    logging.getLogger("fse.server").debug("%s", _shown("a\nb"))  # one line whatever the input


def _foreign_segment(name: str, data: bytes) -> None:
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_foreign_or_empty_segment_is_refused_and_survives_the_sidecar(start_sidecar, keys, how: str) -> None:
    import uuid

    sc = start_sidecar()
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target))
    foreign, empty = f"other-app-{uuid.uuid4().hex[:8]}", f"empty-{uuid.uuid4().hex[:8]}"
    _foreign_segment(foreign, b"SECRETHEADER" + b"\x07" * 500)
    _foreign_segment(empty, b"")
    try:
        for name, expect in ((foreign, "not an fse ring"), (empty, "holds 0 bytes")):
            with pytest.raises(grpc.RpcError) as err:
                stub.OpenSession(pb.OpenSessionRequest(vocab_digest=digest, ring_name=name), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not UNKNOWN
            assert expect in err.value.details() and "SECRETHEADER" not in err.value.details()
        assert c.open_session(digest, SamplingParams()).step(peaked(4)).token_id == 4  # serving on
        if how == "SIGKILL":
            sc.kill()
        else:
            sc.stop()
        time.sleep(0.5)  # the resource tracker (were one involved) unlinks at exit
        assert os.path.exists(f"/dev/shm/{foreign}") and os.path.exists(f"/dev/shm/{empty}")
    finally:
        for name in (foreign, empty):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")


def test_the_socket_is_owner_only_whatever_the_umask(tmp_path, keys) -> None:
    from sidecar.launch import start_local_sidecar

    old = os.umask(0)  # the sidecar inherits it: before, its socket came out 0777
    try:
        sc = start_local_sidecar(tmp_path, None, (keys.private, keys.public))
    finally:
        os.umask(old)
    try:
        sc.wait_started()
        assert oct(os.stat(sc.socket).st_mode & 0o777) == oct(0o600)
        lane = sc.socket.with_name(sc.socket.name + ".lane")  # the fast lane's socket follows the same rules
        assert oct(os.stat(lane).st_mode & 0o777) == oct(0o600)
    finally:
        sc.stop()


def test_serve_does_not_delete_a_regular_file_at_the_socket_path(tmp_path, keys) -> None:
    import subprocess
    import sys

    import yaml

    victim = tmp_path / "important.txt"
    victim.write_text("not a socket")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({"listen": f"unix://{victim}", "signing_key_file": str(keys.private)}))
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "is not a socket" in r.stderr
    assert victim.read_text() == "not a socket"


def test_a_session_that_dies_on_a_fault_gives_its_slot_back(start_sidecar, keys) -> None:
    sc = start_sidecar(policies={"default": {"guards": {"entropy": {"enabled": True, "threshold": 0.01}}}})
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target))
    s = c.open_session(digest, SamplingParams(), session_id="doomed")
    with pytest.raises(Exception, match="entropy"):
        s.step(peaked(5))  # ABORT: nobody calls close()
    # the slot is free again: the same id opens (it would be ALREADY_EXISTS while held)
    stub.OpenSession(pb.OpenSessionRequest(vocab_digest=digest, session_id="doomed"), timeout=5)


@pytest.mark.parametrize("size", [0, 4096])
def test_an_engine_that_truncates_its_ring_cannot_kill_the_sidecar(start_sidecar, keys, size: int) -> None:
    """Item 1: reading a mapping of a truncated file is SIGBUS; the sidecar must refuse the
    step of the engine that did it and keep serving everyone else within their deadlines."""
    sc = start_sidecar()
    victim = GuardClient(sc.target, keys.public)
    victim.wait_ready()
    digest = victim.register_vocabulary(VOCAB)
    attacker = GuardClient(sc.target, keys.public)
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target))
    with RingWriter.create(slots=2, vocab_size=V) as vring, RingWriter.create(slots=2, vocab_size=V) as aring:
        v = victim.open_session(digest, SamplingParams(), ring=vring)
        a = attacker.open_session(digest, SamplingParams(), ring=aring)
        assert v.step(peaked(10)).token_id == 10
        with aring.frame(1) as f:  # a whole frame, published; then the ring shrinks under it
            row = f.write_row(a.tag, 0, peaked(3))
        os.truncate(f"/dev/shm/{aring.name.lstrip('/')}", size)
        req = pb.StepRequest(
            session_id=a.session_id, session_secret=a._secret, step=0, ring=pb.RingRef(slot=1, row=row, seq=f.seq)
        )
        r = stub.Step(req, timeout=5)
        assert r.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "truncated" in r.error.message
        assert sc.proc.poll() is None  # alive
        for i in range(1, 4):
            assert v.step(peaked(20 + i)).token_id == 20 + i
        assert v.close() is not None


def test_a_re_created_ring_name_feeds_the_new_session_from_the_new_segment(start_sidecar, keys) -> None:
    """Item 5: the engine unlinks its ring while a session on it is open and creates the
    name anew; a process still holding the old mapping must not feed the new session."""
    from multiprocessing import shared_memory

    sc = start_sidecar()
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    name = f"fse-test-reused-{os.getpid()}"
    with RingWriter.create(name, slots=1, vocab_size=V) as old:
        first = c.open_session(digest, SamplingParams(), ring=old)
        assert first.step(peaked(1)).token_id == 1
        shared_memory.SharedMemory(name=name).unlink()  # the name goes; the old mapping stays
        try:
            with RingWriter.create(name, slots=1, vocab_size=V) as new:
                second = c.open_session(digest, SamplingParams(), ring=new)
                # Both segments publish a frame for the new session's step 0 in slot 0 at the
                # same seq: the old one says token 5, the new one token 9.
                with old.frame(0) as f_old:
                    f_old.write_row(second.tag, 0, peaked(5))
                with new.frame(0) as f_new:
                    f_new.write_row(second.tag, 0, peaked(9))
                stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target))
                for seq in (f_old.seq, f_new.seq):
                    req = pb.StepRequest(
                        session_id=second.session_id,
                        session_secret=second._secret,
                        step=0,
                        ring=pb.RingRef(slot=0, row=0, seq=seq),
                    )
                    r = stub.Step(req, timeout=5)
                    if seq == f_new.seq:
                        assert r.verdict.token_id == 9
                    else:
                        assert r.error.code == grpc.StatusCode.ABORTED.value[0]  # not the new segment's frame
                assert first.step(peaked(2)).token_id == 2  # the first session still reads the old one
        finally:
            old._shm = None  # its name is already gone


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raw(channel: grpc.Channel, method: str):
    """A call that sends bytes as they are: requests no well-behaved client would build."""
    return channel.unary_unary(f"/fse.v1.GuardService/{method}", request_serializer=None, response_deserializer=None)


def _packed(field: int, n: int) -> bytes:
    """A packed repeated-uint32 field of ``n`` ones, built without a list of n ints."""
    body = b"\x01" * n
    size, length = len(body), b""
    while True:
        byte = size & 0x7F
        size >>= 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            return bytes([field << 3 | 2]) + length + body


def test_oversized_requests_are_refused_before_parsing_while_other_sessions_keep_their_deadlines(start_sidecar, keys) -> None:
    """Item 2: a 20 M-id prompt and a 10 M-token vocabulary used to stall the event loop
    for seconds and keep hundreds of MB; each RPC now has its own limit, checked before
    parsing, and the victim's steps (deadline 1 s) go on throughout."""
    import threading

    # limits: RegisterVocabulary 256 KiB, OpenSession 564 KB (gRPC's cap: the largest), Step 68 KB,
    # StepBatch and Steps 68 KB + 16 x 4 KiB
    sc = start_sidecar(max_vocab_bytes=256 << 10, max_prompt_tokens=100_000, max_vocab_size=V, max_batch_rows=16)
    victim = GuardClient(sc.target, keys.public, step_timeout=1.0)
    victim.wait_ready()
    digest = victim.register_vocabulary(VOCAB)
    session = victim.open_session(digest, SamplingParams())
    done, failures, steps = threading.Event(), [], [0]

    def keep_stepping() -> None:
        while not done.is_set():
            try:
                want = steps[0] % 900
                assert session.step(peaked(want)).token_id == want
                steps[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return

    t = threading.Thread(target=keep_stepping)
    t.start()
    rss_before = _rss_kib(sc.proc.pid)
    ch = grpc.insecure_channel(sc.target)
    attacks = {
        # method: (request bytes, what the refusal names)
        "RegisterVocabulary": (b"\x0a\x01a" * 10_000_000, "Received message larger than max"),  # 30 MB: gRPC's own cap
        "OpenSession": (b"\x12\x02ab" + _packed(5, 20_000_000), "Received message larger than max"),
    }
    try:
        for method, (data, names) in attacks.items():
            with pytest.raises(grpc.RpcError) as err:
                _raw(ch, method)(data, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and names in err.value.details()
        # under gRPC's cap, over the RPC's own limit: refused unparsed, naming the limit
        over = {
            "RegisterVocabulary": (b"\x0a\x01a" * 130_000, "max_vocab_bytes"),
            "OpenSession": (b"\x12\x02ab" + _packed(5, 700_000), "larger than max"),  # the largest limit is gRPC's cap
            "CloseSession": (b"\x0a\x01a" * 30_000, "64 KiB"),
        }
        for method, (data, names) in over.items():
            with pytest.raises(grpc.RpcError) as err:
                _raw(ch, method)(data, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and names in err.value.details(), err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _raw(ch, "OpenSession")(b"\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in err.value.details()
        step = pb.StepResponse.FromString(_raw(ch, "Step")(b"\x0a\x01a" * 100_000, timeout=5))  # 300 KB, limit 68 KB
        assert step.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "max_vocab_size" in step.error.message
        time.sleep(0.5)
    finally:
        done.set()
        t.join(10)
    assert failures == [] and steps[0] > 0
    assert _rss_kib(sc.proc.pid) - rss_before < 64 * 1024  # it used to keep +580 MB per refused vocabulary


def test_sessions_are_bounded_per_client_connection(start_sidecar, keys) -> None:
    """Item 2: one client cannot take every session slot (TCP: per connection)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sc = start_sidecar(max_sessions_per_client=3)
    sc.config.write_text(sc.config.read_text().replace(f"unix://{sc.socket}", f"tcp://127.0.0.1:{port}"))
    sc.stop()
    import subprocess
    import sys

    from sidecar.launch import LocalSidecar

    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(sc.config)], stderr=subprocess.DEVNULL)
    tcp = LocalSidecar(proc, f"127.0.0.1:{port}", sc.public_key, sc.log, sc.config)
    try:
        own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per client
        first, second = (pb_grpc.GuardServiceStub(grpc.insecure_channel(tcp.target, options=own)) for _ in range(2))
        GuardClient(tcp.target, keys.public).wait_ready()
        digest = first.RegisterVocabulary(pb.RegisterVocabularyRequest(tokens=VOCAB), timeout=5).vocab_digest
        opened = [first.OpenSession(pb.OpenSessionRequest(vocab_digest=digest), timeout=5) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as err:
            first.OpenSession(pb.OpenSessionRequest(vocab_digest=digest), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions_per_client (3)" in err.value.details()
        second.OpenSession(pb.OpenSessionRequest(vocab_digest=digest), timeout=5)  # another client is not refused
        r = opened[0]
        first.CloseSession(pb.CloseSessionRequest(session_id=r.session_id, session_secret=r.session_secret), timeout=5)
        first.OpenSession(pb.OpenSessionRequest(vocab_digest=digest), timeout=5)  # a closed one frees its place
    finally:
        tcp.stop()


def test_the_fast_lane_socket_gets_the_configured_group_and_mode_like_the_grpc_one(start_sidecar) -> None:
    import grp

    group = next((g for g in ("nogroup", "daemon") if g in {e.gr_name for e in grp.getgrall()}), None)
    if group is None or os.geteuid() != 0:
        pytest.skip("needs root and a spare group to hand the sockets to")
    sc = start_sidecar(unix_socket_group=group, unix_socket_mode=0o660)
    gid = grp.getgrnam(group).gr_gid
    for path in (sc.socket, sc.socket.with_name(sc.socket.name + ".lane")):
        st = os.stat(path)
        assert (st.st_gid, oct(st.st_mode & 0o777)) == (gid, oct(0o660)), path
