"""The OpenAI-compatible API of the guarded llama.cpp server: requests, responses, and the
pure pieces of a generation's text (stop strings, whole UTF-8 characters).

Requests are pydantic models with ``extra="forbid"``: a field this server cannot honour
(``logit_bias``, ``logprobs``, ``tools``, ``n`` > 1 ...) is a 400 naming it, never silently
ignored. Extensions beyond OpenAI's fields: ``policy`` (one of the policies the operator
allows), ``top_k``, ``min_p`` and ``repetition_penalty`` (llama.cpp's and vLLM's names).
The response models exist for the OpenAPI document (``/openapi.json``) the server serves.
"""

from __future__ import annotations

import codecs
import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sidecar.core.sampling import SamplingParams

# Sampling defaults when a request leaves a field out (the embedded model's sensible ones;
# docs/engines.md "The guarded OpenAI-compatible server").
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256


def _utf8(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\\ud800" in the JSON)
        raise ValueError(f"{name} is not valid Unicode: {exc.reason} at character {exc.start}") from None
    return value


def _whole(v: Any) -> Any:
    """JSON's 5.0 is an integer (JSON Schema says so); "5" and true are not (strict mode)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


class _Strict(BaseModel):
    # strict: no "5" for 5, no 0 for false; JSON's types as they are
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints take."""

    model: str | None = Field(None, description="the served model's id (GET /v1/models); any other is a 404")
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = DEFAULT_TEMPERATURE
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = DEFAULT_TOP_P
    top_k: Annotated[int, Field(ge=0, lt=2**31, description="extension: 0 is off")] = DEFAULT_TOP_K
    min_p: Annotated[float, Field(ge=0.0, lt=1.0, description="extension")] = 0.0
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0, description="extension: llama.cpp's and vLLM's")] = 1.0
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0, description="only 0: use repetition_penalty")] = 0.0
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0, description="only 0: use repetition_penalty")] = 0.0
    seed: Annotated[
        int | None, Field(description="any integer, taken modulo 2^64 (int64 seeds welcome); none: a random one, in the audit")
    ] = None
    stop: (
        Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
        | None
    ) = Field(None, description=f"at most {MAX_STOP} strings; the text ends before the first")
    n: Literal[1] = Field(1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str | None, Field(max_length=256)] = None
    policy: Annotated[str | None, Field(max_length=128, description="extension: a policy the operator allows")] = None

    @field_validator(
        "temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", mode="before"
    )
    @classmethod
    def _a_number(cls, v: Any) -> Any:
        if isinstance(v, bool):  # JSON true is not a number
            raise ValueError(f"a number is expected, got {str(v).lower()}")
        return v

    @field_validator("top_k", "seed", "n", mode="before")
    @classmethod
    def _an_integer(cls, v: Any) -> Any:
        return _whole(v)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        for s in stops or ():
            _utf8(s, "stop")
        return stops

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            # none given: a random one (as OpenAI does), in the audit's genesis for replay; a
            # fixed default would draw every unseeded request's token at a step from one number
            seed=self.seed % 2**64 if self.seed is not None else secrets.randbits(63),
        )

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]

    @property
    def include_usage(self) -> bool:
        """stream_options applies to streams only (a request without one is not refused for it)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: the prompt goes to the model as it is (no chat template)."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    ) = Field(description="text, a list of one text, or token ids")
    max_tokens: Annotated[
        int | None, Field(ge=1, description=f"default {COMPLETIONS_DEFAULT_MAX_TOKENS} (or the server's most)")
    ] = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _whole_limit(cls, v: Any) -> Any:
        return _whole(v)

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids(cls, v: Any) -> Any:
        return [_whole(t) for t in v] if isinstance(v, list) else v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(v, list) and isinstance(v[0], str):
            v = str(v[0])  # a list of one text (the schema allows no more: n=1)
        return _utf8(v, "prompt") if isinstance(v, str) else v  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: Annotated[str | None, Field(max_length=64)] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart]) -> str:
        text = v if isinstance(v, str) else "".join(p.text for p in v)
        return _utf8(text, "content")


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages rendered by the model's own chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int | None, Field(ge=1, description="deprecated by OpenAI: max_completion_tokens")] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, description="wins over max_tokens")] = None

    @field_validator("max_tokens", "max_completion_tokens", mode="before")
    @classmethod
    def _whole_limits(cls, v: Any) -> Any:
        return _whole(v)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses (for the OpenAPI document; the server writes the same shapes) ----


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Receipt(BaseModel):
    session_id: str
    steps: int
    chain_hash: str


class FseInfo(BaseModel):
    """Extension: what the guard did to this answer."""

    healed_tokens: int
    policy: str
    lane: str
    receipt: Receipt | None = None
    abort: str | None = Field(None, description="why the guard ended the answer (generic unless the operator exposes reasons)")


FinishReason = Literal["stop", "length", "content_filter"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    fse: FseInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    fse: FseInfo | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


# ---- the text of a generation ----


class StopText:
    """Turns a generation's token bytes into the text a client may be sent.

    Tokens split UTF-8 characters; a chunk carries whole characters only. Text that could
    still become the start of a stop sequence is held back until it cannot; when a stop
    sequence appears, the text ends before it and :attr:`stopped` is set (the engine stops
    generating). What is held at the end of the generation is released by :meth:`flush`.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """The text that may go out now (may be empty)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(data)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = max((self._overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held text, at the end of a generation that no stop sequence ended."""
        if self.stopped:
            return ""
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """The longest end of ``text`` that is a proper start of ``stop``."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
