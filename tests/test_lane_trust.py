"""The fast lane against hostile or careless peers (issue 28, items 1-3): the doorbells an
engine hands over are checked at the hello, and a doorbell only ever answers its own
session's frames, so no client can freeze the sidecar's loop or fail another session."""

from __future__ import annotations

import os
import socket
import time
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_adapters.client import GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.core.sampling import SamplingParams
from sidecar.errors import StepRefused
from sidecar.ring import REQUEST_PING, RingWriter
from sidecar.wire import params_to_pb

V = 1000
VOCAB = [f"t{i}".encode() for i in range(V)]


def row(top: int) -> np.ndarray:
    x = np.zeros(V, dtype=np.float32)
    x[top] = 12.0
    return x


@pytest.fixture
def lane(start_sidecar, keys):
    sc = start_sidecar()
    c = GuardClient(sc.target, keys.public, step_timeout=2.0)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    ring = RingWriter.create(slots=2, vocab_size=V, verdict_capacity=4096)
    channel = grpc.insecure_channel(sc.target)
    yield sc, c, digest, ring, channel
    channel.close()
    c.close()
    ring.close()


def _raw_lane_open(channel: grpc.Channel, digest: str, ring: RingWriter) -> pb.OpenSessionResponse:
    sampling = params_to_pb(SamplingParams())
    req = pb.OpenSessionRequest(
        session_id=uuid.uuid4().hex, vocab_digest=digest, sampling=sampling, ring_name=ring.name, fast_lane=True
    )
    return pb_grpc.GuardServiceStub(channel).OpenSession(req, timeout=5)


def _hello(r: pb.OpenSessionResponse, request_fd: int, answer_fd: int) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(r.lane_socket)
    socket.send_fds(s, [r.lane_token], [request_fd, answer_fd])
    return s, s.recv(256)


def _serving(channel: grpc.Channel) -> bool:
    try:
        got = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="fse.v1.GuardService"), timeout=2)
    except grpc.RpcError:
        return False
    return bool(got.status == health_pb2.HealthCheckResponse.SERVING)


def test_a_blocking_answer_eventfd_with_a_full_counter_is_refused_and_never_freezes_the_sidecar(lane) -> None:
    sc, c, digest, ring, channel = lane
    r = _raw_lane_open(channel, digest, ring)
    request = os.eventfd(0, os.EFD_NONBLOCK)
    answer = os.eventfd(0)  # blocking
    os.eventfd_write(answer, 0xFFFFFFFFFFFFFFFE)  # the largest count: any further write blocks
    conn, reply = _hello(r, request, answer)
    try:
        if reply == b"OK":  # (what was accepted before) ring a PING: the sidecar's write would block its loop
            ring.submit(0, 2, 1, time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 10**9, REQUEST_PING)
            os.eventfd_write(request, 1)
            time.sleep(0.3)
        assert reply.startswith(b"NO") and b"answer eventfd must be non-blocking" in reply
        assert _serving(channel)
        s = c.open_session(digest, SamplingParams(), ring=ring, lane="shm")  # another session goes on
        assert s.step(row(7)).token_id == 7
        s.close()
    finally:
        conn.close()
        os.close(request)
        os.close(answer)


def test_a_pipe_as_the_request_fd_is_refused_at_the_hello(lane) -> None:
    sc, c, digest, ring, channel = lane
    r = _raw_lane_open(channel, digest, ring)
    rd, wr = os.pipe()
    os.close(wr)  # at EOF: readable for ever, it would spin the loop
    answer = os.eventfd(0, os.EFD_NONBLOCK)
    conn, reply = _hello(r, rd, answer)
    conn.close()
    os.close(rd)
    os.close(answer)
    assert reply.startswith(b"NO") and b"request fd is not an eventfd" in reply
    assert _serving(channel)


def test_two_fast_lane_sessions_on_one_ring_each_get_their_own_verdicts(lane) -> None:
    sc, c, digest, ring, channel = lane
    a = c.open_session(digest, SamplingParams(), ring=ring, lane="shm")
    b = c.open_session(digest, SamplingParams(), ring=ring, lane="shm")
    for step in range(6):  # both frames in flight at once: each doorbell sees the other's slot
        pa = a.submit(row(10 + step))
        pb_ = b.submit(row(20 + step))
        assert b.collect(pb_).token_id == 20 + step
        assert a.collect(pa).token_id == 10 + step
    a.close()
    b.close()


def test_a_client_ringing_its_own_lane_on_a_victims_ring_cannot_fail_the_victim(lane, keys) -> None:
    sc, c, digest, ring, channel = lane
    victim = c.open_session(digest, SamplingParams(), ring=ring, lane="shm")
    other = GuardClient(sc.target, keys.public)  # another client names the victim's ring (listed in /dev/shm)
    attacker = other.open_session(digest, SamplingParams(), ring=ring, lane="shm")
    assert attacker.lane is not None
    for step in range(4):
        p = victim.submit(row(30 + step))
        os.eventfd_write(attacker.lane.request_fd, 1)  # the attacker's own doorbell, while the victim's frame waits
        time.sleep(0.05)
        assert victim.collect(p).token_id == 30 + step
    victim.close()
    other.close()


def test_lane_connections_that_never_say_hello_are_capped_and_closed_at_the_timeout(lane) -> None:
    from sidecar.lane import HELLO_TIMEOUT_S, MAX_PENDING_HELLOS

    sc, c, digest, ring, channel = lane
    path = str(sc.socket) + ".lane"
    idle = []
    for _ in range(MAX_PENDING_HELLOS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        idle.append(s)
    time.sleep(0.3)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(5)
    extra.connect(path)
    assert extra.recv(256).startswith(b"NOtoo many lane connections")  # refused at once, not held
    extra.close()
    time.sleep(HELLO_TIMEOUT_S + 1)
    for s in idle:  # each was closed with the reason
        s.settimeout(2)
        assert s.recv(256).startswith(b"NOno hello within")
        s.close()
    s = c.open_session(digest, SamplingParams(), ring=ring, lane="shm")  # the lane serves again
    assert s.step(row(5)).token_id == 5
    s.close()


def test_out_of_descriptors_the_lane_pauses_its_accepts_instead_of_spinning(tmp_path, keys) -> None:
    import resource

    from sidecar.launch import start_local_sidecar

    sc = start_local_sidecar(tmp_path, None, (keys.private, keys.public), {resource.RLIMIT_NOFILE: (64, 64)})
    try:
        sc.wait_started()
        path = str(sc.socket) + ".lane"
        conns = []
        for _ in range(120):  # past the sidecar's 64 descriptors: the rest wait in the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except OSError:
                s.close()
                break
            conns.append(s)
        time.sleep(2.0)
        assert "pausing accepts" in sc.log_text()
        assert sc.log.stat().st_size < 50_000  # a warning every pause, not a spin (12 MB in 3 s before)
        for s in conns:
            s.close()
        time.sleep(1.0)
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        digest = c.register_vocabulary(VOCAB)
        with RingWriter.create(slots=2, vocab_size=V, verdict_capacity=4096) as ring:
            s = c.open_session(digest, SamplingParams(), ring=ring, lane="shm")
            assert s.step(row(9)).token_id == 9
            s.close()
        c.close()
    finally:
        sc.stop()


@pytest.mark.parametrize(("slots", "rows"), [(65, 1), (2, 257)])
def test_a_fast_lane_ring_shaped_past_the_bounds_is_refused_at_open(lane, slots: int, rows: int) -> None:
    sc, c, digest, ring, channel = lane
    with RingWriter.create(slots=slots, rows=rows, vocab_size=V, verdict_capacity=512) as big:
        with pytest.raises(
            StepRefused, match=r"a fast-lane ring may have at most max_lane_slots \(64\) of max_batch_rows \(256\)"
        ):
            c.open_session(digest, SamplingParams(), ring=big, lane="shm")
        s = c.open_session(digest, SamplingParams(), ring=big)  # the gRPC lane reads a named row only: fine
        s.close()


def test_the_lane_never_grows_back_a_ring_its_engine_shrank(lane) -> None:
    from sidecar.errors import GuardUnavailable
    from sidecar.ring import LANE_REQUEST

    sc, c, digest, small_ring, channel = lane
    with RingWriter.create(slots=1, vocab_size=V, verdict_capacity=4096) as ring:
        s = c.open_session(digest, SamplingParams(), ring=ring, lane="shm")
        path = f"/dev/shm/{ring.name.lstrip('/')}"
        cut = ring.layout.slot_offset(0) + ring.layout.lane_offset + LANE_REQUEST  # the frame and request fit, no verdict
        os.truncate(path, cut)
        with pytest.raises(GuardUnavailable, match="truncated"):
            s.step(row(3))
        assert os.stat(path).st_size == cut
        os.truncate(path, ring.layout.total_size)  # (so that closing the mapping is safe)
    assert _serving(channel)
