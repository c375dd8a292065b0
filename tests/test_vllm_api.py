"""The guard's middleware for vLLM's OpenAI server, driven as an ASGI server drives it, in
front of an app that answers as vLLM's does (tests/test_vllm_real.py runs it in front of
real vLLM). These pin the edges real vLLM rarely shows: SSE events split across body
messages, a request whose outcome the engine recorded at each point of a stream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from engine_adapters.outcomes import Outcome, OutcomeBoard
from engine_adapters.vllm_api import FseGuardMiddleware


def sse(*events: dict[str, Any] | str) -> list[bytes]:
    return [b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n" for e in events]


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish, "stop_reason": None}]}


class App:
    """Answers as vLLM does; records the request it got; ``outcome`` is put on the board
    (as the engine would) before the body part at index ``at`` is sent."""

    def __init__(self, board: OutcomeBoard, parts: list[bytes], outcome: Outcome | None = None, at: int = 0, status: int = 200):
        self.board, self.parts, self.outcome, self.at, self.status = board, parts, outcome, at, status
        self.request: dict[str, Any] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        raw = b""
        while True:
            m = await receive()
            raw += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.request = json.loads(raw)
        assert dict(scope["headers"])[b"content-length"] == str(len(raw)).encode()
        await send({"type": "http.response.start", "status": self.status, "headers": [(b"content-type", b"text/event-stream")]})
        for i, part in enumerate(self.parts):
            if self.outcome is not None and i == self.at:
                self.board.record(self.request["vllm_xargs"]["fse_request"], self.outcome)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def call(
    mw: FseGuardMiddleware, body: bytes | dict, path: str = "/v1/completions", method: str = "POST"
) -> tuple[int, dict, bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got: list[dict] = []
    inbox = [
        {"type": "http.request", "body": raw[:5], "more_body": True},
        {"type": "http.request", "body": raw[5:], "more_body": False},
    ]

    async def receive() -> dict:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(m: dict) -> None:
        got.append(m)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-length", str(len(raw)).encode())]}
    asyncio.run(mw(scope, receive, send))
    start = got[0]
    assert start["type"] == "http.response.start" and not got[-1].get("more_body")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in got[1:])


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OutcomeBoard:
    monkeypatch.setenv("FSE_OUTCOMES_DIR", str(tmp_path))
    monkeypatch.setenv("FSE_POLICIES", "strict")
    monkeypatch.delenv("FSE_POLICY", raising=False)
    return OutcomeBoard(tmp_path)


ABORT = Outcome("content_filter", "no-paris: halt", 2)
DOWN = Outcome("guard_error", "sidecar unavailable", 2)


def test_a_stream_the_guard_aborted_ends_with_content_filter_even_split_across_messages(board) -> None:
    events = b"".join(sse(chunk(" The"), chunk(" capital"), chunk("", "stop"), "[DONE]"))
    parts = [events[i : i + 7] for i in range(0, len(events), 7)]  # SSE events cut anywhere
    app = App(board, parts, ABORT, at=0)
    status, _, body = call(FseGuardMiddleware(app), {"prompt": "x", "stream": True})
    assert status == 200
    datas = [line[6:] for line in body.decode().split("\n\n") if line]
    assert [json.loads(d)["choices"][0]["finish_reason"] for d in datas[:-1]] == [None, None, "content_filter"]
    assert datas[-1] == "[DONE]"
    assert list(board.dir.iterdir()) == []  # taken


def test_a_guard_that_cannot_answer_before_any_text_is_a_503_with_retry_after(board) -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    app = App(board, sse(role, end, "[DONE]"), DOWN, at=0)
    status, headers, body = call(FseGuardMiddleware(app), {"messages": [], "stream": True}, "/v1/chat/completions")
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert json.loads(body)["error"]["message"] == "the content guard could not check the answer; try again"
    assert b"sidecar" not in body  # the detail is for the logs


def test_a_guard_that_fails_after_text_went_out_ends_the_stream_with_an_error_event(board) -> None:
    app = App(board, sse(chunk(" one"), chunk(" two"), chunk("", "stop"), "[DONE]"), DOWN, at=2)
    status, _, body = call(FseGuardMiddleware(app), {"prompt": "x", "stream": True})
    datas = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line]
    assert status == 200 and [d.get("choices", [{}])[0].get("text") for d in datas[:2]] == [" one", " two"]
    assert datas[-1]["error"]["code"] == 503 and len(datas) == 3  # no finish "stop", no [DONE]


@pytest.mark.parametrize(("outcome", "status"), [(None, 200), (ABORT, 200), (DOWN, 503)])
def test_a_whole_answer_gets_the_guards_outcome(board, outcome: Outcome | None, status: int) -> None:
    answer = json.dumps({"choices": [{"index": 0, "text": " The", "finish_reason": "stop", "stop_reason": None}]}).encode()
    app = App(board, [answer[:10], answer[10:]], outcome, at=1)
    got, _, body = call(FseGuardMiddleware(app), {"prompt": "x"})
    assert got == status
    if status == 200:
        assert json.loads(body)["choices"][0]["finish_reason"] == ("content_filter" if outcome else "stop")


def test_the_engine_gets_a_fresh_key_and_the_clients_policy_as_checked(board) -> None:
    app = App(board, [b"{}"])
    call(FseGuardMiddleware(app), {"prompt": "x", "vllm_xargs": {"fse_policy": "strict", "other": 1}})
    xargs = app.request["vllm_xargs"]
    assert xargs["fse_policy"] == "strict" and xargs["other"] == 1 and len(xargs["fse_request"]) == 32


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[1]", 400, "JSON object"),
        ({"prompt": "x", "n": 2}, 400, "n:"),
        ({"prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
        ({"prompt": "x", "vllm_xargs": "fse"}, 400, "vllm_xargs must be an object"),
        ({"prompt": "x", "vllm_xargs": {"fse_request": "0" * 32}}, 400, "fse_request"),
        ({"prompt": "x", "vllm_xargs": {"fse_policy": "lax"}}, 400, "'lax' is not a policy this server allows"),
        ({"prompt": "x" * 200}, 413, "over 100 bytes"),
    ],
)
def test_bad_requests_are_refused_before_the_engine_naming_the_field(board, monkeypatch, body, status: int, named: str) -> None:
    monkeypatch.setenv("FSE_MAX_BODY_BYTES", "100")
    app = App(board, [b"{}"])
    got, _, answer = call(FseGuardMiddleware(app), body)
    assert got == status and named in json.loads(answer)["error"]["message"]
    assert app.request is None  # vLLM never saw it


def test_generation_endpoints_it_cannot_report_on_are_404_and_others_pass(board) -> None:
    app = App(board, [b"{}"])
    assert call(FseGuardMiddleware(app), {"input": "x"}, "/v1/responses")[0] == 404
    assert app.request is None
    assert call(FseGuardMiddleware(app), {"prompt": "x"}, "/tokenize")[0] == 200


def test_the_middleware_refuses_to_start_without_the_board(monkeypatch) -> None:
    monkeypatch.delenv("FSE_OUTCOMES_DIR", raising=False)
    with pytest.raises(RuntimeError, match="FSE_OUTCOMES_DIR"):
        FseGuardMiddleware(App(OutcomeBoard("/nonexistent"), []))
