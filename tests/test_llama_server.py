"""fse-engine-llama: the guarded llama.cpp engine of the Kubernetes example, over real HTTP,
a real sidecar process and the embedded model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

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
def engine(start_sidecar, request, tmp_path) -> Iterator[tuple[int, object, subprocess.Popen]]:
    """(port, sidecar, process); ``request.param``: more arguments for fse-engine-llama.
    Its log goes to ``tmp_path / "engine.log"``."""
    sc = start_sidecar()
    port = free_port()
    log = (tmp_path / "engine.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_adapters.llama_server", "--listen", f"127.0.0.1:{port}", *getattr(request, "param", [])],
        env={**os.environ, "FSE_SIDECAR": sc.target, "FSE_PUBLIC_KEY": str(sc.public_key)},
        stderr=log,
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
    log.close()


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
        if word is None:  # an unknown policy is the sidecar's refusal, and the client's mistake: 400, not retryable
            assert status == 400 and "policy 'nope' is not configured" in answer["error"]["message"], answer
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


def _raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: c.recv(65536), b""))


def test_malformed_requests_are_400s_and_never_tear_the_guarded_model_down(engine, tmp_path) -> None:
    port, _, _ = engine
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body, word in [
        (deep, "nested too deeply"),
        (b'{"prompt": "hi \\ud800 there"}', "prompt is not valid Unicode: surrogates not allowed at character 3"),
        (json.dumps({"prompt": "x", "top_k": 10**30}).encode(), "top_k must be in [0, 2^32)"),
        (json.dumps({"prompt": "x", "seed": -1}).encode(), "seed must be in [0, 2^64)"),
    ]:
        status, answer = _call(port, "POST", "/v1/completions", body)
        assert status == 400 and word in answer["error"]["message"], (word, answer)
    assert _complete(port, prompt="Hello", max_tokens=2)[0] == 200
    # a request line with control characters: escaped in the log, never a forged line
    reply = _raw(port, b"GET /x\r\x1b[31mFAKE\x07 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.")
    time.sleep(0.3)
    text = (tmp_path / "engine.log").read_bytes()
    assert b"\x1b" not in text and b"\x07" not in text and b"\\x1b[31mFAKE\\x07" in text, text[-2000:]


@pytest.mark.parametrize("engine", [["--io-timeout", "1", "--max-connections", "8"]], indirect=True)
def test_half_sent_requests_are_cut_off_and_open_connections_are_capped(engine) -> None:
    port, _, _ = engine
    held = []
    for i in range(8):  # headers that never end, and a body that never comes
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n" + (b"\r\n{" if i % 2 else b""))
        held.append(c)
    # all eight slots are taken: a ninth connection is answered 503 at once
    busy = _raw(port, b"GET /healthz HTTP/1.1\r\n\r\n", timeout=5)
    assert busy.startswith(b"HTTP/1.1 503") and b"too many open connections" in busy
    t0 = time.monotonic()
    for c in held:  # each is closed by the engine after its second without bytes
        tail = b"".join(iter(lambda c=c: c.recv(65536), b""))
        assert not tail or tail.startswith(b"HTTP/1.") and b" 408 " in tail.split(b"\r\n")[0], tail
        c.close()
    assert time.monotonic() - t0 < 8  # not held for ever (the bound is generous: 1 s timeouts)
    assert _call(port, "GET", "/healthz")[0] == 200  # the slots came back


def test_the_listen_backlog_takes_a_burst_and_every_connection_is_answered(engine) -> None:
    port, _, _ = engine
    ss = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout.split()
    assert int(ss[2]) >= 128, ss  # a listening socket's Send-Q is its backlog (it was 5)

    def health() -> int:
        return _call(port, "GET", "/healthz")[0]

    with ThreadPoolExecutor(48) as pool:
        assert sorted(pool.map(lambda _: health(), range(48))) == [200] * 48


def test_readiness_fails_while_the_sidecar_signs_with_a_key_the_engine_does_not_trust(start_sidecar, other_keys) -> None:
    sc = start_sidecar(signing=other_keys)
    port = free_port()
    trusted = start_sidecar().public_key  # the engine trusts this sidecar's key, and talks to the other one
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_adapters.llama_server", "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "FSE_SIDECAR": sc.target, "FSE_PUBLIC_KEY": str(trusted)},
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = _call(port, "GET", "/healthz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert (
            status == 503
            and "the sidecar signs with key" in body["error"]["message"]
            and "this engine trusts" in body["error"]["message"]
        )
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_request_without_a_seed_draws_with_a_random_one() -> None:
    """A fixed default seed would draw every unseeded request's token at a step from the
    same uniform number (one far-tail draw on every request at once); a given seed is kept."""
    seeds = {parse_completion(b'{"prompt": "x"}', 10).sampling.seed for _ in range(8)}
    assert len(seeds) == 8
    assert parse_completion(b'{"prompt": "x", "seed": 3}', 10).sampling.seed == 3
