"""ASGI plumbing shared by the guard's HTTP layers (fse-engine-llama, the vLLM middleware)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sidecar.logs import fields

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app ``body`` (read already, checked or rewritten) as the whole
    request, then whatever the client sends next (its disconnect, when it comes)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class AccessLog:
    """One line per HTTP request once its answer has ended (a stream: its last event): the
    method, path, status, latency and what the handler noted in ``scope["state"]["fse"]``
    (the request id, finish reason, tokens, heals, policy). 499: the client left before an
    answer started."""

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app, self.log = app, logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        note: dict[str, Any] = scope.setdefault("state", {}).setdefault("fse", {})
        status, first = 499, None

        async def sending(message: Message) -> None:
            nonlocal status, first
            if message["type"] == "http.response.start":
                status, first = message["status"], time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            now = time.perf_counter()
            client = scope.get("client")
            self.log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra=fields(
                    event="request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    latency_ms=round((now - t0) * 1e3, 1),
                    first_byte_ms=round((first - t0) * 1e3, 1) if first is not None else None,
                    client=f"{client[0]}:{client[1]}" if client else None,
                    **note,
                ),
            )
