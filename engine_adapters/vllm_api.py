"""The guard's ASGI middleware for vLLM's OpenAI server (``--middleware``; ``fse-vllm serve``
adds it): what an API client sees is the shared contract (DESIGN §10).

vLLM's logits processors cannot set a finish reason, and vLLM's REST typing of
``vllm_xargs`` (``dict[str, str | int | float | list]``) admits no nested object. This
middleware sits in front of ``/v1/completions`` and ``/v1/chat/completions``:

- **requests**: the body is parsed and written again (vLLM reads exactly what was
  checked). ``vllm_xargs.fse_policy`` must be a policy the operator allows; any other
  ``fse*`` key, ``n`` other than 1, ``best_of`` and beam search are a 400 naming the
  field (beam search picks tokens from raw log-probabilities, past the guard). The
  middleware adds ``vllm_xargs.fse_request``, a fresh key under which the engine's
  processor reports how the guard ended the request (:mod:`engine_adapters.outcomes`).
- **responses**: when the request's choice finishes, its outcome is taken from the
  board. A guard ABORT ends the choice with ``finish_reason: "content_filter"`` (the text
  is what was verified up to it); a guard that could not answer is HTTP 503 with
  ``Retry-After`` when no text has gone out (a stream's start is held until its first
  text), and otherwise an error event that ends the stream. Never a plain ``"stop"``.
  Why (rules, guards) goes to the audit, the metrics and this process's log, not to the client.
- other POST endpoints that generate (``/v1/responses``, ``/v1/messages``, ``/invocations``,
  ``/inference/...``) are a 404 here: they would end guarded requests without saying so.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from .asgi import replaying
from .outcomes import Outcome, OutcomeBoard
from .policies import operator_policies
from .vllm import POLICY_KEY, REQUEST_KEY, log_to_stderr

log = logging.getLogger("fse.vllm.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED = frozenset({"/v1/completions", "/v1/chat/completions"})
OTHER_POSTS = frozenset({"/tokenize", "/detokenize"})  # no generation: passed as they are
CLIENT_ABORT = "the answer was stopped by the content guard"
CLIENT_UNAVAILABLE = "the content guard could not check the answer; try again"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def _error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": status}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


async def _respond(send: Send, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _has_text(event: dict[str, Any]) -> bool:
    """A chunk that carries generated text (completions' ``text``, chat's ``delta`` beyond its role)."""
    for c in event.get("choices") or ():
        if c.get("text") or any(v for k, v in (c.get("delta") or {}).items() if k != "role"):
            return True
    return False


def _finished(event: dict[str, Any]) -> bool:
    return any(c.get("finish_reason") is not None for c in event.get("choices") or ())


def _content_filter(event: dict[str, Any], key: str, outcome: Outcome) -> None:
    """The guard ended this request: the finishing choices say so (why goes to the log)."""
    log.info("fse: request %s ended by the guard after %d tokens: %s", key, outcome.tokens, outcome.detail)
    for c in event.get("choices") or ():
        if c.get("finish_reason") is not None:
            c["finish_reason"] = "content_filter"
            if "stop_reason" in c:
                c["stop_reason"] = None


class FseGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        log_to_stderr("APIServer")
        board = OutcomeBoard.from_env()
        if board is None or not board.dir.is_dir():
            raise RuntimeError(
                "the guard's middleware needs FSE_OUTCOMES_DIR, a directory shared with the engine (fse-vllm serve makes one)"
            )
        self.board = board
        self.default_policy, self.allowed = operator_policies()
        self.max_body = int(os.environ.get("FSE_MAX_BODY_BYTES", str(8 << 20)))
        self.retry_after = os.environ.get("FSE_RETRY_AFTER", "1").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if path in OTHER_POSTS:
            return await self.app(scope, receive, send)
        if path not in GUARDED:
            body = _error_body(404, f"{path} is not served under the content guard", "NotFoundError")
            return await _respond(send, 404, body)
        key = uuid.uuid4().hex
        try:
            raw = await self._body(receive)
            if raw is None:
                return  # the client went away
            request = self._rewritten(raw, key)
        except _BadRequest as exc:
            return await _respond(send, exc.status, _error_body(exc.status, str(exc), "BadRequestError", exc.param))
        body = json.dumps(request, separators=(",", ":")).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        inner = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        replay = replaying(body, receive)

        try:
            if request.get("stream") is True:
                await self.app(inner, replay, _Stream(self, key, send).send)
            else:
                await self.app(inner, replay, _Whole(self, key, send).send)
        finally:
            self.board.discard(key)  # a request that ended early (disconnect) leaves nothing behind

    async def _body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                return None
            chunk = m.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BadRequest(413, f"the request body is over {self.max_body} bytes")
            chunks.append(chunk)
            if not m.get("more_body"):
                return b"".join(chunks)

    def _rewritten(self, raw: bytes, key: str) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _BadRequest(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise _BadRequest(400, "the request body must be a JSON object")
        if request.get("n", 1) not in (1, None):
            raise _BadRequest(400, "n: the guarded server gives one choice per request", "n")
        if request.get("best_of", 1) not in (1, None):
            raise _BadRequest(400, "best_of: the guarded server gives one choice per request", "best_of")
        if request.get("use_beam_search"):
            raise _BadRequest(400, "use_beam_search: beam search picks tokens past the guard", "use_beam_search")
        xargs = request.get("vllm_xargs")
        if xargs is None:
            xargs = {}
        if not isinstance(xargs, dict):
            raise _BadRequest(400, "vllm_xargs must be an object", "vllm_xargs")
        unknown = sorted(k for k in xargs if k.startswith("fse") and k != POLICY_KEY)
        if unknown:
            raise _BadRequest(
                400,
                f"vllm_xargs: unknown guard keys {unknown} (a request may set only {POLICY_KEY!r})",
                f"vllm_xargs.{unknown[0]}",
            )
        policy = xargs.get(POLICY_KEY, self.default_policy)
        if not isinstance(policy, str) or policy not in self.allowed:
            raise _BadRequest(
                400,
                f"vllm_xargs.{POLICY_KEY}: {policy!r} is not a policy this server allows (allowed: {sorted(self.allowed)})",
                f"vllm_xargs.{POLICY_KEY}",
            )
        request["vllm_xargs"] = {**xargs, REQUEST_KEY: key}
        return request

    def unavailable(self, key: str, detail: str) -> bytes:
        log.warning("fse: request %s: the guard could not answer: %s", key, detail)
        return _error_body(503, CLIENT_UNAVAILABLE, "ServiceUnavailableError")


class _Whole:
    """A whole (non-streaming) response: held, then passed on with the guard's outcome."""

    def __init__(self, mw: FseGuardMiddleware, key: str, send: Send) -> None:
        self.mw, self.key, self.out = mw, key, send
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def send(self, m: Message) -> None:
        if m["type"] == "http.response.start":
            self.start = m
            return
        if m["type"] != "http.response.body":
            return await self.out(m)
        self.chunks.append(m.get("body", b""))
        if m.get("more_body"):
            return
        assert self.start is not None
        body = b"".join(self.chunks)
        outcome = self.mw.board.take(self.key) if self.start["status"] == 200 else None
        if outcome is None:
            await self.out(self.start)
            return await self.out({"type": "http.response.body", "body": body, "more_body": False})
        if outcome.finish == "guard_error":
            return await _respond(
                self.out, 503, self.mw.unavailable(self.key, outcome.detail), [(b"retry-after", self.mw.retry_after)]
            )
        answer = json.loads(body)
        _content_filter(answer, self.key, outcome)
        await _respond(self.out, 200, json.dumps(answer, separators=(",", ":")).encode())


class _Stream:
    """A streamed (SSE) response: the start is held until the first text (so a guard that
    cannot answer before any text is still a 503); each event with a finish reason gets
    the guard's outcome."""

    def __init__(self, mw: FseGuardMiddleware, key: str, send: Send) -> None:
        self.mw, self.key, self.out = mw, key, send
        self.start: Message | None = None
        self.started = False
        self.held: list[bytes] = []
        self.buffer = b""
        self.ended = False  # this middleware ended the response: later messages are dropped
        self.passthrough = False

    async def send(self, m: Message) -> None:
        if self.ended:
            return
        if m["type"] == "http.response.start":
            self.start = m
            self.passthrough = m["status"] != 200
            if self.passthrough:
                await self.out(m)
            return
        if m["type"] != "http.response.body" or self.passthrough:
            return await self.out(m)
        self.buffer += m.get("body", b"")
        *events, self.buffer = self.buffer.split(b"\n\n")
        for ev in events:
            await self._event(ev + b"\n\n")
            if self.ended:
                return
        if not m.get("more_body"):
            if self.buffer:
                await self._emit(self.buffer)
            await self._begin()
            self.ended = True
            await self.out({"type": "http.response.body", "body": b"", "more_body": False})

    async def _event(self, ev: bytes) -> None:
        data = ev.strip()
        if not data.startswith(b"data:") or data[5:].strip() == b"[DONE]":
            return await self._emit(ev)
        try:
            event = json.loads(data[5:])
        except ValueError:
            return await self._emit(ev)
        if not isinstance(event, dict):
            return await self._emit(ev)
        if _finished(event):
            outcome = self.mw.board.take(self.key)
            if outcome is not None and outcome.finish == "guard_error":
                return await self._fail(outcome.detail)
            if outcome is not None:
                _content_filter(event, self.key, outcome)
                ev = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            await self._emit(ev)
            return await self._begin()
        await self._emit(ev)
        if _has_text(event):
            await self._begin()

    async def _emit(self, ev: bytes) -> None:
        if self.started:
            await self.out({"type": "http.response.body", "body": ev, "more_body": True})
        else:
            self.held.append(ev)

    async def _begin(self) -> None:
        if self.started:
            return
        assert self.start is not None
        self.started = True
        await self.out(self.start)
        held, self.held = self.held, []
        for ev in held:
            await self.out({"type": "http.response.body", "body": ev, "more_body": True})

    async def _fail(self, detail: str) -> None:
        self.ended = True
        body = self.mw.unavailable(self.key, detail)
        if not self.started:  # nothing went out: a plain 503 the client can retry
            return await _respond(self.out, 503, body, [(b"retry-after", self.mw.retry_after)])
        await self.out({"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": False})
