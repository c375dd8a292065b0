"""``fse-engine-llama``: a guarded llama.cpp engine behind an OpenAI-compatible API.

Every token it returns was proposed, judged and signed by the fse sidecar beside it and
verified here; a streamed chunk carries only such tokens (DESIGN §10). FastAPI on uvicorn:

- ``POST /v1/chat/completions`` (the model's own chat template, from its GGUF metadata),
  ``POST /v1/completions`` (the prompt as it is), streaming (SSE, ending ``data: [DONE]``)
  or not; ``GET /v1/models``; ``GET /healthz``; the OpenAPI document at ``/openapi.json``.
- the guard's ABORT ends the answer with ``finish_reason: "content_filter"`` and the text
  verified up to it; why goes to the log and the audit (to clients only with
  ``--expose-guard-reasons``). No valid verdict before any text: 503 with ``Retry-After``;
  after text was streamed: an error event, then the stream ends. Never a "stop" it was not.
- a request is a pydantic model (400 naming the field, an unknown policy included); the
  queue is bounded (429 with ``Retry-After`` when full); headers and body have deadlines; a
  client that goes away stops its generation and closes its guard session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from sidecar import logs
from sidecar._version import __version__
from sidecar.about import add_version_flag
from sidecar.errors import ConfigError, FseError, GuardError
from sidecar.logs import LOG_FORMATS, LOG_LEVELS

from . import omp
from .client import GuardClient
from .llama_engine import BadRequest, End, Engine, Event, Job, Piece
from .openai_schema import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Model,
    ModelList,
    error_body,
    new_id,
    now,
)
from .policies import operator_policies

log = logging.getLogger("fse.engine.llama")
access = logging.getLogger("fse.engine.access")

_TYPE_NAMES = frozenset({"str", "int", "float", "bool"})


def _is_type_name(part: str) -> bool:
    return part in _TYPE_NAMES or "[" in part or part.startswith(("constrained-", "function-"))


CLIENT_ABORT = "the answer was stopped by the content guard"
CLIENT_UNAVAILABLE = "the content guard could not check the answer; try again"


@dataclass(frozen=True)
class Settings:
    max_tokens: int = 512  # the most a request may ask for (and what chat gets when it asks none)
    request_timeout: float = 120.0  # queue wait and generation, in all
    default_policy: str = "default"
    policies: frozenset[str] = frozenset({"default"})
    expose_reasons: bool = False
    retry_after: int = 1
    served_model: str | None = None  # the id in /v1/models (default: the GGUF's file name)


class _ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, retry: bool = False) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.retry = status, kind, param, retry


def create_app(engine: Engine, template: Any, settings: Settings) -> FastAPI:
    """The ASGI app (FastAPI) serving ``engine``; ``template``: a ChatTemplate."""
    model_id = settings.served_model or engine.model
    created = now()
    app = FastAPI(
        title="fse-engine-llama",
        version=__version__,
        description="A guarded llama.cpp engine: OpenAI-compatible; every token verified (libfse).",
        docs_url=None,
        redoc_url=None,
    )

    def not_served(name: str) -> _ApiError:
        return _ApiError(404, f"model: {name!r} is not served here (GET /v1/models: {model_id!r})", "not_found_error", "model")

    def error_response(exc: _ApiError) -> JSONResponse:
        headers = {"Retry-After": str(settings.retry_after)} if exc.retry else None
        return JSONResponse(error_body(exc.status, str(exc), exc.kind, exc.param), exc.status, headers=headers)

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, exc: _ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [dict(e) for e in exc.errors()] or [{"loc": (), "msg": "invalid request"}]
        # a union's members each report: the one whose type matched the input says what is wrong
        first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # pydantic names union members in the location ("str", "list[int]"): the field is what counts
        param = ".".join(p for p in loc if not _is_type_name(p))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = "this server does not take this field"
        elif first.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", ""
        elif not param and (named := re.match(r"([a-z_]+): ", msg)):  # a check across fields names its field first
            param, msg = named.group(1), msg[named.end() :]
        return error_response(_ApiError(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param or None))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no such path: {request.url.path[:80]}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message, kind), exc.status_code, headers=exc.headers)

    errors: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse, "description": d}
        for s, d in [
            (400, "a field is wrong (named in error.param)"),
            (404, "another model"),
            (408, "the body did not arrive in time"),
            (413, "the body is too large"),
            (429, "the queue is full: retry after Retry-After seconds"),
            (500, "the engine failed: no text"),
            (503, "the guard could not answer before any text: retry after Retry-After seconds"),
            (504, "no answer within the request timeout"),
        ]
    }
    # schemathesis (and OpenAPI 3.2's itemSchema) read an SSE schema as that of each event
    event = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}, "required": ["data"]}
    stream_doc = {"text/event-stream": {"schema": event}}
    sse: dict[int | str, dict[str, Any]] = {200: {"content": stream_doc, "description": "the answer, or its stream"}}

    @app.get("/healthz", responses={503: errors[503]})
    async def healthz() -> JSONResponse:
        try:
            await asyncio.to_thread(engine.ready)
        except FseError as exc:
            return JSONResponse(error_body(503, str(exc), "unavailable"), 503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "serving", "model": model_id, "lane": engine.lane})

    card = {"id": model_id, "object": "model", "created": created, "owned_by": "libfse"}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model}", response_model=Model, responses={404: errors[404]})
    async def model(model: str) -> dict[str, Any]:
        if model != model_id:
            raise not_served(model)
        return card

    @app.post("/v1/completions", response_model=Completion, responses={**errors, **sse})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        limit = body.max_tokens if body.max_tokens is not None else min(COMPLETIONS_DEFAULT_MAX_TOKENS, settings.max_tokens)
        return await _serve(request, body, body.prompt, limit, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**errors, **sse})
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
        try:
            prompt = template.render(messages)
        except ValueError as exc:
            raise _ApiError(400, f"messages: {exc}", "invalid_request_error", "messages") from None
        return await _serve(request, body, prompt, body.limit, chat=True)

    async def _serve(request: Request, body: Any, prompt: Any, limit: int | None, *, chat: bool) -> Response:
        if body.model not in (None, model_id):
            raise not_served(body.model)
        policy = body.policy if body.policy is not None else settings.default_policy
        if policy not in settings.policies:
            raise _ApiError(
                400, f"policy: {policy!r} is not a policy this server allows (allowed: {sorted(settings.policies)})",
                "invalid_request_error", "policy",
            )  # fmt: skip
        for name in ("max_tokens", "max_completion_tokens"):
            asked = getattr(body, name, None)
            if asked is not None and asked > settings.max_tokens:
                raise _ApiError(400, f"{name} must be at most {settings.max_tokens}, got {asked}", "invalid_request_error", name)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job.on_loop(
            loop, events, prompt=prompt, max_tokens=limit, cap=settings.max_tokens, sampling=body.sampling(), policy=policy,
            stops=body.stops,
        )  # fmt: skip
        rid = new_id("chatcmpl" if chat else "cmpl")
        note: dict[str, Any] = request.scope.setdefault("state", {}).setdefault("fse", {})  # for the access log
        note.update(request_id=rid, policy=policy, stream=bool(body.stream))
        try:
            engine.submit(job)
        except queue.Full:
            raise _ApiError(429, "the engine is busy: its queue is full", "rate_limit_error", retry=True) from None
        deadline = loop.time() + settings.request_timeout
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            first = await _next(events, deadline, gone)
            if first is None:  # the client went away while its request waited
                job.cancelled.set()
                return Response(status_code=499)
            if isinstance(first, End) and first.finish is None:
                raise _failure(rid, first, note)
            if body.stream:
                gone.cancel()  # from here Starlette's streaming response watches for the disconnect
                stream = _sse(rid, chat, body, policy, first, events, job, deadline, note)
                return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            pieces, ev = [], first
            while isinstance(ev, Piece):
                pieces.append(ev.text)
                nxt = await _next(events, deadline, gone)
                if nxt is None:
                    job.cancelled.set()
                    return Response(status_code=499)
                ev = nxt
            if ev.finish is None:
                raise _failure(rid, ev, note)
            _ended(rid, policy, ev, note)
            text = "".join(pieces)
            choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish, "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            answer = {
                "id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(), "model": model_id,
                "choices": [choice], "usage": _usage(ev), "fse": _fse(ev, policy),
            }  # fmt: skip
            return JSONResponse(answer)
        except TimeoutError:
            job.cancelled.set()
            note["error"] = "timeout"
            raise _ApiError(504, f"no answer within {settings.request_timeout:g} s", "timeout") from None
        finally:
            gone.cancel()

    async def _sse(
        rid: str,
        chat: bool,
        body: Any,
        policy: str,
        first: Event,
        events: asyncio.Queue[Event],
        job: Job,
        deadline: float,
        note: dict[str, Any],
    ) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        stamp = now()

        def chunk(text: str | None, finish: str | None = None, **extra: Any) -> bytes:
            if chat:
                delta = {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            event = {"id": rid, "object": kind, "created": stamp, "model": model_id, "choices": [choice], **extra}
            return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"

        try:
            if chat:
                yield chunk(None).replace(b'"delta":{}', b'"delta":{"role":"assistant","content":""}', 1)
            ev = first
            while isinstance(ev, Piece):
                yield chunk(ev.text)
                async with asyncio.timeout_at(deadline):
                    ev = await events.get()
            if ev.finish is None:  # the same words as a failure before any text (with the reason when exposed)
                err = _failure(rid, ev, note)
                yield b"data: " + json.dumps(error_body(err.status, str(err), err.kind)).encode() + b"\n\n"
                return
            _ended(rid, policy, ev, note)
            yield chunk(None if chat else "", ev.finish, fse=_fse(ev, policy))
            if body.include_usage:
                usage = {"id": rid, "object": kind, "created": stamp, "model": model_id, "choices": [], "usage": _usage(ev)}
                yield b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        except TimeoutError:
            note["error"] = "timeout"
            log.warning("%s: no end within %g s: the stream ends with an error", rid, settings.request_timeout)
            yield b"data: " + json.dumps(error_body(504, f"no answer within {settings.request_timeout:g} s", "timeout")).encode()
            yield b"\n\n"
        finally:
            job.cancelled.set()  # the client went away (or the stream ended): stop generating

    def _failure(rid: str, end: End, note: dict[str, Any]) -> _ApiError:
        """What the client hears when no valid verdict came: why goes to this log."""
        err = end.error
        note.update(completion_tokens=end.tokens, error=type(err).__name__)
        if isinstance(err, BadRequest):
            return _ApiError(400, str(err), "invalid_request_error", err.param)
        if isinstance(err, FseError):
            log.warning("%s: the guard could not answer after %d tokens: %s: %s", rid, end.tokens, type(err).__name__, err)
            message = f"{CLIENT_UNAVAILABLE} ({err})" if settings.expose_reasons else CLIENT_UNAVAILABLE
            return _ApiError(503, message, "unavailable", retry=True)
        log.error("%s: the engine failed after %d tokens: %r", rid, end.tokens, err)
        return _ApiError(500, f"the engine failed, no text: {type(err).__name__}", "server_error")

    def _ended(rid: str, policy: str, end: End, note: dict[str, Any]) -> None:
        """An answer that ended (the access log says how); an abort's rule goes to this log."""
        note.update(finish_reason=end.finish, completion_tokens=end.tokens, healed=end.healed)
        if end.finish == "content_filter":
            log.warning("%s: the guard ended the answer after %d tokens (policy %s): %s", rid, end.tokens, policy, end.error)

    def _fse(end: End, policy: str) -> dict[str, Any]:
        info: dict[str, Any] = {"healed_tokens": end.healed, "policy": policy, "lane": engine.lane}
        if end.receipt is not None:
            r = end.receipt
            info["receipt"] = {"session_id": r.session_id, "steps": r.steps, "healed": r.healed, "chain_hash": r.chain_hash.hex()}
        if end.finish == "content_filter":
            info["abort"] = str(end.error) if settings.expose_reasons else CLIENT_ABORT
        return info

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with this server's own bounds (the operator's --max-tokens and
        policies, the model, its vocabulary) and without the 422 FastAPI lists for every body:
        this server answers 400."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for item in doc.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for name in ("CompletionRequest", "ChatRequest"):
                props = schemas[name]["properties"]
                for limit in ("max_tokens", "max_completion_tokens"):
                    if limit in props:
                        _bound_integers(props[limit], settings.max_tokens)
                if "prompt" in props:
                    _bound_integers(props["prompt"], engine.n_vocab - 1)  # token ids
                props["policy"]["anyOf"] = [{"type": "string", "enum": sorted(settings.policies)}, {"type": "null"}]
                props["model"]["anyOf"] = [{"type": "string", "enum": [model_id]}, {"type": "null"}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _bound_integers(schema: dict[str, Any], maximum: int) -> None:
    """Give every integer in a property's JSON schema (through anyOf and array items) a maximum."""
    if schema.get("type") == "integer":
        schema["maximum"] = min(maximum, schema.get("maximum", maximum))
    for sub in [*schema.get("anyOf", ()), *([schema["items"]] if isinstance(schema.get("items"), dict) else [])]:
        _bound_integers(sub, maximum)


def _usage(end: End) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.tokens, "total_tokens": end.prompt_tokens + end.tokens}


async def _disconnected(request: Any) -> None:
    """Returns when the client goes away (the body was read already: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(events: asyncio.Queue[Event], deadline: float, gone: asyncio.Future[None]) -> Event | None:
    """The job's next event; None when the client went away first; TimeoutError at the deadline."""
    get: asyncio.Future[Any] = asyncio.ensure_future(events.get())
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.wait([get, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    return get.result() if get.done() and not get.cancelled() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fse-engine-llama", description=__doc__.split("\n\n")[0])
    add_version_flag(p, "fse-engine-llama")
    p.add_argument("--listen", default="0.0.0.0:8080", help="host:port for the HTTP API (default 0.0.0.0:8080)")
    p.add_argument(
        "--sidecar", default=os.environ.get("FSE_SIDECAR"), help="the sidecar's target (env FSE_SIDECAR), unix:/path.sock"
    )
    p.add_argument(
        "--public-key",
        action="append",
        default=None,
        help="a key that verifies verdicts (env FSE_PUBLIC_KEY; repeat during a key rotation)",
    )
    p.add_argument("--model", type=Path, help="GGUF file (default: the embedded SmolLM2-135M)")
    p.add_argument("--served-model-name", help="the model's id in the API (default: the GGUF's file name)")
    p.add_argument("--chat-template", type=Path, help="a Jinja2 chat template (default: the GGUF's tokenizer.chat_template)")
    p.add_argument("--n-ctx", type=int, default=0, help="context length in tokens (default 0: the model's own)")
    p.add_argument("--lane", choices=["grpc", "shm"], default="grpc", help="verdict lane (shm: the fast lane)")
    p.add_argument("--n-threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument(
        "--omp-wait",
        choices=list(omp.POLICIES),
        default=os.environ.get("FSE_OMP_WAIT", omp.DEFAULT),
        help="how llama.cpp's OpenMP workers wait (env FSE_OMP_WAIT; bounded: a short spin, then sleep; "
        "OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the operator win)",
    )
    p.add_argument(
        "--policy", default=os.environ.get("FSE_POLICY"), help="the policy of a request that names none (env FSE_POLICY; default)"
    )
    p.add_argument(
        "--policies",
        default=os.environ.get("FSE_POLICIES"),
        help="comma-separated policies a request may name besides the default (env FSE_POLICIES)",
    )
    p.add_argument("--expose-guard-reasons", action="store_true", help="tell clients why the guard ended an answer")
    p.add_argument("--max-tokens", type=int, default=512, help="the most tokens a request may ask for, and chat's default")
    p.add_argument("--queue", type=int, default=16, help="requests waiting beyond the one running; more get 429")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may wait and run")
    p.add_argument("--io-timeout", type=float, default=10.0, help="seconds to receive a request's headers, and its body")
    p.add_argument("--max-body", type=int, default=1 << 20, help="the largest request body in bytes (more: 413)")
    p.add_argument("--max-connections", type=int, default=64, help="open connections at once; more are answered 503")
    p.add_argument(
        "--log-format",
        choices=list(LOG_FORMATS),
        default=os.environ.get("FSE_LOG_FORMAT", "text"),
        help="text, or json: one object per line (env FSE_LOG_FORMAT)",
    )
    p.add_argument("--log-level", choices=list(LOG_LEVELS), default="info", help="default info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_format not in LOG_FORMATS:  # from the environment, which argparse does not check
        print(f"fse-engine-llama: error: FSE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}", file=sys.stderr)
        return 2
    logs.configure(args.log_level, args.log_format)
    keys = args.public_key or ([os.environ["FSE_PUBLIC_KEY"]] if os.environ.get("FSE_PUBLIC_KEY") else [])
    try:
        if not args.sidecar:
            raise ConfigError("--sidecar (or FSE_SIDECAR) is required: the sidecar's unix:/path.sock")
        if not keys:
            raise ConfigError("--public-key (or FSE_PUBLIC_KEY) is required: verdicts are verified here")
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f'--listen must be "host:port", got {args.listen!r}')
        for name in ("io_timeout", "request_timeout"):
            if getattr(args, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("max_tokens", "queue", "n_threads", "max_connections", "max_body"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if args.n_ctx < 0:
            raise ConfigError("--n-ctx must be >= 0 (0: the model's own)")
        default_policy, allowed = operator_policies(args.policy, args.policies)
        settings = Settings(
            max_tokens=args.max_tokens,
            request_timeout=args.request_timeout,
            default_policy=default_policy,
            policies=allowed,
            expose_reasons=args.expose_guard_reasons,
            served_model=args.served_model_name,
        )
        omp_wait = omp.apply_wait_policy(args.omp_wait)  # before llama_cpp loads libgomp
        target = args.sidecar.replace("unix://", "unix:", 1)
        client = GuardClient(target, keys)
        from .chat_template import ChatTemplate
        from .llama_cpp import load_llama

        llama = load_llama(args.model, n_threads=args.n_threads, n_ctx=args.n_ctx)
        template = ChatTemplate.of(llama, args.chat_template)
        engine = Engine(llama, client, args.lane, args.queue)
    except (FseError, OSError, ValueError) as exc:
        print(f"fse-engine-llama: error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .asgi import AccessLog
    from .http_limits import BodyLimits, timed_h11

    app = AccessLog(BodyLimits(create_app(engine, template, settings), args.max_body, args.io_timeout), access)
    config = uvicorn.Config(
        app,
        host=host,
        port=int(port),
        http=timed_h11(args.io_timeout, args.max_connections),
        backlog=2048,  # a burst of connections waits in the kernel, not reset
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,  # SIGTERM: finish the answers being streamed, up to 30 s
        lifespan="off",
        log_config=None,
        access_log=False,  # AccessLog's line has the latency and the finish reason
        server_header=False,
    )
    try:  # the engine serves anyway (a pod's sidecar may start later); what is wrong is said first
        client.check_usable(timeout=2.0)
    except GuardError as exc:
        log.warning(
            "the sidecar is not usable yet: %s. Until it is, /healthz and every request answer 503", exc,
            extra=logs.fields(event="sidecar_unusable", sidecar=target),
        )  # fmt: skip
    log.info(
        "fse-engine-llama serving %s on %s:%s",
        settings.served_model or engine.model, host, port,
        extra=logs.fields(
            event="started", version=__version__, pid=os.getpid(), model=settings.served_model or engine.model,
            listen=f"{host}:{port}", sidecar=target, lane=args.lane, n_ctx=engine.n_ctx, chat_template=template.source,
            omp_wait=omp_wait, policies=sorted(settings.policies), default_policy=settings.default_policy,
        ),
    )  # fmt: skip
    started = time.monotonic()
    # uvicorn re-raises the signal that stopped it once it has; by then the answers in flight
    # are done, and what is left is this process's own clean-up (below), then exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.close()
        client.close()
        log.info("fse-engine-llama stopped", extra=logs.fields(event="stopped", uptime_s=round(time.monotonic() - started, 1)))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
