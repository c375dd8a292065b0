"""fse-engine-llama: the guarded llama.cpp engine of the Kubernetes example, over real HTTP,
a real sidecar process and the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from engine_adapters.llama_server import BadRequest, parse_completion
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _complete(port: int, **body: object) -> tuple[int, dict]:
    return _call(port, "POST", "/v1/completions", json.dumps(body).encode())


@pytest.fixture
def engine(start_sidecar) -> Iterator[tuple[int, object, subprocess.Popen]]:
    sc = start_sidecar()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_adapters.llama_server", "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "FSE_SIDECAR": sc.target, "FSE_PUBLIC_KEY": str(sc.public_key)},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if _call(port, "GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "fse-engine-llama did not start"
        time.sleep(0.2)
    yield port, sc, proc
    proc.terminate()
    proc.wait(30)


def test_a_completion_comes_back_with_its_verified_receipt(engine) -> None:
    port, _, _ = engine
    status, body = _complete(port, prompt="Why is the sky blue?", max_tokens=12, seed=3)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"].strip()
    assert body["usage"]["completion_tokens"] == 12
    assert body["fse"]["receipt"]["steps"] == 12 and len(body["fse"]["receipt"]["chain_hash"]) == 64
    # seeded: the same request gives the same text
    assert _complete(port, prompt="Why is the sky blue?", max_tokens=12, seed=3)[1]["choices"] == body["choices"]


def test_bad_requests_get_400_naming_the_field_and_the_engine_keeps_serving(engine) -> None:
    port, _, _ = engine
    for body, word in [
        (b"{nope", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"prompt": "x", "stream": True}).encode(), "stream"),
        (json.dumps({"prompt": "x", "policy": "nope"}).encode(), None),
    ]:
        status, answer = _call(port, "POST", "/v1/completions", body)
        if word is None:  # an unknown policy is the sidecar's refusal: no tokens
            assert status == 503 and "nope" in answer["error"]["message"], answer
        else:
            assert status == 400 and word in answer["error"]["message"], answer
    status, answer = _complete(port, prompt="word " * 2100, max_tokens=8)
    assert status == 400 and "exceeds the context of 2048 tokens" in answer["error"]["message"], answer
    assert _call(port, "GET", "/nowhere")[0] == 404
    assert _complete(port, prompt="Hello", max_tokens=3)[0] == 200


def test_no_sidecar_means_503_and_no_text_then_it_recovers_when_the_sidecar_restarts(engine) -> None:
    port, sc, _ = engine
    assert _complete(port, prompt="Hello", max_tokens=3)[0] == 200
    sc.stop()
    status, body = _complete(port, prompt="Hello", max_tokens=3)
    assert status == 503 and "choices" not in body and "no tokens" in body["error"]["message"]
    assert _call(port, "GET", "/healthz")[0] == 503
    # the native sidecar restarts with an empty memory: the engine registers its vocabulary again
    sc.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(sc.config)])
    sc.wait_started()
    status, body = _complete(port, prompt="Hello", max_tokens=3)
    assert status == 200, body


def test_sigterm_stops_the_engine_cleanly(engine) -> None:
    port, _, proc = engine
    proc.terminate()
    assert proc.wait(30) == 0


def test_parse_completion_refuses_booleans_as_numbers_and_bounds_max_tokens() -> None:
    with pytest.raises(BadRequest, match="seed must be an integer"):
        parse_completion(json.dumps({"prompt": "x", "seed": True}).encode(), 10)
    with pytest.raises(BadRequest, match=r"max_tokens must be in \[1, 10\]"):
        parse_completion(json.dumps({"prompt": "x", "max_tokens": 11}).encode(), 10)
    c = parse_completion(json.dumps({"prompt": "x", "chat": False, "temperature": 0}).encode(), 10)
    assert c.sampling.greedy and not c.chat
