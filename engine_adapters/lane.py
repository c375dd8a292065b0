"""Engine side of the fast lane (RING.md "Fast-lane area"; sidecar/lane.py).

Connects to the sidecar's lane socket, presents the session's lane token with two
eventfds, then per step: the frame is already in the ring; write the slot's request
record, ring ``request``, and wait in ``poll`` on ``answer`` and on the socket. An
answer is read from the slot's verdict area under its seqlock and parsed as the same
``StepResponse`` the gRPC lane would carry; the caller verifies it exactly as on gRPC.
The socket's hang-up means the sidecar is gone: the step fails at once, not at its
deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.errors import GuardUnavailable, VerdictRejected
from sidecar.ring import LANE_GOODBYE_BYTES, REQUEST_PING, RingWriter


class LaneChannel:
    def __init__(self, path: str, token: bytes, ring: RingWriter, timeout: float = 5.0) -> None:
        self.ring = ring
        self.request_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # the sidecar refuses blocking ones
        self.answer_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            socket.send_fds(self.sock, [token], [self.request_fd, self.answer_fd])
            reply = self.sock.recv(256)
        except OSError as exc:
            self.close()
            raise GuardUnavailable(f"fast lane {path}: {exc.strerror or exc}") from None
        if reply != b"OK":
            self.close()
            raise GuardUnavailable(f"fast lane {path} refused: {reply[2:].decode(errors='replace') or 'no answer'}")
        self.sock.setblocking(False)
        self.service_s = 0.0  # the sidecar's own time on the last answer, as it reports it (not signed)
        self._poll = select.poll()
        self._poll.register(self.answer_fd, select.POLLIN)
        self._poll.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)

    def roundtrip(self, slot: int, frame_seq: int, timeout: float, what: str, flags: int = 0) -> pb.StepResponse:
        deadline = time.monotonic() + timeout
        self.send(slot, frame_seq, timeout, flags)
        return self.wait(slot, frame_seq, deadline, timeout, what, flags)

    def send(self, slot: int, frame_seq: int, timeout: float, flags: int = 0) -> None:
        """Submit the frame and ring; the answer is collected by :meth:`wait`."""
        self.ring.submit(slot, frame_seq, 1, time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(timeout * 1e9), flags)
        os.eventfd_write(self.request_fd, 1)

    def wait(self, slot: int, frame_seq: int, deadline: float, timeout: float, what: str, flags: int = 0) -> pb.StepResponse:
        """The answer to ``frame_seq``, by ``deadline`` (monotonic seconds), or raise.

        Past the deadline the verdict area is still read once (after a look for the sidecar's
        hang-up: a ring it found broken is not touched): an engine that was busy past the
        deadline (its own forward pass while speculating, on a loaded node) takes the answer
        the sidecar wrote; only an answer that is not there fails the step."""
        while True:
            left = deadline - time.monotonic()
            rung = False
            for fd, ev in self._poll.poll(max(left, 0.0) * 1e3):
                if fd == self.sock.fileno():
                    raise GuardUnavailable(f"{what}: the sidecar closed the fast lane ({self._goodbye()})")
                if ev & select.POLLIN:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self.answer_fd)
                        rung = True
            if flags & REQUEST_PING:
                if rung:
                    return pb.StepResponse()
            else:
                answer = self._answer(slot, frame_seq, what)
                if answer is not None:
                    return answer
            if left <= 0:
                raise GuardUnavailable(f"{what}: no verdict on the fast lane within {timeout:.3f}s")

    def _answer(self, slot: int, frame_seq: int, what: str) -> pb.StepResponse | None:
        got = self.ring.verdicts(slot, frame_seq)
        if got is None:
            return None
        answers, service_us = got
        self.service_s = service_us / 1e6
        if len(answers) != 1:
            raise VerdictRejected(f"{what}: {len(answers)} answers in the verdict area, one row was sent")
        try:
            return pb.StepResponse.FromString(answers[0])
        except Exception:  # noqa: BLE001 - any unparsable answer fails closed
            raise VerdictRejected(f"{what}: the verdict area holds no StepResponse") from None

    def _goodbye(self) -> str:
        """Why the sidecar hung up, when it said (a broken ring); else what a silent hang-up means."""
        try:
            why = self.sock.recv(LANE_GOODBYE_BYTES, socket.MSG_DONTWAIT)
        except OSError:
            why = b""
        return why.decode("utf-8", "replace") if why else "it stopped or dropped the session"

    def close(self) -> None:
        for fd in (self.request_fd, self.answer_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.sock.close()
