"""fse-engine-llama: the guarded OpenAI-compatible llama.cpp server, over real HTTP, with a
real sidecar process, the embedded model, the ``openai`` client and curl (DESIGN §10)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.conftest import CHAT, free_port

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
HALT = {"id": "no-paris", "kind": "literal", "patterns": ["Paris"], "action": "halt"}
POLICIES = {"default": {}, "nofrance": {"rules": [HALT]}, "noband": {"loop_guard": {"band_tokens": 0}}}


@dataclass
class Served:
    port: int
    sidecar: object
    proc: subprocess.Popen
    log: Path
    audit: Path

    @property
    def api(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=120)


def _call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def _post(port: int, path: str, **body: object) -> tuple[int, dict, dict]:
    return _call(port, "POST", path, json.dumps(body).encode())


def _start(sc, port: int, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine_adapters.llama_server", "--listen", f"127.0.0.1:{port}", *args],
        env={**os.environ, "FSE_SIDECAR": sc.target, "FSE_PUBLIC_KEY": str(sc.public_key)},
        stderr=log.open("ab"),
    )


def _wait_up(port: int, proc: subprocess.Popen, want: int = 200) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if _call(port, "GET", "/healthz", timeout=5)[0] == want:
                return
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "fse-engine-llama did not start"
        time.sleep(0.2)


@pytest.fixture
def served(start_sidecar, request, tmp_path) -> Iterator[Served]:
    """The server beside a sidecar with the policies above; ``request.param``: more arguments."""
    audit = tmp_path / "audit"
    sc = start_sidecar(policies=POLICIES, audit={"dir": str(audit)})
    port, log = free_port(), tmp_path / "engine.log"
    proc = _start(sc, port, log, "--policies", "nofrance,noband", *getattr(request, "param", []))
    _wait_up(port, proc)
    yield Served(port, sc, proc, log, audit)
    proc.terminate()
    proc.wait(30)


def _stream_chat(api: openai.OpenAI, **kw: object) -> tuple[str, list]:
    chunks = list(api.chat.completions.create(model=MODEL, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_chat_through_the_openai_client_streamed_and_not_gives_the_same_verified_answer(served) -> None:
    api = served.api
    ask = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 24, "seed": 7}
    r = api.chat.completions.create(model=MODEL, **ask)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and abs(r.created - time.time()) < 300
    assert r.model == MODEL and r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert text.strip()
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24
    fse = r.model_extra["fse"]
    assert fse["policy"] == "default" and fse["receipt"]["steps"] == 24 and len(fse["receipt"]["chain_hash"]) == 64

    streamed, chunks = _stream_chat(api, stream_options={"include_usage": True}, **ask)
    assert streamed == text  # seeded: the same tokens, now chunk by chunk
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    # max_completion_tokens is the newer name of the same limit
    r2 = api.chat.completions.create(model=MODEL, messages=ask["messages"], max_completion_tokens=24, seed=7)
    assert r2.choices[0].message.content == text


def test_a_heal_that_ends_the_answer_is_counted_in_healed_tokens_as_the_receipt_counts_it(served) -> None:
    """Greedy, the model writes its sentence a third time (the loop band off, which would
    steer it off before); the loop guard refuses that copy and the redo's next candidate is
    end-of-sequence. That step yields no text, yet it is a heal: ``fse.healed_tokens``
    must agree with the session's signed receipt."""
    prompt = CHAT.format("Keep saying 'go go go go go'.")
    extra = {"extra_body": {"policy": "noband"}}
    r = served.api.completions.create(model=MODEL, prompt=prompt, max_tokens=96, temperature=0, **extra)
    fse = r.model_extra["fse"]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 96
    assert fse["receipt"]["steps"] == r.usage.completion_tokens + 1  # the end-of-sequence step
    assert fse["healed_tokens"] == fse["receipt"]["healed"] >= 1


def test_the_prompt_is_rendered_by_the_gguf_s_own_chat_template(served, llama) -> None:
    from engine_adapters.chat_template import ChatTemplate

    template = ChatTemplate.of(llama)
    assert template.source == "the GGUF's tokenizer.chat_template"
    messages = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"}]
    prompt = template.render(messages)
    assert prompt.startswith("<|im_start|>system\nYou answer in one word.<|im_end|>") and prompt.endswith("assistant\n")
    assert "helpful AI assistant" in template.render(messages[1:])  # SmolLM2's template adds its own system turn
    r = served.api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(llama.tokenize(prompt.encode(), add_bos=True, special=True))
    # the same prompt through /v1/completions (no template there) gives the same greedy answer
    c = served.api.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert c.choices[0].text == r.choices[0].message.content and c.usage.prompt_tokens == r.usage.prompt_tokens


def test_completions_streamed_and_not_end_before_a_stop_sequence(served) -> None:
    api = served.api
    prompt = "Count: 1, 2, 3, 4, 5, 6,"
    full = api.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    text = full.choices[0].text
    assert " 9," in text, text
    r = api.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[" 9,", "never"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(" 9,")]
    chunks = list(api.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=" 9,", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop" and all(" 9" not in c.choices[0].text for c in chunks)
    assert r.usage.completion_tokens < 16  # generation stopped at the stop sequence


def test_a_halt_is_content_filter_with_a_generic_message_and_the_rule_in_the_log(served) -> None:
    prompt = "Q: What is the capital of France?\nA: The capital of France is"
    want = served.api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert "Paris" in want
    args = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "extra_body": {"policy": "nofrance"}}
    r = served.api.completions.create(**args)
    assert r.choices[0].finish_reason == "content_filter"
    text = r.choices[0].text
    assert "Paris" not in text and want.startswith(text)
    assert r.model_extra["fse"]["abort"] == "the answer was stopped by the content guard"
    assert "no-paris" not in json.dumps(r.model_dump())
    chunks = list(served.api.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == "content_filter"
    time.sleep(0.3)
    assert "no-paris" in served.log.read_text()  # the operator's log names the rule


@pytest.mark.parametrize("served", [["--expose-guard-reasons"]], indirect=True)
def test_the_operator_may_expose_the_guard_s_reasons(served) -> None:
    prompt = "Q: What is the capital of France?\nA: The capital of France is"
    r = served.api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"policy": "nofrance"})
    assert r.choices[0].finish_reason == "content_filter" and "no-paris" in r.model_extra["fse"]["abort"]


def test_bad_requests_are_400s_naming_the_field_and_the_server_keeps_serving(served) -> None:
    port = served.port
    ok = {"prompt": "Hi", "max_tokens": 2}
    for path, body, param in [
        ("/v1/completions", {**ok, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**ok, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {**ok, "max_tokens": 513}, "max_tokens"),
        ("/v1/completions", {**ok, "n": 2}, "n"),
        ("/v1/completions", {**ok, "logit_bias": {"1": 5}}, "logit_bias"),
        ("/v1/completions", {**ok, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {**ok, "seed": True}, "seed"),
        ("/v1/completions", {**ok, "seed": 1.5}, "seed"),
        ("/v1/completions", {**ok, "top_k": 10**30}, "top_k"),
        ("/v1/completions", {**ok, "policy": "nope"}, "policy"),
        ("/v1/completions", {**ok, "prompt": ""}, "prompt"),
        ("/v1/completions", {**ok, "prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"max_tokens": 2}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    ]:
        status, answer, _ = _post(port, path, **body)
        assert status == 400, (body, answer)
        assert answer["error"]["param"] == param and (param is None or param in answer["error"]["message"]), (body, answer)
    status, answer, _ = _post(port, "/v1/completions", prompt="word " * 9000, max_tokens=8)
    assert status == 400 and "exceeds the context of 8192 tokens" in answer["error"]["message"], answer
    status, answer, _ = _post(port, "/v1/completions", model="gpt-4o", **ok)
    assert status == 404 and answer["error"]["param"] == "model"
    for raw, word in [
        (b"{nope", "not valid JSON"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ""),
        (b'{"prompt": "hi \\ud800 there"}', "prompt: Input should be a valid string, unable to parse raw data"),
    ]:
        status, answer, _ = _call(port, "POST", "/v1/completions", raw)
        assert status == 400 and word in answer["error"]["message"], (raw[:40], answer)
    assert _call(port, "GET", "/nowhere")[0] == 404
    xml = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=b"<a/>", headers={"Content-Type": "text/xml"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(xml, timeout=30)
    assert refused.value.code == 415 and b"Content-Type must be application/json" in refused.value.read()
    # a request line with control characters: refused, and never written raw to the log
    reply = _raw(port, b"GET /x\r\x1b[31mFAKE\x07 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    time.sleep(0.3)
    logged = served.log.read_bytes()
    assert b"\x1b" not in logged and b"\x07" not in logged and b"FAKE" not in logged, logged[-2000:]
    with pytest.raises(openai.BadRequestError, match="policy"):
        served.api.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"policy": "nope"})
    assert _post(port, "/v1/completions", **ok)[0] == 200


def test_models_list_the_served_model_and_the_openapi_document_lists_the_api(served) -> None:
    assert [m.id for m in served.api.models.list()] == [MODEL]
    assert served.api.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        served.api.models.retrieve("gpt-4o")
    status, doc, _ = _call(served.port, "GET", "/openapi.json")
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    post = doc["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in post["responses"] and {"400", "429", "503"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]


def test_curl_streams_server_sent_events_ending_in_done(served) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True, "seed": 1})
    out = subprocess.run(
        ["curl", "-sS", "-N", "-d", body,  # curl's own Content-Type (form-urlencoded), as users type it
         f"http://127.0.0.1:{served.port}/v1/chat/completions"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    events = [e for e in out.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] == "length"


def _audit_closes(audit: Path) -> list[dict]:
    closes = []
    for f in audit.glob("*.audit"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "close":
                closes.append(rec)
    return closes


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_generation_and_closes_its_session(served, stream: bool) -> None:
    ask = {"prompt": "Count: 1, 2, 3, 4, 5, 6,", "temperature": 0}
    # greedy counting does not end by itself: left alone it runs to max_tokens
    assert _post(served.port, "/v1/completions", **ask, max_tokens=150)[1]["choices"][0]["finish_reason"] == "length"
    before = len(_audit_closes(served.audit))
    body = json.dumps({**ask, "max_tokens": 400, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as c:
        c.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if stream:  # three events, then away
            got = b""
            while got.count(b"data: ") < 3:
                more = c.recv(4096)
                assert more, got
                got += more
        else:  # away while the answer is being made
            time.sleep(0.5)
    # the session is closed long before its 400 steps (about 60 a second here)
    deadline = time.monotonic() + 30
    while len(closes := _audit_closes(served.audit)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(closes) == before + 1, "no session was closed"
    steps = sorted(c["receipt"]["steps"] for c in closes)
    assert steps[0] < 100 and steps[-1] == 150, steps
    assert _post(served.port, "/v1/completions", prompt="Hi", max_tokens=2)[0] == 200  # the engine is free again


@pytest.mark.parametrize("served", [["--queue", "4"]], indirect=True)
def test_a_burst_of_24_requests_is_answered_every_one_the_overflow_with_429_and_retry_after(served) -> None:
    def one(i: int) -> tuple[int, dict, dict]:
        return _post(served.port, "/v1/completions", prompt=f"Say {i}.", max_tokens=8, seed=i)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(24)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 5, codes  # one running and four waiting, at least
    for status, body, headers in answers:
        if status == 429:
            assert headers.get("retry-after") == "1" and body["error"]["type"] == "rate_limit_error"
        else:
            assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1
    # the openai client retries a 429 after Retry-After on its own
    retrying = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="none", max_retries=8)
    with ThreadPoolExecutor(12) as pool:
        done = list(pool.map(lambda i: retrying.completions.create(model=MODEL, prompt="Hi", max_tokens=4, seed=i), range(12)))
    assert all(d.choices[0].finish_reason in ("stop", "length") for d in done)


def _raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: c.recv(65536), b""))


@pytest.mark.parametrize("served", [["--io-timeout", "1", "--max-connections", "8"]], indirect=True)
def test_slow_clients_are_cut_off_and_open_connections_are_capped(served) -> None:
    port = served.port
    held = []
    for i in range(7):  # headers that never end, and bodies that never come
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n" + (b"\r\n{" if i % 2 else b""))
        held.append(c)
    time.sleep(0.2)
    # seven held, and this one: the cap of eight is reached, the ninth is turned away at once
    with socket.create_connection(("127.0.0.1", port), timeout=10) as eighth:
        eighth.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        busy = _raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        assert busy.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in busy and b"too many open connections" in busy, busy
    t0 = time.monotonic()
    for i, c in enumerate(held):  # each is answered 408 and closed after its second
        tail = b"".join(iter(lambda c=c: c.recv(65536), b""))
        assert tail.startswith(b"HTTP/1.1 408"), (i, tail)
        assert (b"body did not arrive" if i % 2 else b"headers did not arrive") in tail, tail
        c.close()
    assert time.monotonic() - t0 < 8  # not held for ever (the bound is generous: 1 s timeouts)
    assert _call(port, "GET", "/healthz")[0] == 200  # the slots came back
    # a client that reads its stream slowly still gets every event, and the server serves others meanwhile
    body = json.dumps({"prompt": "Hi", "max_tokens": 8, "stream": True, "seed": 2}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        assert _post(port, "/v1/completions", prompt="Hi", max_tokens=2)[0] == 200
        got = b""
        while b"[DONE]" not in got:
            time.sleep(0.05)
            more = slow.recv(64)
            assert more, got
            got += more
    assert got.startswith(b"HTTP/1.1 200")


def test_the_listen_backlog_takes_a_burst_and_every_connection_is_answered(served) -> None:
    port = served.port
    ss = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout.split()
    assert int(ss[2]) >= 128, ss  # a listening socket's Send-Q is its backlog

    with ThreadPoolExecutor(48) as pool:
        assert sorted(pool.map(lambda _: _call(port, "GET", "/v1/models")[0], range(48))) == [200] * 48


def test_no_sidecar_means_503_with_retry_after_and_no_text_then_it_recovers(served) -> None:
    port, sc = served.port, served.sidecar
    assert _post(port, "/v1/completions", prompt="Hello", max_tokens=3)[0] == 200
    sc.stop()
    for stream in (False, True):
        status, body, headers = _post(port, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], stream=stream)
        assert status == 503 and headers.get("retry-after") == "1" and "choices" not in body, body
        assert body["error"]["message"] == "the content guard could not check the answer; try again"
    assert _call(port, "GET", "/healthz")[0] == 503
    with pytest.raises(openai.InternalServerError):
        served.api.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    # the native sidecar restarts with an empty memory: the engine registers its vocabulary again
    sc.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(sc.config)])
    sc.wait_started()
    status, body, _ = _post(port, "/v1/completions", prompt="Hello", max_tokens=3)
    assert status == 200, body


def test_a_sidecar_killed_mid_stream_ends_the_stream_with_an_error_event_and_only_verified_text(served) -> None:
    port, sc = served.port, served.sidecar
    ask = {"prompt": "Write a long story about a dragon.", "max_tokens": 300, "seed": 11, "temperature": 0.7}
    body = json.dumps({**ask, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    events: list[bytes] = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        buf = b""
        while chunk := r.read1(65536):
            buf += chunk
            *done, buf = buf.split(b"\n\n")
            events += done
            if len(events) == 5:
                sc.proc.send_signal(signal.SIGKILL)
    assert events[-1].startswith(b'data: {"error"') and b"[DONE]" not in b"".join(events), events[-3:]
    error = json.loads(events[-1][6:])["error"]
    assert error["message"] == "the content guard could not check the answer; try again"
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert streamed and len(events) < 300
    # what was streamed is the start of what a healthy guard verifies for the same seeded request
    sc.proc.wait(10)
    sc.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(sc.config)])
    sc.wait_started()
    status, whole, _ = _post(port, "/v1/completions", **ask)
    assert status == 200 and whole["choices"][0]["text"].startswith(streamed)


def test_sigterm_stops_the_engine_cleanly(served) -> None:
    served.proc.terminate()
    assert served.proc.wait(30) == 0


def test_readiness_fails_while_the_sidecar_signs_with_a_key_the_engine_does_not_trust(start_sidecar, other_keys) -> None:
    sc = start_sidecar(signing=other_keys)
    trusted = start_sidecar().public_key  # the engine trusts this sidecar's key, and talks to the other one
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_adapters.llama_server", "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "FSE_SIDECAR": sc.target, "FSE_PUBLIC_KEY": str(trusted)},
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_up(port, proc, want=503)
        status, body, _ = _call(port, "GET", "/healthz")
        message = body["error"]["message"]
        assert status == 503 and "the sidecar signs with key" in message and "this engine trusts" in message
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_model_without_a_chat_template_is_refused_at_start_unless_one_is_given(start_sidecar, tmp_path) -> None:
    sc = start_sidecar()
    missing = tmp_path / "none.jinja"
    proc = subprocess.run(
        [sys.executable, "-m", "engine_adapters.llama_server", "--chat-template", str(missing)],
        env={**os.environ, "FSE_SIDECAR": sc.target, "FSE_PUBLIC_KEY": str(sc.public_key)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and f"--chat-template: cannot read {missing}" in proc.stderr


def test_the_server_answers_as_its_own_openapi_document_says(start_sidecar, tmp_path) -> None:
    """schemathesis, every check it has, against the running server's own /openapi.json: no
    5xx, status codes, content types and bodies as documented, invalid data refused, valid
    data accepted, undocumented methods 405. A small --max-tokens keeps each generation short."""
    sc = start_sidecar(policies=POLICIES)
    port, log = free_port(), tmp_path / "engine.log"
    proc = _start(sc, port, log, "--max-tokens", "6", "--policies", "nofrance")
    try:
        _wait_up(port, proc)
        run = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"http://127.0.0.1:{port}/openapi.json",
             "--checks", "all", "--max-examples", "25", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("served", [["--log-format", "json"]], indirect=True)
def test_the_access_log_is_one_json_object_per_request_with_latency_and_finish_reason(served) -> None:
    prompt = "Q: What is the capital of France?\nA: The capital of France is"
    plain = served.api.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    chunks = list(served.api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                                extra_body={"policy": "nofrance"}))  # fmt: skip
    assert _post(served.port, "/v1/completions", model=MODEL, prompt=prompt, max_tokens="5")[0] == 400
    served.proc.terminate()
    assert served.proc.wait(30) == 0
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in lines)
    started = next(e for e in lines if e.get("event") == "started")
    assert started["model"] == MODEL and started["lane"] == "grpc" and "nofrance" in started["policies"]
    access = [e for e in lines if e.get("event") == "request" and e["path"] == "/v1/completions"]
    assert [(e["status"], e.get("finish_reason"), e.get("stream")) for e in access] == [
        (200, "length", False),
        (200, "content_filter", True),
        (400, None, None),
    ]
    assert access[0]["request_id"] == plain.id and access[1]["request_id"] == chunks[0].id
    assert access[0]["completion_tokens"] == 5 and access[0]["policy"] == "default" and access[1]["policy"] == "nofrance"
    assert all(e["latency_ms"] >= e["first_byte_ms"] > 0 for e in access)
    assert "Paris" not in served.log.read_text()  # no generated text in the log
    assert lines[-1]["event"] == "stopped"
