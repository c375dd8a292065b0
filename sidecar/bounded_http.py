"""Threaded HTTP servers that a slow or flooding client cannot exhaust (issue 28, items 11
and 15): at most ``max_connections`` handler threads (one more is answered 503 and closed
at once, without a thread), each reading with a socket timeout, and a listen backlog that
takes a burst without resets. Used by the sidecar's ``/metrics`` and ``fse-engine-llama``."""

from __future__ import annotations

import contextlib
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any

_BUSY_BODY = b'{"error": {"message": "busy: too many open connections", "code": 503}}'
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class BoundedThreadingMixIn(ThreadingMixIn):
    """Mix in before an HTTP/WSGI server class; call :meth:`bound` before serving. Handler
    classes set their own ``timeout`` (seconds a read may wait)."""

    daemon_threads = True
    request_queue_size = 128
    _slots: threading.BoundedSemaphore | None = None

    def bound(self, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        slots = self._slots
        assert slots is not None, "call bound() before serving"
        if not slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(BUSY_RESPONSE)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            assert self._slots is not None
            self._slots.release()


def best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and address to bind ``host`` with (IPv6 hosts included)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])
