"""vLLM under guard: logits processors for both of vLLM's interfaces (targets vLLM 0.33.0).

    vllm serve MODEL --logits-processors engine_adapters.vllm:FseLogitsProcessor
    # or nothing: installing libfse registers the "vllm.logits_processors" entry point "fse"
    # (the same class; registered both ways, the second instance passes rows through)
    curl .../v1/completions -d '{"prompt": "...", "vllm_xargs": {"fse": {"top_k": 40, "temperature": 0.7, "seed": 1}}}'

Environment (the engine container's, deploy/): ``FSE_SIDECAR`` (``unix:///run/fse/fse.sock``),
``FSE_PUBLIC_KEY`` (the verifying key file), optional ``FSE_STEP_TIMEOUT`` (seconds, 2),
``FSE_COMPACT_K`` (largest COMPACT row, 64; 0: FULL rows only), ``FSE_POLICY`` (the
policy of requests that name none).

A request asks for the guard through ``SamplingParams.extra_args["fse"]`` (``vllm_xargs``
in the REST body): ``true``, or the sidecar's sampling parameters (temperature, top_k,
top_p, min_p, repetition_penalty, repetition_window, seed) and ``policy``. The sidecar
samples; vLLM only ever sees one finite logit per guarded row, so its own sampler can only
pick the verdict's token. Requests without ``fse`` pass untouched and cost nothing.
vLLM's own logit-changing options (penalties, logit_bias, allowed/bad words, min_tokens,
structured outputs) are refused for guarded requests at admission (``validate_params``):
they would change the logits the sidecar judges, or mask the end-of-sequence token an
ending request needs.

Every decoding step, the guarded rows of the batch go to the sidecar as one ring frame
(COMPACT rows computed on the GPU where the request's sampler allows) and one batch
message (:class:`~engine_adapters.batch.BatchGuard`). A row whose verdict is ABORT,
refused or missing gets the end-of-sequence token forced: that request ends, the others
go on. vLLM's logits-processor interface cannot set a finish reason: such a request
finishes with ``finish_reason: "stop"``; why is in the sidecar's audit (the ABORT frame,
its reasons), its metrics (``fse_verdicts_total{decision="abort"}``) and this adapter's
WARNING log line naming the session. The token vLLM actually committed is checked against
the verdict at the next step (the boundary); a mismatch ends the request.

Not supported (refused at start-up, naming the setting): tensor or pipeline parallelism
(every rank would step the sidecar) and speculative decoding (a request then owns several
rows per step).

Two interfaces, as vLLM has them:
- **Model Runner V2** (the default): :class:`FseLogitsProcessorV2`, state per request
  slot (``add_request``), rows reordered every step through ``ctx.idx_mapping_np``.
- **V1** (``VLLM_USE_V2_MODEL_RUNNER=0``): :class:`FseLogitsProcessorV1`, state per
  persistent-batch index, kept in step with ``update_state(BatchUpdate)`` (removed, then
  added, then moved: one-way moves and swaps).

:data:`FseLogitsProcessor` is the one for the runner this process uses (vLLM rejects the
other kind at load).
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

import numpy as np
import torch

from sidecar.core.sampling import SamplingParams
from sidecar.errors import ConfigError, FseError, VerdictRejected
from sidecar.ring import RingWriter

from .batch import BatchGuard, GuardedRequest
from .client import GuardClient
from .hf import vocabulary_of

log = logging.getLogger("fse.vllm")
_T = TypeVar("_T")

XARGS_KEY = "fse"
_PARAMS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_window", "seed")
_TORCH_RING_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}  # logits are upcast from these exactly


def guard_args(sp: Any) -> tuple[SamplingParams, str] | None:
    """The guard's sampling parameters and policy of a request, or None when it did not ask
    for the guard. ValueError (vLLM's admission error) naming what is wrong."""
    extra = getattr(sp, "extra_args", None) or {}
    if XARGS_KEY not in extra:
        return None
    args = extra[XARGS_KEY]
    if args is True:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"extra_args.{XARGS_KEY} must be true or an object, got {type(args).__name__}")
    unknown = sorted(set(args) - {*_PARAMS, "policy"})
    if unknown:
        raise ValueError(f"extra_args.{XARGS_KEY} has unknown keys {unknown} (known: {[*_PARAMS, 'policy']})")
    policy = args.get("policy", os.environ.get("FSE_POLICY", ""))
    if not isinstance(policy, str):
        raise ValueError(f"extra_args.{XARGS_KEY}.policy must be a string")
    conflicts = [
        name
        for name, off in (
            ("repetition_penalty", 1.0),
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
            ("logit_bias", None),
            ("allowed_token_ids", None),
            ("bad_words", None),
            ("min_tokens", 0),
            ("structured_outputs", None),
        )
        if getattr(sp, name, off) not in (off, [], {})
    ]
    if conflicts:
        raise ValueError(
            f"a guarded request takes its sampling from extra_args.{XARGS_KEY}; vLLM's own {', '.join(conflicts)} "
            "would change the logits the guard judges: leave them unset"
        )
    try:
        params = SamplingParams(**{k: args[k] for k in _PARAMS if k in args})
    except (ConfigError, TypeError) as exc:
        raise ValueError(f"extra_args.{XARGS_KEY}: {exc}") from None
    return params, policy


class _Guard:
    """What one engine process holds for the guard: a client, one ring sized for the
    scheduler's largest batch, and the model's vocabulary registered once."""

    def __init__(self, vllm_config: Any) -> None:
        par = vllm_config.parallel_config
        if getattr(par, "tensor_parallel_size", 1) != 1 or getattr(par, "pipeline_parallel_size", 1) != 1:
            raise ValueError("engine_adapters.vllm guards single-GPU engines: tensor/pipeline parallelism would step twice")
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("engine_adapters.vllm does not support speculative decoding (several rows per request)")
        target, key = os.environ.get("FSE_SIDECAR"), os.environ.get("FSE_PUBLIC_KEY")
        if not target or not key:
            raise ValueError("set FSE_SIDECAR (e.g. unix:///run/fse/fse.sock) and FSE_PUBLIC_KEY (the verifying key file)")
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
        self.digest = self.client.register_vocabulary(vocabulary_of(tokenizer, self.vocab_size))
        self.model_id = str(mc.model)
        topk = min(int(os.environ.get("FSE_COMPACT_K", "64")), self.vocab_size)
        self.ring = RingWriter.create(
            slots=2,
            rows=int(vllm_config.scheduler_config.max_num_seqs),
            vocab_size=self.vocab_size,
            dtype=_TORCH_RING_DTYPES.get(getattr(mc, "dtype", torch.float32), "f32"),
            topk=topk,
        )
        self.batch = BatchGuard(self.client, self.ring, int(eos))

    def open(self, args: tuple[SamplingParams, str], prompt: list[int]) -> GuardedRequest | None:
        """A session for a new request; None (and the request ends at once) if it cannot open."""
        params, policy = args
        try:
            s = self.client.open_session(
                self.digest, params, ring=self.ring, prompt_token_ids=prompt, policy=policy, model_id=self.model_id
            )
        except FseError as exc:
            log.warning("fse: a guarded request could not open its session: %s", exc)
            return None
        return GuardedRequest(s, params, list(prompt))

    @staticmethod
    def close(q: GuardedRequest | None) -> None:
        if q is not None and not isinstance(q, _Unopened):
            q.session.close()

    def step(self, logits: torch.Tensor, rows: list[tuple[int, GuardedRequest, int | None]]) -> None:
        """Guard ``rows`` (logits row, request, the token the engine committed last) in place;
        a request that never opened, or whose committed token is not its verdict's, ends."""
        live, end = [], []
        for r, q, committed in rows:
            if isinstance(q, _Unopened) or not _checked(q, committed):
                end.append(r)
            else:
                live.append((r, q))
        self.batch.guard(logits, live)
        _force_end(logits, end, self.batch.eos)


class _Unopened(GuardedRequest):
    """Stands for a guarded request whose session did not open: ended before its first step."""

    def __init__(self) -> None:  # no session: BatchGuard skips ended requests
        self.finish_reason = "guard_error"
        self.error = None
        self.tokens = []


def _force_end(logits: torch.Tensor, rows: list[int], eos: int) -> None:
    if rows:
        logits[rows] = float("-inf")
        logits[rows, eos] = 0.0


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
    nothing: registered both by the entry point and by ``--logits-processors``, vLLM builds
    two, and a second guard would judge rows the first had already forced."""
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
        self.reqs: dict[int, GuardedRequest] = {}
        if self.inert:
            return
        self.guard = _Guard(vllm_config)
        _claim()
        self.outputs: dict[int, list[int]] = {}  # vLLM's running output list of each guarded index

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
            args = guard_args(sp)
            if args is not None:
                self.reqs[i] = self.guard.open(args, list(prompt or []) + list(output)) or _Unopened()
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
        rows = []
        for i, q in self.reqs.items():
            if i < logits.shape[0]:
                out = self.outputs.get(i, [])
                rows.append((i, q, out[-1] if out and q.tokens else None))
        self.guard.step(logits, rows)
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
        self.pending: dict[int, tuple[SamplingParams, str]] = {}  # slot -> args, opened at its first row
        self.reqs: dict[int, GuardedRequest] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        guard_args(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        if self.inert:
            return False
        self.guard.close(self.reqs.pop(req_idx, None))  # the slot's previous occupant is done
        self.pending.pop(req_idx, None)
        args = guard_args(sampling_params)
        if args is None:
            return False
        self.pending[req_idx] = args
        return True

    def apply_staged_writes(self) -> None:
        pass  # nothing of this processor's lives on the device

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if self.inert:
            return logits
        slots = np.asarray(ctx.idx_mapping_np)
        st = self.state
        for slot in [int(s) for s in slots if int(s) in self.pending]:
            args = self.pending.pop(slot)
            n = int(st.prefill_len.np[slot])  # the prompt, and any output before a preemption
            prompt = st.all_token_ids.gpu[slot, :n].tolist()
            self.reqs[slot] = self.guard.open(args, prompt) or _Unopened()
        guarded = [(pos, int(slot), self.reqs[int(slot)]) for pos, slot in enumerate(slots) if int(slot) in self.reqs]
        stepped = [(pos, slot, q) for pos, slot, q in guarded if not isinstance(q, _Unopened) and q.tokens]
        committed: dict[int, int] = {}
        if stepped:  # one gather for the boundary check: each request's last committed token
            idx = torch.tensor([slot for _, slot, _ in stepped], device=st.all_token_ids.gpu.device)
            last = st.all_token_ids.gpu[idx, st.total_len.gpu[idx].long() - 1].tolist()
            committed = {slot: int(t) for (_, slot, _), t in zip(stepped, last, strict=True)}
        self.guard.step(logits, [(pos, q, committed.get(slot)) for pos, slot, q in guarded])
        return logits


# The processor for this process's model runner (vLLM refuses the other interface at load).
FseLogitsProcessor = FseLogitsProcessorV1 if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0" else FseLogitsProcessorV2
