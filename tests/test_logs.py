"""Log lines: the JSON and text formats, and the sidecar's start, abort and shutdown lines
as a log pipeline reads them from a real ``fse-sidecar serve``."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from engine_adapters.client import GuardClient
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort
from sidecar.logs import configure, fields

V = 64
VOCAB = [f"w{i}".encode() for i in range(V)]


@pytest.fixture
def captured() -> io.StringIO:
    root = logging.getLogger()
    before = root.handlers[:], root.level
    out = io.StringIO()
    yield out
    root.handlers[:], _ = before
    root.setLevel(before[1])


def test_json_lines_keep_fields_apart_from_a_constant_message(captured) -> None:
    configure("info", "json", captured)
    log = logging.getLogger("fse.test")
    log.info("session aborted", extra=fields(event="abort", session="s-1", step=3, trips=[{"code": "gate"}]))
    log.debug("not at info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra=fields(msg="a field never replaces the line's own keys"))
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["msg"] == "session aborted" and first["level"] == "info" and first["logger"] == "fse.test"
    assert (first["event"], first["session"], first["step"], first["trips"]) == ("abort", "s-1", 3, [{"code": "gate"}])
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2026-12-03T07:00:00.123Z")
    assert second["msg"] == "failed" and "ValueError: boom" in second["exc"]


def test_text_lines_quote_only_the_values_a_reader_could_not_split(captured) -> None:
    configure("info", "text", captured)
    logging.getLogger("fse.test").info("served", extra=fields(status=200, path="/v1/x", why="two words", empty=""))
    line = captured.getvalue().rstrip("\n")
    assert line.endswith(' fse.test INFO served status=200 path=/v1/x why="two words" empty=""'), line


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of"):
        configure("info", "yaml")  # type: ignore[arg-type]


def test_the_sidecar_logs_its_start_each_abort_and_its_shutdown_as_json(start_sidecar, keys) -> None:
    sc = start_sidecar(log_format="json", policies={"default": {"drift": {"enabled": False}}})
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    s = c.open_session(digest, SamplingParams(temperature=0.0), session_id="logged-1")
    row = np.zeros(V, np.float32)
    row[7] = 5.0
    assert s.step(row).token_id == 7
    with pytest.raises(GuardAbort):
        s.step(np.full(V, np.nan, np.float32))
    c.close()
    sc.stop()
    lines = [json.loads(line) for line in sc.log.read_text().splitlines() if line.strip()]  # every line is JSON
    events = {e.get("event"): e for e in lines}
    started = events["started"]
    assert started["listen"] == sc.target and started["algorithm"] == "ed25519" and "default" in started["policies"]
    abort = events["abort"]
    assert (abort["session"], abort["step"], abort["level"]) == ("logged-1", 1, "info")
    assert [t["code"] for t in abort["trips"]] == ["non_finite"] and set(abort["trips"][0]) == {"code", "action"}
    assert events["stopping"]["signal"] == "SIGTERM"
    assert lines[-1]["event"] == "stopped"
