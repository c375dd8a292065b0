"""``fse-engine-llama``: a guarded llama.cpp engine behind a small HTTP completions API.

The engine container of the Kubernetes example (deploy/): every token it returns was
proposed, judged and signed by the fse sidecar beside it and verified here. One worker
thread owns the model (llama.cpp must be driven from one thread, see ``load_llama``) and
serves requests one at a time from a bounded queue; a full queue answers 503 at once.

``POST /v1/completions`` takes a subset of the OpenAI completions request (``prompt``,
``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, plus ``policy``
and ``chat``) and answers ``choices[0].text`` with ``finish_reason`` ``stop``, ``length``
or ``content_filter`` (the guard aborted the sequence: the text is what it had verified).
No verdict (sidecar down, a verdict that fails verification) answers 503 with no text:
fail closed. ``GET /healthz`` is 200 while the sidecar says SERVING and signs with a key
this engine trusts (503 naming the key otherwise: every request would fail).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.bounded_http import BoundedThreadingMixIn
from sidecar.core.sampling import SamplingParams
from sidecar.errors import ConfigError, FseError, GuardAbort, StepRefused

from .client import GuardClient
from .llama_cpp import CHAT

log = logging.getLogger("fse.engine.llama")

MAX_BODY = 1 << 20
# control characters (and DEL) of a request line as escapes in the log: a client cannot forge log lines
_LOG_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
FIELDS = {"prompt", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "policy", "chat", "model"}


class BadRequest(ValueError):
    """A request the API refuses: the message names the field."""


@dataclass(frozen=True, slots=True)
class Completion:
    prompt: str
    max_tokens: int
    sampling: SamplingParams
    policy: str
    chat: bool


def _number(body: dict[str, Any], name: str, default: float, kind: type) -> Any:
    v = body.get(name, default)
    # bool is an int in Python; JSON true is not a number
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}")
    return kind(v)


def parse_completion(raw: bytes, max_tokens_limit: int) -> Completion:
    """The request body, checked; raises BadRequest naming the first wrong field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)[:120]}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\\ud800" in the JSON)
        raise BadRequest(f"prompt is not valid Unicode: {exc.reason} at character {exc.start}") from None
    max_tokens = _number(body, "max_tokens", min(64, max_tokens_limit), int)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise BadRequest(f"max_tokens must be in [1, {max_tokens_limit}], got {max_tokens}")
    policy = body.get("policy", "")
    if not isinstance(policy, str) or len(policy) > 128:
        raise BadRequest(f"policy must be a policy's name (a string of at most 128 characters), got {json.dumps(policy)[:80]}")
    chat = body.get("chat", True)
    if not isinstance(chat, bool):
        raise BadRequest("chat must be true or false")
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 0.7, float),
            top_k=_number(body, "top_k", 40, int),
            top_p=_number(body, "top_p", 0.95, float),
            min_p=_number(body, "min_p", 0.0, float),
            # none given: a random one (as OpenAI and the vLLM adapter do), in the audit's
            # genesis for replay; a fixed default would draw every unseeded request's token
            # at a step from the same uniform number
            seed=_number(body, "seed", secrets.randbits(63), int),
        )
    except ConfigError as exc:
        raise BadRequest(str(exc).removeprefix("sampling.")) from None
    return Completion(prompt, max_tokens, sampling, policy, chat)


def _refused_at_open(done: Any, code: str) -> bool:
    return isinstance(done.error, StepRefused) and done.error.code == code and not done.tokens


class Engine:
    """The model and its guard, owned by one worker thread."""

    def __init__(self, llama: Any, client: GuardClient, lane: str, queue_size: int) -> None:
        self.llama = llama
        self.client = client
        self.lane = lane
        self.model = Path(getattr(llama, "model_path", "model")).name
        self.requests: queue.Queue[tuple[Completion, Future[dict[str, Any]]] | None] = queue.Queue(queue_size)
        self._guarded: Any = None
        self._ready_lock = threading.Lock()
        self._ready_at = -1e9
        self._worker = threading.Thread(target=self._run, name="fse-engine", daemon=True)
        self._worker.start()

    def ready(self) -> None:
        """Raises unless the sidecar serves (asked each time) and signs with a trusted key
        (asked at most once a second: a flood of probes costs one registration a second)."""
        with self._ready_lock:
            if time.monotonic() - self._ready_at > 1.0:
                self.client.check_usable(timeout=1.0)  # SERVING, and a trusted key
                self._ready_at = time.monotonic()
                return
        self.client.wait_ready(timeout=1.0)

    def submit(self, req: Completion) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        self.requests.put_nowait((req, fut))  # queue.Full: the caller answers 503
        return fut

    def close(self) -> None:
        self.requests.put(None)
        self._worker.join(30)

    def _run(self) -> None:
        while (item := self.requests.get()) is not None:
            req, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if self._guarded is None:  # first use, or after a failure
                    self._renew()
                fut.set_result(self._complete(req))
            except BaseException as exc:  # noqa: BLE001 - the request thread answers for it
                if not isinstance(exc, (GuardAbort, BadRequest)) and self._guarded is not None:
                    self._guarded.close()
                    self._guarded = None
                fut.set_exception(exc)
        if self._guarded is not None:
            self._guarded.close()

    def _renew(self) -> None:
        """A new GuardedLlama: the vocabulary registered again."""
        from .llama_cpp import GuardedLlama

        if self._guarded is not None:
            self._guarded.close()
            self._guarded = None
        self.client.wait_ready(timeout=5.0)
        self._guarded = GuardedLlama(self.llama, self.client, lane=self.lane)

    def _complete(self, req: Completion) -> dict[str, Any]:
        prompt = CHAT.format(req.prompt) if req.chat else req.prompt
        ids = self.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if len(ids) + req.max_tokens > self.llama.n_ctx():
            raise BadRequest(
                f"the prompt is {len(ids)} tokens: with max_tokens {req.max_tokens} it exceeds the context of "
                f"{self.llama.n_ctx()} tokens"
            )
        done = self._guarded.complete(ids, max_tokens=req.max_tokens, sampling=req.sampling, policy=req.policy)
        if _refused_at_open(done, "NOT_FOUND"):
            # an unknown vocabulary (the sidecar restarted and forgot it) or an unknown policy:
            # register again and try once more; still NOT_FOUND, it is the request's policy
            self._renew()
            done = self._guarded.complete(ids, max_tokens=req.max_tokens, sampling=req.sampling, policy=req.policy)
            if _refused_at_open(done, "NOT_FOUND"):
                raise BadRequest(str(done.error))
        if _refused_at_open(done, "INVALID_ARGUMENT"):
            raise BadRequest(str(done.error))  # OpenSession refused what the request asked for
        if done.error is not None and not isinstance(done.error, GuardAbort):
            raise done.error
        healed = sum(1 for t in done.tokens if t.verdict.decision == pb.DECISION_HEALED)
        finish = "content_filter" if done.error else ("length" if len(done.tokens) >= req.max_tokens else "stop")
        fse: dict[str, Any] = {"healed_tokens": healed, "lane": self.lane}
        if done.error is not None:
            fse["abort"] = str(done.error)
        if done.receipt is not None:
            r = done.receipt
            fse["receipt"] = {"session_id": r.session_id, "steps": r.steps, "chain_hash": r.chain_hash.hex()}
        return {
            "object": "text_completion",
            "model": self.model,
            "choices": [{"index": 0, "text": done.text, "finish_reason": finish}],
            "usage": {"completion_tokens": len(done.tokens)},
            "fse": fse,
        }


class GuardedHTTPServer(BoundedThreadingMixIn, HTTPServer):
    """A thread per connection, at most ``max_connections`` of them (more are answered 503
    and closed at once), with a listen backlog that takes a burst without resets."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self.bound(max_connections)
        super().__init__(address, handler)


def make_handler(
    engine: Engine, max_tokens_limit: int, request_timeout: float, io_timeout: float = 10.0
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fse-engine-llama"
        # each read of the request line, headers and body: a client that stops sending is cut off
        timeout = io_timeout

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            # the request line is the client's bytes: control characters are escaped, never logged raw
            log.info("%s %s", self.address_string(), (format % args).translate(_LOG_ESCAPES))

        def _read_body(self, length: int) -> bytes | None:
            """The body, or None when the client sends it slower than ``io_timeout`` in all."""
            deadline, parts, left = time.monotonic() + io_timeout, [], length
            while left:
                if time.monotonic() > deadline:
                    return None
                try:
                    chunk = self.rfile.read1(min(left, 1 << 16))
                except (TimeoutError, OSError):
                    return None
                if not chunk:
                    return None
                parts.append(chunk)
                left -= len(chunk)
            return b"".join(parts)

        def _answer(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._answer(status, {"error": {"message": message, "code": status.value}})

        def do_GET(self) -> None:
            if self.path != "/healthz":
                return self._error(HTTPStatus.NOT_FOUND, f"no such path: {self.path[:80]}")
            try:
                engine.ready()
            except FseError as exc:
                return self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
            self._answer(HTTPStatus.OK, {"status": "serving", "model": engine.model, "lane": engine.lane})

        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                return self._error(HTTPStatus.NOT_FOUND, f"no such path: {self.path[:80]}")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            if not 0 <= length <= MAX_BODY:
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY} bytes")
            raw = self._read_body(length)
            if raw is None:
                self.close_connection = True
                return self._error(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {io_timeout:.0f} s")
            try:
                req = parse_completion(raw, max_tokens_limit)
            except BadRequest as exc:
                return self._error(HTTPStatus.BAD_REQUEST, str(exc))
            try:
                fut = engine.submit(req)
            except queue.Full:
                return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the engine is busy: its queue is full")
            try:
                self._answer(HTTPStatus.OK, fut.result(timeout=request_timeout))
            except TimeoutError:
                fut.cancel()
                self._error(HTTPStatus.GATEWAY_TIMEOUT, f"no completion within {request_timeout:.0f} s")
            except BadRequest as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
            except FseError as exc:  # no verdict: nothing is returned (fail closed)
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"guard unavailable, no tokens: {exc}")
            except Exception as exc:  # noqa: BLE001 - any other failure still answers, with no text
                log.exception("completion failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the engine failed, no tokens: {type(exc).__name__}")

    return Handler


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fse-engine-llama", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--lane", choices=["grpc", "shm"], default="grpc", help="verdict lane (shm: the fast lane)")
    p.add_argument("--n-threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
    p.add_argument("--queue", type=int, default=16, help="requests waiting beyond the one running; more get 503")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may wait and run")
    p.add_argument(
        "--io-timeout", type=float, default=10.0, help="seconds to receive a request's headers (each read) and its whole body"
    )
    p.add_argument("--max-connections", type=int, default=64, help="open connections at once; more are answered 503")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keys = args.public_key or ([os.environ["FSE_PUBLIC_KEY"]] if os.environ.get("FSE_PUBLIC_KEY") else [])
    try:
        if not args.sidecar:
            raise ConfigError("--sidecar (or FSE_SIDECAR) is required: the sidecar's unix:/path.sock")
        if not keys:
            raise ConfigError("--public-key (or FSE_PUBLIC_KEY) is required: verdicts are verified here")
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f'--listen must be "host:port", got {args.listen!r}')
        if args.io_timeout <= 0:
            raise ConfigError("--io-timeout must be > 0")
        for name in ("max_tokens", "queue", "n_threads", "max_connections"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        target = args.sidecar.replace("unix://", "unix:", 1)
        client = GuardClient(target, keys)
        from .llama_cpp import load_llama

        engine = Engine(load_llama(args.model, n_threads=args.n_threads), client, args.lane, args.queue)
        handler = make_handler(engine, args.max_tokens, args.request_timeout, args.io_timeout)
        httpd = GuardedHTTPServer((host, int(port)), handler, args.max_connections)
    except (FseError, OSError) as exc:
        print(f"fse-engine-llama: error: {exc}", file=sys.stderr)
        return 2
    log.info("fse-engine-llama serving on %s:%d (sidecar %s, lane %s)", host, httpd.server_port, target, args.lane)
    # SIGTERM (the kubelet stopping the pod): stop taking requests, finish the one running
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine.close()
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
