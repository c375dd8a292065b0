"""Bounds uvicorn does not set on its own: how long a client may take to send a request's
headers, and its body (size and time). Without them one slow client holds a connection,
and so one of ``--max-connections``, for as long as it likes (slowloris).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .asgi import ASGIApp, Receive, Scope, Send, replaying

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)


_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


def timed_h11(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with a deadline on each request's line and headers (a
    connection that has not sent them whole ``header_timeout`` seconds after it opened, or
    after its last response, is answered 408 and closed) and a cap on open connections (one
    past ``max_connections`` is answered 503 with ``Retry-After`` at once and closed; uvicorn's
    own ``limit_concurrency`` answers without ``Retry-After``)."""

    class TimedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                body = json.dumps(
                    {"error": {"message": f"too many open connections (at most {max_connections})", "type": "unavailable"}}
                ).encode()
                self._refused = True
                transport.write(_BUSY_503 % (len(body), body))
                # half-close and drop what the client sends: a close with unread bytes would be
                # a reset that can discard the answer before the client reads it
                transport.write_eof()
                self.loop.call_later(1.0, transport.close)
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._late)

        def _late(self) -> None:
            self._header_timer = None
            # IDLE: no whole request (line and headers) has arrived since the last response
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            body = json.dumps(
                {"error": {"message": f"the request's headers did not arrive within {header_timeout:g} s", "type": "timeout"}}
            ).encode()
            self.transport.write(_TIMEOUT_408 % (len(body), body))
            self.transport.close()

    return TimedH11


class BodyLimits:
    """ASGI middleware: a request body over ``max_body`` bytes is a 413, one that does not
    arrive whole within ``body_timeout`` seconds a 408 (and the connection is closed); the
    body, read here, is passed on to the app unchanged.

    Bodies are JSON: one sent without a Content-Type, or with curl's default
    (``application/x-www-form-urlencoded``), is read as JSON; any other type is a 415."""

    def __init__(self, app: ASGIApp, max_body: int, body_timeout: float) -> None:
        self.app, self.max_body, self.body_timeout = app, max_body, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        kind = next((v for k, v in scope["headers"] if k == b"content-type"), b"").split(b";")[0].strip().lower()
        if kind not in (b"application/json", b"", b"application/x-www-form-urlencoded"):
            return await _error(send, 415, f"Content-Type must be application/json, got {kind.decode('latin-1')[:60]!r}")
        if kind != b"application/json":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _error(send, 413, f"the request body is over {self.max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    m = await receive()
                    if m["type"] == "http.disconnect":
                        return  # the client went away: nothing to answer
                    chunk = m.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        return await _error(send, 413, f"the request body is over {self.max_body} bytes")
                    chunks.append(chunk)
                    if not m.get("more_body"):
                        break
        except TimeoutError:
            return await _error(send, 408, f"the request body did not arrive within {self.body_timeout:g} s")
        body = b"".join(chunks)
        await self.app(scope, replaying(body, receive), send)


async def _error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
