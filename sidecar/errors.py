"""The one exception hierarchy of libfse.

    FseError
    ├── ConfigError            bad configuration; the message names the field
    │   └── UnknownPolicy      a session asked for a policy that is not configured
    ├── ListenError            the configured address cannot be bound (or is in use)
    ├── SigningKeyError        missing/unreadable/wrong-type key file
    ├── VocabularyError        unknown or malformed vocabulary, or too many of them
    ├── RowError               a logits row that cannot be judged (wrong size, dtype)
    ├── SessionError           unknown/duplicate session, step out of order
    │   ├── InvalidSessionId   an id that breaks [A-Za-z0-9._:-]{1,128}
    │   ├── NotSessionOwner    a request without the session's secret
    │   └── TooManySessions    max_sessions or max_sessions_per_client reached
    ├── MessageTooLarge        a request over its RPC's size limit (not parsed)
    ├── MalformedMessage       bytes that do not parse as the RPC's request
    ├── AuditError             an audit file cannot be created or written
    ├── RecordingError         a recording (serve --record) that replay cannot read
    ├── ReloadFailed           a policy reload timed out or ran out of its memory bound
    ├── AccelBuildError        the compiled fast path cannot be built (no mypyc, no compiler)
    ├── LaneUnavailable        the fast lane asked of a sidecar that serves none
    ├── RingError              shared-memory ring problems
    │   ├── RingLayoutError    header does not describe a ring we can read
    │   └── TornFrameError     seqlock says the frame is being written or was replaced
    └── GuardError             engine side: no valid verdict, so no token (fail closed)
        ├── GuardAbort         the sidecar decided ABORT; .reasons lists why
        ├── VerdictRejected    signature, session, step or chain link did not verify
        └── GuardUnavailable   sidecar down or timed out
            └── StepRefused    the sidecar answered the step with an error

Each carries a ``grpc_code`` (a ``grpc.StatusCode`` name) used where the server maps it
onto a status, so no handler turns an error into UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def shown(value: str, limit: int = 64) -> str:
    """A client's string as it may appear in a log line or an error: escaped, bounded."""
    return repr(value[:limit]) + (f"... ({len(value)} chars)" if len(value) > limit else "")


class FseError(Exception):
    grpc_code: str = "INTERNAL"


class ConfigError(FseError, ValueError):
    grpc_code = "INVALID_ARGUMENT"


class UnknownPolicy(ConfigError):
    grpc_code = "NOT_FOUND"


class ListenError(FseError):
    """The sidecar cannot bind its configured address."""


class SigningKeyError(FseError):
    grpc_code = "FAILED_PRECONDITION"


class VocabularyError(FseError, ValueError):
    grpc_code = "INVALID_ARGUMENT"


class UnknownVocabulary(VocabularyError):
    grpc_code = "NOT_FOUND"


class TooManyVocabularies(VocabularyError):
    grpc_code = "RESOURCE_EXHAUSTED"


class RowError(FseError, ValueError):
    grpc_code = "INVALID_ARGUMENT"


class CoverageError(RowError):
    """A COMPACT row's shipped entries do not hold the sampler's whole support: the step is
    not judged (no guess), and the engine may send the same step again as a FULL row."""

    grpc_code = "FAILED_PRECONDITION"


class SessionError(FseError):
    grpc_code = "FAILED_PRECONDITION"


class UnknownSession(SessionError):
    grpc_code = "NOT_FOUND"


class DuplicateSession(SessionError):
    grpc_code = "ALREADY_EXISTS"


class InvalidSessionId(SessionError, ValueError):
    """A session id that breaks the id rule (the message never echoes it)."""

    grpc_code = "INVALID_ARGUMENT"


class NotSessionOwner(SessionError):
    """The request did not carry the session's secret: only its opener may step or close it."""

    grpc_code = "PERMISSION_DENIED"


class TooManySessions(SessionError):
    grpc_code = "RESOURCE_EXHAUSTED"


class MessageTooLarge(FseError):
    """A request over its RPC's size limit, refused before it is parsed."""

    grpc_code = "RESOURCE_EXHAUSTED"


class MalformedMessage(FseError, ValueError):
    grpc_code = "INVALID_ARGUMENT"


class RingError(FseError):
    grpc_code = "FAILED_PRECONDITION"


class RingLayoutError(RingError, ValueError):
    grpc_code = "INVALID_ARGUMENT"


class TornFrameError(RingError):
    grpc_code = "ABORTED"


class LaneUnavailable(FseError):
    """The fast lane was asked for where the sidecar serves none."""

    grpc_code = "FAILED_PRECONDITION"


class AuditError(FseError):
    """An audit file could not be created or written: no step goes unaudited."""

    grpc_code = "UNAVAILABLE"


class RecordingError(FseError):
    """A recording that ``replay`` cannot read: the message names the file and what."""


class ReloadFailed(FseError):
    """A policy reload that did not finish: the policies in force stay."""

    grpc_code = "RESOURCE_EXHAUSTED"


class AccelBuildError(FseError):
    """The compiled fast path (sidecar.accel) could not be built; the pure modules still run."""


class GuardError(FseError):
    """Engine side: generation stopped because no valid verdict allowed a token."""


class GuardAbort(GuardError):
    """The sidecar judged the step and decided ABORT."""

    def __init__(self, message: str, reasons: Sequence[Any] = (), step: int | None = None) -> None:
        super().__init__(message)
        self.reasons = list(reasons)
        self.step = step


class VerdictRejected(GuardError):
    """A verdict arrived but failed verification (signature, binding or chain).

    ``check`` names the check of VERDICT.md "What an adapter checks" that refused it
    (key, signature, session, step, policy, link, chain, decision, token; "" elsewhere)."""

    def __init__(self, message: str, check: str = "") -> None:
        super().__init__(message)
        self.check = check


class GuardUnavailable(GuardError):
    """No verdict in time: sidecar down, deadline passed, or transport error."""


class StepRefused(GuardUnavailable):
    """The sidecar answered the step with an error instead of a verdict (``.code``)."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code
