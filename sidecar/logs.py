"""Log lines for people and for log pipelines: ``text`` (a timestamp, the logger, the level,
the message, then ``key=value`` fields) or ``json`` (one object per line).

Events that operators search for (start, shutdown, an abort, a request served) carry their
variables as *fields* beside a constant message, ``log.info("session aborted",
extra=fields(session=..., step=...))``, so a pipeline filters on ``event``/``session``
instead of parsing sentences. Fields never hold generated text or prompts: only ids,
counts, codes and timings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, TextIO, get_args

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
_FIELDS = "fse_fields"
_QUOTE = frozenset(' ="\n')


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: its structured fields (kept apart from the message)."""
    return {_FIELDS: values}


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, _FIELDS, {}))


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 in UTC with milliseconds: sorts as text, and every pipeline parses it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _fields_of(record).items():
            out.setdefault(k, v)  # a field never overwrites the line's own keys
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``2026-12-03T07:00:00.123Z fse.server INFO message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.name} {record.levelname} {record.getMessage()}"
        for k, v in _fields_of(record).items():
            if isinstance(v, str):
                text, quoted = v, not v or any(c in v for c in _QUOTE)  # a value a reader could not split
            else:  # numbers, lists, maps: as JSON, quoted only if a space or newline is in it
                text = json.dumps(v, default=str, ensure_ascii=False, separators=(",", ":"))
                quoted = any(c in text for c in " \n")
            line += f" {k}={json.dumps(text, ensure_ascii=False) if quoted else text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """The process's logging: one handler on the root logger, replacing any earlier one."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
