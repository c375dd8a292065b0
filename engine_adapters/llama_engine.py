"""The guarded llama.cpp model behind the OpenAI-compatible server: one worker thread owns it
(llama.cpp must be driven from one thread, see ``load_llama``) and runs queued jobs one at a
time, handing each job's verified text to its request's event loop as it is made.

A job's events: :class:`Piece` (text whose tokens' verdicts were verified, whole UTF-8
characters, never past a stop sequence) and one :class:`End`. A job whose request went away
(``cancel``) stops at its next token; closing the generator closes the guard's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams
from sidecar.errors import FseError, GuardAbort, StepRefused

from .client import GuardClient
from .openai_schema import StopText

log = logging.getLogger("fse.engine.llama")


class BadRequest(ValueError):
    """A request the API refuses (400): the message names what is wrong."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Piece:
    text: str
    tokens: int  # verified tokens so far


@dataclass(frozen=True, slots=True)
class End:
    """How a job ended. ``finish``: "stop", "length" or "content_filter" (the guard's ABORT);
    None with ``error`` set when no valid verdict came (the answer must not stand)."""

    finish: str | None
    tokens: int
    prompt_tokens: int
    healed: int = 0
    error: BaseException | None = None
    receipt: pb.Receipt | None = None


Event = Piece | End


@dataclass
class Job:
    prompt: str | list[int]
    max_tokens: int | None  # None: up to ``cap``, or the end of the context if sooner
    cap: int
    sampling: SamplingParams
    policy: str
    stops: list[str]
    deliver: Callable[[Event], None]  # thread-safe: hands an event to the request's loop
    cancelled: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def on_loop(cls, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event], **kw: Any) -> Job:
        def deliver(ev: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
                loop.call_soon_threadsafe(events.put_nowait, ev)

        return cls(deliver=deliver, **kw)


def _refused_at_open(exc: BaseException, code: str) -> bool:
    """``exc`` refused the session's opening with ``code`` (``_stream`` raises only before
    its first token, so a retry never sends text twice)."""
    return isinstance(exc, StepRefused) and exc.code == code


class Engine:
    """The model and its guard, owned by one worker thread; a bounded queue in front."""

    def __init__(self, llama: Any, client: GuardClient, lane: str, queue_size: int) -> None:
        self.llama = llama
        self.client = client
        self.lane = lane
        self.model = Path(getattr(llama, "model_path", "model")).name
        self.n_ctx = int(llama.n_ctx())
        self.n_vocab = int(llama.n_vocab())
        self.jobs: queue.Queue[Job | None] = queue.Queue(queue_size)
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

    def submit(self, job: Job) -> None:
        """Queue a job; ``queue.Full`` when the queue is (the caller answers 429)."""
        self.jobs.put_nowait(job)

    def close(self) -> None:
        """Cancel what waits, finish the job running, stop the worker."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.deliver(End(None, 0, 0, error=FseError("the server is shutting down")))
        self.jobs.put(None)
        self._worker.join(30)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                job.deliver(self._generate(job))
            except BaseException as exc:  # noqa: BLE001 - the request answers for it; the worker lives on
                if not isinstance(exc, FseError | BadRequest):
                    log.exception("generation failed")
                job.deliver(End(None, 0, 0, error=exc))
        if self._guarded is not None:
            self._guarded.close()

    def _renew(self) -> None:
        """A new GuardedLlama: the vocabulary registered again."""
        from .llama_cpp import GuardedLlama

        self._drop()
        self.client.wait_ready(timeout=5.0)
        self._guarded = GuardedLlama(self.llama, self.client, lane=self.lane)

    def _drop(self) -> None:
        if self._guarded is not None:
            self._guarded.close()
            self._guarded = None

    def _ids(self, job: Job) -> list[int]:
        if isinstance(job.prompt, str):
            ids = list(self.llama.tokenize(job.prompt.encode("utf-8"), add_bos=True, special=True))
        else:
            bad = next((t for t in job.prompt if t >= self.n_vocab), None)
            if bad is not None:
                raise BadRequest(f"prompt: token id {bad} is not in the vocabulary of {self.n_vocab}", "prompt")
            ids = list(job.prompt)
        room = self.n_ctx - len(ids)
        if room < 1 or job.max_tokens is not None and job.max_tokens > room:
            raise BadRequest(
                f"the prompt is {len(ids)} tokens: with max_tokens {job.max_tokens or 1} it exceeds the context of "
                f"{self.n_ctx} tokens",
                "max_tokens" if job.max_tokens else "prompt",
            )
        return ids

    def _generate(self, job: Job) -> End:
        ids = self._ids(job)
        limit = job.max_tokens if job.max_tokens is not None else min(job.cap, self.n_ctx - len(ids))
        if self._guarded is None:  # first use, or after a failure
            self._renew()
        try:
            return self._stream(job, ids, limit)
        except FseError as exc:
            if _refused_at_open(exc, "NOT_FOUND"):
                # an unknown vocabulary (the sidecar restarted and forgot it) or an unknown
                # policy: register again and try once more; still NOT_FOUND, it is the policy
                self._renew()
                try:
                    return self._stream(job, ids, limit)
                except FseError as again:
                    if _refused_at_open(again, "NOT_FOUND"):
                        raise BadRequest(str(again), "policy") from None
                    raise
            if _refused_at_open(exc, "INVALID_ARGUMENT"):
                raise BadRequest(str(exc)) from None  # OpenSession refused what the request asked for
            self._drop()  # no session: a new one, and the vocabulary registered again, next time
            raise

    def _stream(self, job: Job, ids: list[int], limit: int) -> End:
        """Run the generation, delivering text as it is verified. Raises an FseError that
        came before any token (so the caller may retry); later ones end the job."""
        text = StopText(job.stops)
        tokens = healed = 0
        finish: str | None = None
        error: BaseException | None = None
        gen = self._guarded.generate(ids, max_tokens=limit, sampling=job.sampling, policy=job.policy)
        try:
            for t in gen:
                tokens += 1
                healed += t.verdict.decision == pb.DECISION_HEALED
                out = text.feed(t.text)
                if out:
                    job.deliver(Piece(out, tokens))
                if text.stopped:
                    finish = "stop"
                    break
                if job.cancelled.is_set():
                    break
            else:
                finish = "length" if tokens >= limit else "stop"
                end = self._guarded.last_end  # a heal that chose end-of-sequence yields no token
                healed += end is not None and end.decision == pb.DECISION_HEALED
        except GuardAbort as exc:
            finish, error = "content_filter", exc
        except FseError as exc:
            if tokens == 0:
                with contextlib.suppress(FseError):
                    gen.close()
                raise
            error = exc
        finally:
            try:
                gen.close()  # closes the session: verifies its receipt after a clean run
            except FseError as exc:
                if error is None:
                    finish, error = None, exc
            if error is not None and not isinstance(error, GuardAbort):
                self._drop()  # a transport or trust failure: a new session and registration next time
        if finish in ("stop", "length", "content_filter") and not text.stopped:
            rest = text.flush()
            if rest:
                job.deliver(Piece(rest, tokens))
        if error is not None and finish != "content_filter":
            finish = None
        return End(finish, tokens, len(ids), healed, error, self._guarded.last_receipt if self._guarded else None)
