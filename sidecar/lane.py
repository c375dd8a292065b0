"""The fast lane: steps of co-located engines through shared memory and eventfds.

An engine that opened its session with ``fast_lane`` connects to the lane socket and
presents the session's lane token with two eventfds (SCM_RIGHTS): ``request`` (the engine
rings it after writing a frame and the slot's request record) and ``answer`` (the sidecar
rings it after writing the slot's verdict area). No gRPC message crosses per token; the
step is judged by the same service call as a gRPC ``Step`` and its ``StepResponse`` bytes
are written into the ring (RING.md "Fast-lane area") with ``pwrite``: the sidecar still
never maps an engine's memory.

The doorbell is registered with the asyncio loop (``loop.add_reader``), so the service
core is only ever called from the loop thread, as for gRPC: no lock, no GIL convoy with
the gRPC sessions. Measured between two processes here (``fse-sidecar bench lane``): a
thread blocked in ``eventfd_read`` answers ~4 µs sooner back to back (5 vs 9 µs p50), but
it would have to take a lock around the service and compete for the GIL with the loop's
steps (up to the 5 ms switch interval); after a paced engine (a forward pass between
steps) both are dominated by the wake-up of an idle core (~50-65 µs).

The lane socket stays open for the session: when the engine goes (EOF) the session is
closed at once; when the sidecar goes, the engine sees the hang-up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ._pb.fse.v1 import guard_pb2 as pb
from .core.session import Session
from .errors import FseError
from .ring import LANE_GOODBYE_BYTES, REQUEST_ECHO, REQUEST_PING
from .service import GuardService

log = logging.getLogger("fse.lane")
TOKEN_BYTES = 32
HELLO_OK = b"OK"
HELLO_TIMEOUT_S = 5  # a connection that has not said hello by then is closed
MAX_PENDING_HELLOS = 64  # connections waiting to say hello; more are refused at once
ACCEPT_PAUSE_S = 0.5  # accepts paused this long when the process is out of descriptors


class _Lane:
    """One connected engine session."""

    def __init__(self, server: LaneServer, session_id: str, conn: socket.socket, request_fd: int, answer_fd: int) -> None:
        self.server, self.session_id, self.conn = server, session_id, conn
        self.request_fd, self.answer_fd = request_fd, answer_fd
        self.reader = server.service.ring_reader(session_id)
        self.reader.open_lane()
        self.done = [0] * self.reader.layout.slot_count
        self.cursor = 0  # the slot answered last: where the next doorbell's scan starts
        self.closed = False
        loop = server.loop
        loop.add_reader(request_fd, self._rung)
        loop.add_reader(conn.fileno(), self._peer)

    def _rung(self) -> None:
        try:
            rung = os.eventfd_read(self.request_fd)  # the engine writes 1 per request: how many are new
        except BlockingIOError:
            return
        except OSError as exc:  # checked to be an eventfd at the hello: this lane alone ends
            self.fault(f"the lane's request eventfd failed: {exc.strerror}")
            return
        t0 = time.perf_counter_ns()
        service = self.server.service
        try:
            s = service.session(self.session_id)
        except FseError as exc:
            self.close(str(exc))
            return
        # Scan from the slot answered last (an engine reusing one slot, or going round them,
        # is found at the first or second read) and stop once as many requests as rings were
        # answered: a doorbell costs the reads of its own requests, not one per slot.
        count, answered = self.reader.layout.slot_count, 0
        for i in range(count):
            if answered >= rung:
                break
            slot = (self.cursor + i) % count
            try:
                frame_seq, _deadline, n_rows, flags = self.reader.request(slot)
                if frame_seq <= self.done[slot]:
                    continue
                # Several sessions may share a ring: answer only this session's frames (a
                # doorbell answering another's slot would fail that session's step)
                if not flags & (REQUEST_PING | REQUEST_ECHO):
                    tag = self.reader.frame_tag(slot, frame_seq)
                    if tag is not None and tag != s.tag:
                        continue
            except FseError as exc:  # the ring cannot be read (truncated under us): no answer can go in it
                log.debug("lane %s: %s", self.session_id, exc)
                self.fault(str(exc))
                return
            self.done[slot] = frame_seq
            self.cursor, answered = slot, answered + 1
            if flags & REQUEST_PING:
                if not self._ring_back():
                    return
                continue
            if flags & REQUEST_ECHO:
                answers = [b""]
            else:
                rows = max(1, min(n_rows, self.reader.layout.row_capacity))
                answers = [self._answer(s, slot, row, frame_seq) for row in range(rows)]
            try:
                self.reader.write_verdicts(slot, frame_seq, answers, (time.perf_counter_ns() - t0) // 1000)
            except FseError as exc:  # no verdict in the ring: the engine is told on the socket
                log.warning("lane %s: %s", self.session_id, exc)
                self.fault(str(exc))
                return
            if not self._ring_back():
                return
        after = self.server.after_answer
        if after is not None:
            after()

    def _ring_back(self) -> bool:
        """Ring the engine's answer eventfd; False (the lane has ended) if that fails. It is
        non-blocking (checked at the hello): a full counter is the engine's fault, and
        never stalls the loop every other session shares."""
        try:
            os.eventfd_write(self.answer_fd, 1)
        except OSError as exc:
            self.fault(f"the lane's answer eventfd cannot be rung: {exc.strerror or exc}")
            return False
        return True

    def _answer(self, s: Session, slot: int, row: int, frame_seq: int) -> bytes:
        """One row's StepResponse, by the same call as a gRPC Step, as ring bytes."""
        req = pb.StepRequest(
            session_id=s.session_id, session_secret=s.secret, step=s.next_step, ring=pb.RingRef(slot=slot, row=row, seq=frame_seq)
        )
        data = self.server.answer(req).SerializeToString(deterministic=True)
        room = self.reader.layout.verdict_capacity - 4
        if len(data) > room:  # never cut a verdict: refuse it whole (the engine fails closed)
            why = f"the verdict of {len(data)} bytes exceeds the ring's verdict capacity ({room})"
            err = pb.StepError(session_id=s.session_id, step=req.step, code=8, message=why)  # RESOURCE_EXHAUSTED
            data = pb.StepResponse(error=err).SerializeToString(deterministic=True)
        return data

    def _peer(self) -> None:
        try:
            data = self.conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the engine hung up: its session goes now, not at the idle reaper
            self.server.service.drop_session(self.session_id)
            self.close()

    def fault(self, why: str) -> None:
        """The lane cannot go on (its ring is broken): the session ends, the engine is told why."""
        self.close(why)
        self.server.service.drop_session(self.session_id)

    def close(self, why: str = "") -> None:
        """Hang up; ``why`` goes to the engine first, on the socket (it reads it at the hang-up)."""
        if self.closed:
            return
        self.closed = True
        if why:
            with contextlib.suppress(OSError):
                self.conn.send(why.encode("utf-8", "replace")[:LANE_GOODBYE_BYTES])
        loop = self.server.loop
        for fd in (self.request_fd, self.conn.fileno()):
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        for fd in (self.request_fd, self.answer_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.conn.close()
        self.server.lanes.pop(self.session_id, None)


def _check_eventfd(fd: int, name: str) -> None:
    """An engine's doorbell must be a non-blocking eventfd: a blocking one whose counter is
    full would stall the sidecar's loop at the first write, a pipe at EOF would spin it."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = "?"
    if kind != "anon_inode:[eventfd]":
        raise FseError(f"the lane's {name} fd is not an eventfd ({kind})")
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
        raise FseError(f"the lane's {name} eventfd must be non-blocking (EFD_NONBLOCK)")


class LaneServer:
    """The lane socket: hands out lane tokens at OpenSession, binds connections to sessions."""

    def __init__(self, service: GuardService, path: Path, answer: Callable[[pb.StepRequest], pb.StepResponse]) -> None:
        self.service, self.path, self.answer = service, path, answer
        self.tokens: dict[bytes, str] = {}
        self.lanes: dict[str, _Lane] = {}
        self.sock: socket.socket | None = None  # bound by the server, with the gRPC socket's access rules
        self.after_answer: Callable[[], None] | None = None  # run once the engine has been rung (the metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hellos: dict[socket.socket, asyncio.TimerHandle] = {}  # accepted, hello not read yet

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Accept engines on the (already listening) socket from ``loop``."""
        assert self.sock is not None, "the server binds the lane socket"
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._accept)

    def token_for(self, session_id: str) -> bytes:
        token = secrets.token_bytes(TOKEN_BYTES)
        self.tokens[token] = session_id
        return token

    def _accept(self) -> None:
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:  # EMFILE/ENFILE: the connection stays queued; stop polling for a while, not spin
            log.warning("lane: cannot accept (%s): pausing accepts for %.1f s", exc.strerror or exc, ACCEPT_PAUSE_S)
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(ACCEPT_PAUSE_S, self._resume_accepts)
            return
        if len(self._hellos) >= MAX_PENDING_HELLOS:  # connections that never say hello are not kept
            with contextlib.suppress(OSError):
                conn.send(b"NOtoo many lane connections are waiting to say hello")
            conn.close()
            return
        conn.setblocking(False)
        self._hellos[conn] = self.loop.call_later(HELLO_TIMEOUT_S, self._hello_timeout, conn)
        self.loop.add_reader(conn.fileno(), self._hello, conn)

    def _resume_accepts(self) -> None:
        if self.sock is not None and self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _hello_timeout(self, conn: socket.socket) -> None:
        if self._hellos.pop(conn, None) is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(conn.fileno())
            with contextlib.suppress(OSError):
                conn.send(b"NOno hello within %d s" % HELLO_TIMEOUT_S)
            conn.close()

    def _hello(self, conn: socket.socket) -> None:
        self.loop.remove_reader(conn.fileno())
        timer = self._hellos.pop(conn, None)
        if timer is not None:
            timer.cancel()
        fds: list[int] = []
        try:
            msg, fds, _flags, _addr = socket.recv_fds(conn, TOKEN_BYTES, 2)
            session_id = self.tokens.pop(bytes(msg), None)
            if len(fds) != 2 or session_id is None:
                raise FseError("the lane wants a session's lane token and two eventfds")
            for fd, name in zip(fds, ("request", "answer"), strict=True):
                _check_eventfd(fd, name)
            if session_id in self.lanes:
                raise FseError("this session's lane is already connected")
            self.lanes[session_id] = _Lane(self, session_id, conn, fds[0], fds[1])
            conn.send(HELLO_OK)
        except (OSError, FseError) as exc:
            why = str(exc).encode()[:200] or b"refused"
            with contextlib.suppress(OSError):
                conn.send(b"NO" + why)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    def forget(self, session_id: str) -> None:
        """The session closed: its lane goes with it."""
        lane = self.lanes.get(session_id)
        if lane is not None:
            lane.close()
        for token, sid in list(self.tokens.items()):
            if sid == session_id:
                del self.tokens[token]

    def close(self) -> None:
        for lane in list(self.lanes.values()):
            lane.close()
        for conn, timer in list(self._hellos.items()):
            timer.cancel()
            with contextlib.suppress(Exception):
                self.loop.remove_reader(conn.fileno())
            conn.close()
        self._hellos.clear()
        if self.sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
