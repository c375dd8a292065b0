"""vLLM under guard: one logits processor for both of vLLM's model runners (vLLM 0.32/0.33).

    fse-vllm serve MODEL [vLLM's own options]      # engine_adapters/vllm_serve.py: both pieces
    # or by hand: python -m vllm.entrypoints.openai.api_server --model MODEL \\
    #   --logits-processors engine_adapters.vllm:FseLogitsProcessor \\
    #   --middleware engine_adapters.vllm_api.FseGuardMiddleware      (with FSE_OUTCOMES_DIR set)

**The operator decides, not the client.** Where this processor is loaded, *every* request
is guarded: there is no per-request switch, and nothing a request leaves out turns the
guard off. A request may name one of the policies the operator allows
(``vllm_xargs: {"fse_policy": "strict"}``, a string as vLLM's REST typing requires);
without one it gets the operator's default. The sidecar samples with the request's own
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty`` and ``seed``
(a request without a seed gets a random one); vLLM then only ever sees one finite logit
per row, so its sampler can only pick the verdict's token.

Environment (the engine container's, deploy/): ``FSE_SIDECAR`` (``unix:///run/fse/fse.sock``),
``FSE_PUBLIC_KEY`` (the verifying key file), optional ``FSE_STEP_TIMEOUT`` (seconds, 2),
``FSE_COMPACT_K`` (largest COMPACT row, 64; 0: FULL rows only), ``FSE_POLICY`` (the
default policy, "default"), ``FSE_POLICIES`` (the policies a request may name,
comma-separated; the default alone when unset), ``FSE_REPETITION_WINDOW`` (the
repetition penalty's window, 64 tokens), ``FSE_OUTCOMES_DIR`` (where ended requests are
reported to the API server's middleware: :mod:`engine_adapters.outcomes`).

Refused at admission (``validate_params``, vLLM's 400 naming the field): anything that
would change the logits after the guard judged them or let the engine emit after the
guard ended a request: ``ignore_eos``, ``min_tokens``, presence/frequency penalties,
``logit_bias``, ``allowed_token_ids``, ``bad_words``, structured outputs, a thinking
budget; a policy the operator does not allow; an unknown ``fse_*`` key. Refused at
start-up: tensor or pipeline parallelism (every rank would step the sidecar),
speculative decoding (several rows per request and step), watermarking (it re-draws the
token after the guard).

Every decoding step, the rows of the batch go to the sidecar as one ring frame (COMPACT
rows computed on the device where the request's sampler allows) and one batch message
(:class:`~engine_adapters.batch.BatchGuard`). A row whose verdict is ABORT, refused or
missing gets the end-of-sequence token forced, and so does *every later row* of that
request: nothing the engine does after the guard ended a request is left unjudged. The
request is recorded on the outcome board (``content_filter`` or ``guard_error``) before
the row is returned. The token vLLM actually committed is checked against the verdict at
the next step (the boundary); a mismatch ends the request.

A sidecar that restarts is found again: a session that cannot open because the new
sidecar does not know the vocabulary registers it again and retries once. The ring is
closed and unlinked when the engine process exits.

Two interfaces, as vLLM has them; :class:`FseLogitsProcessor` is the one name to load and
becomes the one vLLM's own configuration picks (``VllmConfig.use_v2_model_runner``: the
``VLLM_USE_V2_MODEL_RUNNER`` switch, then Triton present and the features in use):
- **Model Runner V2**: :class:`FseLogitsProcessorV2`, state per request slot
  (``add_request``), rows reordered every step through ``ctx.idx_mapping_np``.
- **V1**: :class:`FseLogitsProcessorV1`, state per persistent-batch index, kept in step
  with ``update_state(BatchUpdate)`` (removed, then added, then moved).
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any, TypeVar

import numpy as np
import torch

from sidecar.core.sampling import SamplingParams
from sidecar.errors import ConfigError, FseError, GuardError, GuardUnavailable, StepRefused, VerdictRejected
from sidecar.ring import RingWriter

from .batch import BatchGuard, GuardedRequest, force
from .client import GuardClient
from .hf import vocabulary_of
from .outcomes import KEY, Outcome, OutcomeBoard
from .policies import operator_policies

log = logging.getLogger("fse.vllm")
_T = TypeVar("_T")

POLICY_KEY = "fse_policy"  # vllm_xargs: the policy a request picks among those allowed
REQUEST_KEY = "fse_request"  # vllm_xargs: the middleware's key for the outcome board
_TORCH_RING_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}  # logits are upcast from these exactly

# vLLM's own options that act on the logits after the guard forced them, or keep a request
# going after the guard ended it: (field, its "off" value, why it is refused).
_REFUSED = (
    ("ignore_eos", False, "the engine would go on after the guard ended the request"),
    ("min_tokens", 0, "it masks the end-of-sequence token the guard ends a request with"),
    ("presence_penalty", 0.0, "the guard samples; it has no presence penalty"),
    ("frequency_penalty", 0.0, "the guard samples; it has no frequency penalty"),
    ("logit_bias", None, "it would change the logits the guard judged"),
    ("allowed_token_ids", None, "it would change the logits the guard judged"),
    ("bad_words", None, "it would change the logits the guard judged"),
    ("structured_outputs", None, "it would change the logits the guard judged"),
    ("thinking_token_budget", None, "it forces tokens after the guard judged the row"),
)


@dataclass(frozen=True)
class GuardArgs:
    """What the guard needs of one request: the sidecar's sampling, the policy, and the
    middleware's key for reporting how it ended (None outside the API server)."""

    params: SamplingParams
    policy: str
    key: str | None


def log_to_stderr(process: str) -> None:
    """vLLM configures its own loggers only: the guard's ("fse.*") go to stderr beside them."""
    root = logging.getLogger("fse")
    if not root.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"({process} pid=%(process)d) %(levelname)s %(asctime)s [fse] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def repetition_window() -> int:
    raw = os.environ.get("FSE_REPETITION_WINDOW", "64")
    if not raw.isdigit():
        raise ValueError(f"FSE_REPETITION_WINDOW must be a whole number of tokens, got {raw!r}")
    return int(raw)


def _is_set(value: Any, off: Any) -> bool:
    return value is not None and value != off and not (isinstance(value, list | dict) and not value)


def guard_args(sp: Any) -> GuardArgs:
    """The guard's arguments for a request (every request: the guard is not optional).
    ValueError (vLLM's admission error, a 400) naming what is wrong."""
    conflicts = [f"{name} ({why})" for name, off, why in _REFUSED if _is_set(getattr(sp, name, off), off)]
    if conflicts:
        raise ValueError("the guard refuses " + "; ".join(conflicts) + ": leave them unset")
    extra = getattr(sp, "extra_args", None) or {}
    unknown = sorted(k for k in extra if isinstance(k, str) and k.startswith("fse") and k not in (POLICY_KEY, REQUEST_KEY))
    if unknown:
        raise ValueError(
            f"vllm_xargs has unknown guard keys {unknown}: a request may set only {POLICY_KEY!r} "
            "(sampling comes from the request's own temperature, top_p, top_k, min_p, repetition_penalty, seed)"
        )
    default, allowed = operator_policies()
    policy = extra.get(POLICY_KEY, default)
    if not isinstance(policy, str) or policy not in allowed:
        raise ValueError(f"vllm_xargs.{POLICY_KEY}: {policy!r} is not a policy this server allows (allowed: {sorted(allowed)})")
    key = extra.get(REQUEST_KEY)
    if key is not None and not (isinstance(key, str) and KEY.fullmatch(key)):
        raise ValueError(f"vllm_xargs.{REQUEST_KEY} is the server's own key (32 hex digits); a client does not set it")
    temperature = float(getattr(sp, "temperature", 1.0))
    top_k = int(getattr(sp, "top_k", 0) or 0)
    seed = getattr(sp, "seed", None)
    try:
        params = SamplingParams(
            temperature=temperature if temperature >= 1e-5 else 0.0,  # vLLM's own greedy cut-off
            top_k=max(top_k, 0),  # vLLM: 0 or -1 means every token
            top_p=float(getattr(sp, "top_p", 1.0)),
            min_p=float(getattr(sp, "min_p", 0.0)),
            repetition_penalty=float(getattr(sp, "repetition_penalty", 1.0)),
            repetition_window=repetition_window(),
            seed=(int(seed) % 2**64) if seed is not None else secrets.randbits(63),
        )
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return GuardArgs(params, policy, key)


@dataclass
class _Tracked:
    """A request the guard holds: its session (None: it never opened, ``error`` says why),
    the board key, and whether its end was reported."""

    req: GuardedRequest | None
    key: str | None
    error: str = ""
    reported: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.req.tokens if self.req is not None else []


class _Guard:
    """What one engine process holds for the guard: a client, one ring sized for the
    scheduler's largest batch, and the model's vocabulary (registered again after a
    sidecar restart)."""

    def __init__(self, vllm_config: Any) -> None:
        log_to_stderr("Engine")
        par = vllm_config.parallel_config
        if getattr(par, "tensor_parallel_size", 1) != 1 or getattr(par, "pipeline_parallel_size", 1) != 1:
            raise ValueError("engine_adapters.vllm guards single-GPU engines: tensor/pipeline parallelism would step twice")
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("engine_adapters.vllm does not support speculative decoding (several rows per request)")
        if getattr(vllm_config, "watermark_config", None) is not None:
            raise ValueError("engine_adapters.vllm does not support watermarking (it re-draws the guard's token)")
        target, key = os.environ.get("FSE_SIDECAR"), os.environ.get("FSE_PUBLIC_KEY")
        if not target or not key:
            raise ValueError("set FSE_SIDECAR (e.g. unix:///run/fse/fse.sock) and FSE_PUBLIC_KEY (the verifying key file)")
        operator_policies()
        repetition_window()  # the operator's settings fail the start, not a request
        mc = vllm_config.model_config
        from transformers import AutoTokenizer  # vLLM's own dependency

        tokenizer = AutoTokenizer.from_pretrained(
            mc.tokenizer, revision=getattr(mc, "tokenizer_revision", None), trust_remote_code=mc.trust_remote_code
        )
        self.vocab_size = int(mc.get_vocab_size())
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {mc.tokenizer} has no end-of-sequence token to end a request with")
        self.client = GuardClient(target, key, step_timeout=float(os.environ.get("FSE_STEP_TIMEOUT", "2")))
        self.client.wait_ready()
        self.vocabulary = vocabulary_of(tokenizer, self.vocab_size)
        self.digest = self.client.register_vocabulary(self.vocabulary)
        self.model_id = str(mc.model)
        topk = min(int(os.environ.get("FSE_COMPACT_K", "64")), self.vocab_size)
        self.ring = RingWriter.create(
            slots=2,
            rows=int(vllm_config.scheduler_config.max_num_seqs),
            vocab_size=self.vocab_size,
            dtype=_TORCH_RING_DTYPES.get(getattr(mc, "dtype", torch.float32), "f32"),
            topk=topk,
        )
        # The engine process owns the ring: unlink it at exit. vLLM's workers are multiprocessing
        # children that leave through os._exit: atexit never runs there, multiprocessing's
        # finalizers do (and in a main process they run at its exit too).
        multiprocessing.util.Finalize(self, self.shutdown, exitpriority=10)
        self.batch = BatchGuard(self.client, self.ring, int(eos))
        self._last_wait = -1e9  # monotonic time of the last wait for a sidecar that was down
        self.board = OutcomeBoard.from_env()
        if self.board is None:
            log.warning("fse: FSE_OUTCOMES_DIR is not set: a guard abort will reach API clients as a plain 'stop'")
        else:  # the server unlinks it at exit: vLLM SIGKILLs this process, nothing here runs then
            self.board.adopt_ring(self.ring.name)
            resource_tracker.unregister(f"/{self.ring.name}", "shared_memory")

    def shutdown(self) -> None:
        if self.board is not None:  # unregistered at start; unlink() unregisters it again
            resource_tracker.register(f"/{self.ring.name}", "shared_memory")
        self.ring.close()
        self.client.close()
        log.info("fse: ring %s closed and unlinked", self.ring.name)

    def open(self, sp: Any, prompt: list[int]) -> _Tracked:
        """A session for a new request; a request that cannot open is tracked unopened and
        ends at its first row (never an exception: this runs inside vLLM's engine loop)."""
        try:
            args = guard_args(sp)
        except ValueError as exc:  # validate_params refused it already; an engine bypassing it ends here
            return _Tracked(None, None, f"refused: {exc}")
        try:
            return _Tracked(GuardedRequest(self._open_session(args, prompt), args.params, list(prompt)), args.key)
        except FseError as exc:
            log.warning("fse: a guarded request could not open its session: %s", exc)
            return _Tracked(None, args.key, f"the session did not open: {exc}")

    def _open_session(self, args: GuardArgs, prompt: list[int]) -> Any:
        """Open, finding a restarted sidecar again: waited for once if the channel is between
        reconnects, and given the vocabulary again if it does not know it."""
        waited = registered = False
        while True:
            try:
                return self.client.open_session(
                    self.digest, args.params, ring=self.ring, prompt_token_ids=prompt, policy=args.policy, model_id=self.model_id
                )
            except StepRefused as exc:
                if registered or exc.code != "NOT_FOUND" or "vocabulary" not in str(exc):
                    raise
                log.info("fse: the sidecar does not know this model's vocabulary (restarted?): registering it again")
                self.client.register_vocabulary(self.vocabulary)
                registered = True
            except GuardUnavailable:
                if waited or not self._sidecar_back():
                    raise
                waited = True

    def _sidecar_back(self) -> bool:
        """gRPC fails calls at once while it backs off between reconnects (up to 1 s): wait up
        to 1 s for the sidecar, at most once every 2 s, so that while it stays down new
        requests fail at once instead of stalling the engine loop."""
        now = time.monotonic()
        if now - self._last_wait < 2.0:
            return False
        self._last_wait = now
        try:
            self.client.wait_ready(timeout=1.0)
        except GuardUnavailable:
            return False
        return True

    @staticmethod
    def close(t: _Tracked | None) -> None:
        if t is not None and t.req is not None and t.req.session.dead is None:
            try:
                t.req.session.close()
            except GuardError as exc:
                log.warning("fse: closing session %s: %s", t.req.session.session_id, exc)

    def step(self, logits: torch.Tensor, rows: list[tuple[int, _Tracked, int | None]], unknown: Sequence[int] = ()) -> None:
        """Guard ``rows`` (logits row, request, the token the engine committed last) in place.
        A request that never opened, whose committed token is not its verdict's, or that the
        guard ended at an earlier step gets end-of-sequence; so do ``unknown`` rows (no request
        state: a bookkeeping fault is never a free row)."""
        live: list[tuple[int, GuardedRequest]] = []
        end = list(unknown)
        for r, t, committed in rows:
            if t.req is None or t.req.finish_reason is not None or not _checked(t.req, committed):
                end.append(r)
            else:
                live.append((r, t.req))
        self.batch.guard(logits, live)
        force(logits, end, [self.batch.eos] * len(end))
        for _, t, _ in rows:
            if not t.reported:
                self._report(t)

    def _report(self, t: _Tracked) -> None:
        """Put a request the guard ended on the board (before vLLM samples its last token)."""
        q = t.req
        if q is None:
            finish, detail = "guard_error", t.error
        elif q.finish_reason in ("guard_abort", "guard_error"):
            finish = "content_filter" if q.finish_reason == "guard_abort" else "guard_error"
            detail = str(q.error)
        else:
            return
        t.reported = True
        if self.board is None or t.key is None:
            return
        try:
            self.board.record(t.key, Outcome(finish, detail, len(t.tokens)))
        except OSError as exc:
            log.error("fse: could not record how request %s ended (%s): its client will see 'stop'", t.key, exc)


def _checked(q: GuardedRequest, committed: int | None) -> bool:
    """The boundary: the token the engine committed last is the last verdict's; False (and
    the request ends) if not."""
    if not q.tokens or committed is None or committed == q.tokens[-1]:
        return True
    err = VerdictRejected(
        f"session {q.session.session_id}: the engine committed token {committed}, the verdict named {q.tokens[-1]}"
    )
    q.end("guard_error", err)
    log.error("fse: %s", err)
    return False


_claimed = False


def _inert() -> bool:
    """True for every processor built after this process's first guard, which then does
    nothing: listed twice, vLLM builds two, and a second guard would judge rows the first
    had already forced."""
    if _claimed:
        log.info("fse: the guard is already registered in this engine; this instance passes rows through")
    return _claimed


def _claim() -> None:
    global _claimed
    _claimed = True


def _swap(d: dict[int, _T], a: int, b: int) -> None:
    va, vb = d.pop(a, None), d.pop(b, None)
    if va is not None:
        d[b] = va
    if vb is not None:
        d[a] = vb


def _move(d: dict[int, _T], a: int, b: int) -> None:
    v = d.pop(a, None)
    if v is not None:
        d[b] = v


try:  # the V1 interface (vllm.v1.sample.logits_processor)
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Base
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality
except ImportError:  # no vLLM here: the class is defined against object, for reading only
    _V1Base = object  # type: ignore[assignment,misc]

try:  # Model Runner V2 (vllm.v1.worker.gpu.sample.logits_processor)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2Base
except ImportError:
    _V2Base = object  # type: ignore[assignment,misc]


class FseLogitsProcessorV1(_V1Base):  # type: ignore[misc,valid-type]
    """The V1 interface: state per persistent-batch index."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.inert = _inert()
        self.reqs: dict[int, _Tracked] = {}
        if self.inert:
            return
        self.guard = _Guard(vllm_config)
        _claim()
        self.outputs: dict[int, list[int]] = {}  # vLLM's running output list of each index

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        guard_args(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or self.inert:
            return
        for i in batch_update.removed:
            self._drop(i)
        for i, sp, prompt, output in batch_update.added:
            self._drop(i)  # an added request may replace the one at its index
            self.reqs[i] = self.guard.open(sp, list(prompt or []) + list(output))
            self.outputs[i] = output
        for a, b, how in batch_update.moved:
            if how == MoveDirectionality.SWAP:
                _swap(self.reqs, a, b)
                _swap(self.outputs, a, b)
            else:  # one-way: a's request now lives at b; a is empty
                self._drop(b)
                _move(self.reqs, a, b)
                _move(self.outputs, a, b)

    def _drop(self, i: int) -> None:
        self.outputs.pop(i, None)
        self.guard.close(self.reqs.pop(i, None))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.inert:
            return logits
        rows, unknown = [], []
        for i in range(logits.shape[0]):
            t = self.reqs.get(i)
            if t is None:
                unknown.append(i)
                continue
            out = self.outputs.get(i, [])
            rows.append((i, t, out[-1] if out and t.tokens else None))
        if unknown:
            log.error("fse: logits rows %s have no request the guard knows: ended", unknown)
        self.guard.step(logits, rows, unknown)
        return logits


class FseLogitsProcessorV2(_V2Base):  # type: ignore[misc,valid-type]
    """Model Runner V2: state per request slot, rows mapped to slots every step."""

    def __init__(self, vllm_config: Any, req_states: LogitsProcRequestState) -> None:
        self.inert = _inert()
        if self.inert:
            return
        self.guard = _Guard(vllm_config)
        _claim()
        self.state = req_states
        self.pending: dict[int, Any] = {}  # slot -> vLLM's sampling params, opened at its first row
        self.reqs: dict[int, _Tracked] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        guard_args(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        if self.inert:
            return False
        self.guard.close(self.reqs.pop(req_idx, None))  # the slot's previous occupant is done
        self.pending[req_idx] = sampling_params
        return True

    def apply_staged_writes(self) -> None:
        pass  # nothing of this processor's lives on the device

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if self.inert:
            return logits
        slots = [int(s) for s in np.asarray(ctx.idx_mapping_np)]
        st = self.state
        for slot in [s for s in slots if s in self.pending]:
            sp = self.pending.pop(slot)
            n = int(st.prefill_len.np[slot])  # the prompt, and any output before a preemption
            self.reqs[slot] = self.guard.open(sp, st.all_token_ids.gpu[slot, :n].tolist())
        guarded = [(pos, slot, self.reqs[slot]) for pos, slot in enumerate(slots) if slot in self.reqs]
        unknown = [pos for pos, slot in enumerate(slots) if slot not in self.reqs]
        stepped = [(pos, slot, t) for pos, slot, t in guarded if t.tokens]
        committed: dict[int, int] = {}
        if stepped:  # one gather for the boundary check: each request's last committed token
            idx = torch.tensor([slot for _, slot, _ in stepped], device=st.all_token_ids.gpu.device)
            last = st.all_token_ids.gpu[idx, st.total_len.gpu[idx].long() - 1].tolist()
            committed = {slot: int(t) for (_, slot, _), t in zip(stepped, last, strict=True)}
        if unknown:
            log.error("fse: logits rows %s have no request the guard knows: ended", unknown)
        self.guard.step(logits, [(pos, t, committed.get(slot)) for pos, slot, t in guarded], unknown)
        return logits


class FseLogitsProcessor:
    """The name to load (``--logits-processors engine_adapters.vllm:FseLogitsProcessor``):
    builds the V1 or the V2 processor as the engine's own configuration says
    (``VllmConfig.use_v2_model_runner``), and passes both of vLLM's loaders' type checks."""

    def __new__(cls, vllm_config: Any, *args: Any) -> Any:  # type: ignore[misc]
        if getattr(vllm_config, "use_v2_model_runner", False):
            return FseLogitsProcessorV2(vllm_config, *args)
        return FseLogitsProcessorV1(vllm_config, *args)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        guard_args(sampling_params)


for _base in (_V1Base, _V2Base):
    if _base is not object:
        _base.register(FseLogitsProcessor)  # an ABC: vLLM's issubclass check accepts the dispatcher
