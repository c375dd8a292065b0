"""gRPC shell around :class:`GuardService`: fse.v1.GuardService plus grpc.health.v1.

The per-step work runs on the event loop, not in a thread pool. Measured here (49k ids):
the metrics take ~60 µs inline and ~100 µs through ``run_in_executor`` (the hop alone is
~30-40 µs), and the GIL lets another session's Python work overlap only inside numpy
kernels; a hop would cost every step more than it could save the others. Revisit for
128k+ vocabularies with many concurrent sessions (``fse-sidecar bench`` has the figures).

What a client sends is bounded per RPC and refused before it is parsed
(:func:`message_limits`); requests over 1 MiB (a big vocabulary, a long prompt) are
parsed and converted in a worker thread, so the loop keeps stepping the other sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from . import accel
from ._pb.fse.v1 import guard_pb2 as pb
from ._version import __version__
from .config import SidecarConfig
from .core.session import SESSION_ID
from .core.vocab import Vocabulary
from .errors import (
    ConfigError,
    FseError,
    InvalidSessionId,
    LaneUnavailable,
    ListenError,
    MalformedMessage,
    MessageTooLarge,
    VocabularyError,
    shown,
)
from .exporter import Exporter, serve_metrics
from .lane import LaneServer
from .logs import fields
from .reload import PolicyReloader
from .service import GuardService, Judged, VerdictFields, session_opened
from .signing import Signer
from .wire import count_field_upto, reason

log = logging.getLogger("fse.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GuardService"].full_name
# Seconds in-flight RPCs get to finish on SIGTERM (a pod's terminationGracePeriodSeconds
# must exceed it plus the engine's own drain: deploy/).
DRAIN_GRACE_S = 2.0
MAX_SEND = 4 * 1024 * 1024  # answers are small: verdicts, digests, receipts
_M = TypeVar("_M", bound=Message)


def _code(exc: FseError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


def _checked_id(session_id: str) -> str:
    """``session_id`` if well formed; else a SessionError that names the rule, not the id.

    Validated here, at the edge, before anything logs or echoes it: a newline in an id
    would forge a log line, and a 4 MB id echoed in an error's details turns every refusal
    into RESOURCE_EXHAUSTED on the trailing metadata.
    """
    if SESSION_ID.fullmatch(session_id):
        return session_id
    raise InvalidSessionId(f"session_id must match {SESSION_ID.pattern} (got {len(session_id.encode())} bytes)")


def answer_step(service: GuardService, req: pb.StepRequest, metrics: Exporter | None = None) -> pb.StepResponse:
    """A step's answer on either lane: its verdict, or the error that refused it. The
    verdict is noted in ``metrics``; the lane flushes them once the answer has left."""
    t0 = time.perf_counter()
    try:
        _checked_id(req.session_id)
        v = service.step(req)
    except FseError as exc:
        sid = req.session_id if SESSION_ID.fullmatch(req.session_id) else ""  # echoed back only when well formed
        log.debug("step %s/%d refused: %s", shown(req.session_id), req.step, exc)
        return refusal(exc, metrics, sid, req.step)
    if metrics is not None:
        metrics.note_verdict(req.session_id, v, time.perf_counter() - t0)
    if v.decision == pb.DECISION_ABORT:
        log_abort(v)
    return pb.StepResponse(verdict=v)


def log_abort(v: pb.Verdict) -> None:
    """One INFO line per ABORT: the session, the step and what tripped (codes and actions
    only: a reason's detail may quote generated text)."""
    trips = [{"code": r.code, "action": pb.Action.Name(r.action).removeprefix("ACTION_").lower()} for r in v.reasons]
    log.info(
        "session aborted at step %d by %s",
        v.step,
        ", ".join(t["code"] for t in trips) or "no reason",
        extra=fields(event="abort", session=v.session_id, step=v.step, trips=trips),
    )


def answer_batch(
    service: GuardService, reqs: Sequence[pb.StepRequest], metrics: Exporter | None = None, seal: bool = False
) -> pb.StepBatchResponse:
    """A batch's answers, one per row in order (each a verdict or that row's error);
    ``seal``: one signature over all of them instead of one a verdict."""
    t0 = time.perf_counter()
    if len(reqs) > service.config.max_batch_rows:
        exc = MessageTooLarge(f"a batch of {len(reqs)} rows exceeds max_batch_rows ({service.config.max_batch_rows})")
        return pb.StepBatchResponse(responses=[refusal(exc, metrics) for _ in reqs])
    well_formed = [SESSION_ID.fullmatch(r.session_id) is not None for r in reqs]
    answers: list[Judged | FseError]
    if all(well_formed):  # the common batch
        answers = service.step_batch(reqs, sealed=seal)
    else:  # a malformed id is that row's refusal, never echoed nor looked up
        judged = iter(service.step_batch([r for r, ok in zip(reqs, well_formed, strict=True) if ok], sealed=seal))
        answers = [next(judged) if ok else _malformed_id(r.session_id) for r, ok in zip(reqs, well_formed, strict=True)]
    responses: list[pb.StepResponse | dict[str, VerdictFields]] = []
    digests: list[bytes | None] = []
    for req, a, ok in zip(reqs, answers, well_formed, strict=True):
        if isinstance(a, Judged):
            responses.append({"verdict": a.fields})
            digests.append(a.digest)
        else:
            responses.append(refusal(a, metrics, req.session_id if ok else "", req.step))
            digests.append(None)
    out = pb.StepBatchResponse(responses=responses)  # every verdict built in place: no copies
    if seal and len(digests) > digests.count(None):
        out.seal.CopyFrom(service.signer.seal_rows(digests))
    each = (time.perf_counter() - t0) / max(len(reqs), 1)
    for req, a, r in zip(reqs, answers, out.responses, strict=True):
        if isinstance(a, Judged):
            if metrics is not None:
                metrics.note_verdict(req.session_id, r.verdict, each)
            if a.fields["decision"] == pb.DECISION_ABORT:
                log_abort(r.verdict)
    return out


def _malformed_id(session_id: str) -> FseError:
    try:
        _checked_id(session_id)
    except FseError as exc:
        return exc
    raise AssertionError("a session id that matches SESSION_ID was taken for malformed")  # pragma: no cover


def refusal(exc: FseError, metrics: Exporter | None, session_id: str = "", step: int = 0) -> pb.StepResponse:
    """A step answered with the error that refused it (counted by status code)."""
    code = _code(exc).value[0]
    if metrics is not None:
        metrics.step_refused(code)
    return pb.StepResponse(error=pb.StepError(session_id=session_id, step=step, code=code, message=str(exc)))


_SLACK = 64 * 1024  # ids, names, sampling parameters: everything but the bulk field
BATCH_ROW_BYTES = 4096  # a batch row's allowance: a ring reference, or a COMPACT row of k <= ~450
OFFLOAD_BYTES = 1 << 20  # requests bigger than this are parsed in a worker thread


def message_limits(config: SidecarConfig) -> dict[str, tuple[int, str]]:
    """Per RPC: the largest request accepted and the rule it follows from.

    A request over its limit is refused (RESOURCE_EXHAUSTED, naming the limit) before it
    is parsed; gRPC's own cap, the largest of these, refuses bigger ones before they are
    even buffered.
    """
    step = (_SLACK + 4 * config.max_vocab_size, "4 bytes x max_vocab_size + 64 KiB: one inline f32 row")
    batch = (
        step[0] + BATCH_ROW_BYTES * config.max_batch_rows,
        "one inline f32 row + 4 KiB x max_batch_rows (ring references and COMPACT rows)",
    )
    return {
        "RegisterVocabulary": (config.max_vocab_bytes, "max_vocab_bytes"),
        "OpenSession": (_SLACK + 5 * config.max_prompt_tokens, "5 bytes x max_prompt_tokens + 64 KiB"),
        "Step": step,
        "Steps": batch,
        "StepBatch": batch,
        "Echo": step,
        "CloseSession": (_SLACK, "64 KiB"),
        "ReloadPolicy": (_SLACK, "64 KiB"),
    }


def _client(context: grpc.aio.ServicerContext) -> str | None:
    """Who opens a session, for max_sessions_per_client: the client certificate under mTLS
    (its SHA-256, so certificates sharing a common name, or with none, as SPIFFE's URI-SAN
    ones, are told apart), else the TCP connection; None on a Unix socket (gRPC shows every
    Unix client as the same peer, so only max_sessions bounds them there)."""
    auth = context.auth_context()
    certs = auth.get("x509_pem_cert")
    if certs:
        names = _certificate_names(auth) or ["?"]
        return f"x509:{hashlib.sha256(certs[0]).hexdigest()[:32]}:{names[0]}"
    peer = context.peer()
    return peer if peer.startswith(("ipv4:", "ipv6:")) else None


def _certificate_names(auth: dict[str, list[bytes]]) -> list[str]:
    """The client certificate's common names, then its subject alternative names (a
    SPIFFE id among them); empty without a client certificate."""
    return [n.decode(errors="replace") for k in ("x509_common_name", "x509_subject_alternative_name") for n in auth.get(k, [])]


def _reload_refusal(config: SidecarConfig, context: grpc.aio.ServicerContext) -> str:
    """'' when this caller may ask for a reload (allow_reload_rpc, reload_identities)."""
    if not config.allow_reload_rpc:
        return "ReloadPolicy is off on this sidecar (allow_reload_rpc: false): reload with SIGHUP or watch_config_s"
    if config.reload_identities is None:
        return ""
    names = set(_certificate_names(context.auth_context()))
    if names & set(config.reload_identities):
        return ""
    shown_names = ", ".join(sorted(names))[:200] or "no client certificate"
    return f"ReloadPolicy is allowed to reload_identities only; this client is {shown_names}"


def _identity(raw: bytes) -> bytes:
    return raw


class GuardServicer:
    """fse.v1.GuardService over raw request bytes: each RPC checks its own size limit
    before parsing, and parses big requests off the event loop."""

    def __init__(
        self, service: GuardService, reloader: PolicyReloader, lanes: LaneServer | None = None, metrics: Exporter | None = None
    ) -> None:
        self.service = service
        self.reloader = reloader
        self.lanes = lanes
        self.metrics = metrics
        self.limits = message_limits(service.config)
        self._vocab_builds = asyncio.Semaphore(1)

    def _check_size(self, method: str, raw: bytes) -> None:
        limit, rule = self.limits[method]
        if len(raw) > limit:
            raise MessageTooLarge(f"{method}: a request of {len(raw)} bytes exceeds its limit of {limit} bytes ({rule})")

    @staticmethod
    def _parse(message: type[_M], raw: bytes) -> _M:
        try:
            return message.FromString(raw)
        except DecodeError:
            raise MalformedMessage(f"the request does not parse as {message.DESCRIPTOR.full_name}") from None

    async def _request(self, method: str, message: type[_M], raw: bytes) -> _M:
        self._check_size(method, raw)
        if len(raw) > OFFLOAD_BYTES:
            return await asyncio.to_thread(self._parse, message, raw)
        return self._parse(message, raw)

    async def RegisterVocabulary(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.RegisterVocabularyResponse:
        max_size = self.service.config.max_vocab_size

        def build() -> Vocabulary:  # count, parse, size, copy and hash: seconds for a 1M-token vocabulary
            # Counted before parsing: a parse holds the GIL for the whole message (1.4 s for
            # 10M one-byte tokens, all of it time the event loop cannot answer anyone).
            # Every token starts with its tag byte 0x0a: fewer of those than the limit needs no walk.
            field = pb.RegisterVocabularyRequest.TOKENS_FIELD_NUMBER
            if raw.count(b"\x0a") > max_size and count_field_upto(raw, field, max_size) > max_size:
                raise VocabularyError(
                    f"vocabulary of more than {max_size} tokens exceeds max_vocab_size {max_size}; refused unparsed"
                )
            return Vocabulary.build(self._parse(pb.RegisterVocabularyRequest, raw).tokens, max_size)

        try:
            self._check_size("RegisterVocabulary", raw)
            if len(raw) > OFFLOAD_BYTES:
                async with self._vocab_builds:  # one at a time: four at once starve the loop of the GIL
                    vocab = await asyncio.to_thread(build)
            else:
                vocab = build()
            v = self.service.add_vocabulary(vocab)
        except FseError as exc:
            await context.abort(_code(exc), str(exc))
        return pb.RegisterVocabularyResponse(vocab_digest=v.digest, vocab_size=v.size, key_id=self.service.signer.key_id)

    async def OpenSession(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.OpenSessionResponse:
        def parse() -> tuple[pb.OpenSessionRequest, np.ndarray]:
            req = self._parse(pb.OpenSessionRequest, raw)
            return req, np.asarray(req.prompt_token_ids, dtype=np.int64)

        try:
            self._check_size("OpenSession", raw)
            request, ids = await asyncio.to_thread(parse) if len(raw) > OFFLOAD_BYTES else parse()
            if request.session_id:
                _checked_id(request.session_id)
            if request.fast_lane and self.lanes is None:
                raise LaneUnavailable("this sidecar serves no fast lane (lane.enabled, and a Unix socket)")
            s = self.service.open_session(request, client=_client(context), prompt_ids=ids)
        except FseError as exc:
            await context.abort(_code(exc), str(exc))
        # Session ids at DEBUG only: with the secret they are what steps a session.
        log.debug("session %s opened (tag %d, ring %s)", s.session_id, s.tag, shown(s.ring_name))
        opened = session_opened(s, self.service.signer.key_id)
        if self.metrics is not None:
            self.metrics.session_opened(s.session_id)
        if request.fast_lane and self.lanes is not None:
            opened.lane_socket = str(self.lanes.path)
            opened.lane_token = self.lanes.token_for(s.session_id)
        return opened

    async def CloseSession(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.CloseSessionResponse:
        try:
            request = await self._request("CloseSession", pb.CloseSessionRequest, raw)
            closed = self.service.close_session(_checked_id(request.session_id), request.session_secret)
        except FseError as exc:
            await context.abort(_code(exc), str(exc))
        s = closed.session
        if closed.audit is not None:
            await asyncio.to_thread(closed.audit.close)  # durable before the receipt is handed out
        log.debug("session %s closed after %d steps", s.session_id, s.next_step)
        final = [] if s.aborted else s.finish()
        return pb.CloseSessionResponse(
            steps=s.next_step, chain_hash=s.chain_hash, final_hits=[reason(t) for t in final], receipt=closed.receipt
        )

    async def ReloadPolicy(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ReloadPolicyResponse:
        why = _reload_refusal(self.service.config, context)
        if why:
            log.warning("ReloadPolicy refused: %s", why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        try:
            await self._request("ReloadPolicy", pb.ReloadPolicyRequest, raw)
            digests = await self.reloader.reload()
        except FseError as exc:
            missing = self.reloader.config_path is None and not isinstance(exc, (MessageTooLarge, MalformedMessage))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION if missing else _code(exc), str(exc))
        return pb.ReloadPolicyResponse(policy_digests=digests)

    async def Step(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.StepResponse:
        return await self._step_raw("Step", raw)

    async def Steps(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepsResponse]:
        async for raw in request_iterator:
            try:
                item = await self._request("Steps", pb.StepsRequest, raw)
            except FseError as exc:  # nothing of the request is known: answer on the stream, keep it open
                yield pb.StepsResponse(response=self._refused(exc))
                continue
            if item.HasField("batch"):
                yield pb.StepsResponse(batch=answer_batch(self.service, item.batch.steps, self.metrics, item.batch.seal))
            else:
                yield pb.StepsResponse(response=self._step(item.request))
            if self.metrics is not None:
                self.metrics.flush()  # after the answer left

    async def _step_raw(self, method: str, raw: bytes) -> pb.StepResponse:
        try:
            req = await self._request(method, pb.StepRequest, raw)
        except FseError as exc:
            return self._refused(exc)
        resp = self._step(req)
        if self.metrics is not None:
            asyncio.get_running_loop().call_soon(self.metrics.flush)
        return resp

    async def StepBatch(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.StepBatchResponse:
        try:
            req = await self._request("StepBatch", pb.StepBatchRequest, raw)
        except FseError as exc:  # not even the rows are known: the call fails with the reason
            await context.abort(_code(exc), str(exc))
        resp = answer_batch(self.service, req.steps, self.metrics, req.seal)
        if self.metrics is not None:
            asyncio.get_running_loop().call_soon(self.metrics.flush)
        return resp

    def _step(self, req: pb.StepRequest) -> pb.StepResponse:
        return answer_step(self.service, req, self.metrics)

    def _refused(self, exc: FseError) -> pb.StepResponse:
        """The answer to a step request that could not even be parsed: nothing of it is known."""
        return refusal(exc, self.metrics)

    async def Echo(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EchoResponse]:
        async for raw in request_iterator:
            try:
                yield pb.EchoResponse(payload=(await self._request("Echo", pb.EchoRequest, raw)).payload)
            except FseError as exc:
                await context.abort(_code(exc), str(exc))

    def handlers(self) -> grpc.GenericRpcHandler:
        unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
        out = {
            "RegisterVocabulary": unary(self.RegisterVocabulary, _identity, pb.RegisterVocabularyResponse.SerializeToString),
            "OpenSession": unary(self.OpenSession, _identity, pb.OpenSessionResponse.SerializeToString),
            "CloseSession": unary(self.CloseSession, _identity, pb.CloseSessionResponse.SerializeToString),
            "ReloadPolicy": unary(self.ReloadPolicy, _identity, pb.ReloadPolicyResponse.SerializeToString),
            "Step": unary(self.Step, _identity, pb.StepResponse.SerializeToString),
            "StepBatch": unary(self.StepBatch, _identity, pb.StepBatchResponse.SerializeToString),
            "Steps": stream(self.Steps, _identity, pb.StepsResponse.SerializeToString),
            "Echo": stream(self.Echo, _identity, pb.EchoResponse.SerializeToString),
        }
        methods = set(pb.DESCRIPTOR.services_by_name["GuardService"].methods_by_name)
        assert set(out) == methods, f"handlers {sorted(out)} != proto methods {sorted(methods)}"
        return grpc.method_handlers_generic_handler(SERVICE_NAME, out)


def _lane_path(config: SidecarConfig) -> Path | None:
    """The fast lane's socket, beside the gRPC one: co-located engines only."""
    address = config.grpc_address()
    if not config.lane.enabled or not address.startswith("unix:"):
        return None
    return Path(address[len("unix:") :] + ".lane")


def _claim_unix_socket(path: Path) -> None:
    """Remove a stale socket left by a crashed sidecar, but never a live one."""
    if not path.exists() and not path.is_symlink():
        if not path.parent.is_dir():
            raise ListenError(f"cannot listen on {path}: directory {path.parent} does not exist")
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ListenError(f"cannot listen on {path}: it exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # nobody is listening: stale
            return
        except OSError as exc:
            raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    raise ListenError(f"another process is already listening on {path}")


def _server_credentials(config: SidecarConfig) -> grpc.ServerCredentials:
    """mTLS: the sidecar's pair, and the CA its clients' certificates must chain to."""
    tls = config.tls
    assert tls is not None
    files = {}
    for field in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, field)
        try:
            files[field] = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"tls.{field}: cannot read {path}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(files["key_file"], files["cert_file"])], root_certificates=files["client_ca_file"], require_client_auth=True
    )


@contextlib.contextmanager
def _owner_only_umask() -> Iterator[None]:
    """Sockets bound inside are born owner-only: no window where the umask decides."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def _bind_lane_socket(path: Path, config: SidecarConfig) -> socket.socket:
    """The fast lane's listening socket, claimed, bound and given access as the gRPC one."""
    _claim_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _owner_only_umask():
            sock.bind(str(path))
        _set_socket_access(path, config)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on the lane socket {path}: {exc.strerror}") from None
    except ListenError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _set_socket_access(path: Path, config: SidecarConfig) -> None:
    if config.unix_socket_group is not None:
        try:
            gid = grp.getgrnam(config.unix_socket_group).gr_gid
            os.chown(path, -1, gid)
        except (KeyError, OSError) as exc:
            raise ListenError(f"unix_socket_group {config.unix_socket_group!r}: {exc}") from None
    os.chmod(path, config.unix_socket_mode)


def create_server(
    config: SidecarConfig, signer: Signer, config_path: Path | None = None, service: GuardService | None = None
) -> tuple[grpc.aio.Server, GuardService, str]:
    """A configured, not yet started server; returns (server, service, bound address).

    ``config_path`` is the file ``config`` came from: ReloadPolicy and SIGHUP read it.
    ``service``: one built by the caller (embedding, tests); else one is made here.
    """
    service = service if service is not None else GuardService(config, signer)
    server = grpc.aio.server(
        options=[
            # the largest per-RPC limit: gRPC refuses bigger requests before buffering them
            ("grpc.max_receive_message_length", max(limit for limit, _ in message_limits(config).values())),
            ("grpc.max_send_message_length", MAX_SEND),
            ("grpc.so_reuseport", 0),
        ]
    )
    reloader = PolicyReloader(service, config_path)
    lane_path = _lane_path(config)
    metrics, metrics_server = _start_metrics(config, service)
    lanes = LaneServer(service, lane_path, lambda req: answer_step(service, req, metrics)) if lane_path is not None else None
    if lanes is not None:
        service.on_drop.append(lambda sid, _why: lanes.forget(sid))
        lanes.after_answer = metrics.flush if metrics is not None else None
    server.add_generic_rpc_handlers((GuardServicer(service, reloader, lanes, metrics).handlers(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = config.grpc_address()
    sock = Path(address[len("unix:") :]) if address.startswith("unix:") else None
    if sock is not None:
        _claim_unix_socket(sock)
        with _owner_only_umask():
            port = server.add_insecure_port(address)
        if port:
            _set_socket_access(sock, config)
    elif config.tls is not None:
        port = server.add_secure_port(address, _server_credentials(config))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        if metrics_server is not None:
            metrics_server.shutdown()
        raise ListenError(f"cannot listen on {config.listen}")
    if lanes is not None:
        lanes.sock = _bind_lane_socket(lanes.path, config)
    bound = address if address.startswith("unix:") else f"{address.rpartition(':')[0]}:{port}"
    server._fse_health = health_servicer  # type: ignore[attr-defined]
    server._fse_reloader = reloader  # type: ignore[attr-defined]
    server._fse_lanes = lanes  # type: ignore[attr-defined]
    server._fse_metrics_server = metrics_server  # type: ignore[attr-defined]
    return server, service, bound


def _file_signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file is rewritten or swapped (a ConfigMap update replaces a
    symlink's target: another inode); None while it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


async def _watch_config(reloader: PolicyReloader, path: Path, period_s: float) -> None:
    """Reload the configuration file when it changes (polled: inotify does not see a
    ConfigMap's symlink swap reliably, and polling one stat is nothing), once it has stayed
    the same for a whole period: a writer that rewrites the file in place shows a valid
    prefix (the file without its rules) while it writes, which must never be loaded.
    Replace the file atomically (write another, then rename) and nothing is ever half seen."""
    seen = _file_signature(path)
    changed: tuple[int, int, int, int] | None = None
    while True:
        await asyncio.sleep(period_s)
        now = _file_signature(path)
        if now is None or now == seen:
            changed = None
            continue
        if now != changed:  # changed since the last look: a writer may still be at it
            changed = now
            continue
        seen, changed = now, None
        log.info("configuration file %s changed and is stable: reloading", path)
        await _reload_logged(reloader)


async def _start_health_port(config: SidecarConfig, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server | None:
    """grpc.health.v1 alone on ``health_listen`` (plain TCP, for the kubelet's gRPC probes)."""
    if config.health_listen is None:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(config.health_listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(f"cannot serve the health port on {config.health_listen}")
    await server.start()
    log.info("health (grpc.health.v1 only) on %s", config.health_listen.rpartition(":")[0] + f":{port}")
    return server


async def _reload_logged(reloader: PolicyReloader) -> None:
    try:
        await reloader.reload()
    except FseError:
        pass  # logged by reload; the old policies stay in force


def _start_metrics(config: SidecarConfig, service: GuardService) -> tuple[Exporter | None, WSGIServer | None]:
    """The exporter and its HTTP server (first: an address that cannot be bound stops the
    sidecar before it listens), or (None, None) without ``metrics.listen``."""
    if config.metrics.listen is None:
        return None, None
    metrics = Exporter(CollectorRegistry(), lambda: service.live_sessions)
    service.on_drop.append(metrics.session_gone)
    host, _, port = config.metrics.listen.rpartition(":")
    try:
        bound_port, _thread, http = serve_metrics(metrics.registry, host.strip("[]"), int(port))
    except OSError as exc:
        raise ListenError(f"cannot serve metrics on {config.metrics.listen}: {exc.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", host, bound_port)
    return metrics, http


async def _reap_idle_sessions(service: GuardService) -> None:
    period = min(service.config.session_idle_timeout_s / 4, 10.0)
    while True:
        await asyncio.sleep(period)
        for sid in service.reap_idle(time.monotonic()):
            log.info("a session was closed after %.0f s without a step", service.config.session_idle_timeout_s)
            log.debug("idle session closed: %s", sid)


async def serve(
    config: SidecarConfig,
    signer: Signer,
    ready: asyncio.Event | None = None,
    config_path: Path | None = None,
    service: GuardService | None = None,
) -> None:
    server, service, bound = create_server(config, signer, config_path, service)
    reloader: PolicyReloader = server._fse_reloader  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload_logged(reloader))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    hs = server._fse_health  # type: ignore[attr-defined]
    try:
        health_server = await _start_health_port(config, hs)
    except ListenError:
        metrics_http = server._fse_metrics_server  # type: ignore[attr-defined]
        if metrics_http is not None:
            metrics_http.shutdown()
        service.close()
        raise
    await server.start()
    lanes: LaneServer | None = server._fse_lanes  # type: ignore[attr-defined]
    if lanes is not None:
        lanes.start(loop)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    started = time.monotonic()
    log.info(
        "fse-sidecar serving on %s",
        bound,
        extra=fields(
            event="started",
            version=__version__,
            pid=os.getpid(),
            listen=bound,
            lane=str(lanes.path) if lanes is not None else None,
            key_id=signer.key_id,
            algorithm=signer.algorithm,
            core=accel.status().describe(),
            policies={n: p.digest[:12] for n, p in sorted(service.policies.items())},
        ),
    )
    if ready is not None:
        ready.set()
    metrics_server = server._fse_metrics_server  # type: ignore[attr-defined]
    reaper = asyncio.create_task(_reap_idle_sessions(service))
    watcher = None
    if config.watch_config_s is not None and config_path is not None:
        watcher = asyncio.create_task(_watch_config(reloader, config_path, config.watch_config_s))
    try:
        await server.wait_for_termination()
    finally:
        reaper.cancel()
        if watcher is not None:
            watcher.cancel()
        try:
            await hs.enter_graceful_shutdown()
            await server.stop(grace=DRAIN_GRACE_S)
            if health_server is not None:
                await health_server.stop(grace=None)
        finally:  # even when the stop is cut short: audit files synced, recordings flushed
            open_sessions = service.live_sessions
            if lanes is not None:
                lanes.close()
            if metrics_server is not None:
                metrics_server.shutdown()
            service.close()
            log.info(
                "fse-sidecar stopped",
                extra=fields(event="stopped", uptime_s=round(time.monotonic() - started, 1), sessions_ended=open_sessions),
            )
