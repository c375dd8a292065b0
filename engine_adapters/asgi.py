"""ASGI plumbing shared by the guard's HTTP layers (fse-engine-llama, the vLLM middleware)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


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
