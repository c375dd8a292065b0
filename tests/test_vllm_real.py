"""The guard inside real vLLM (the CPU build, ``make setup-vllm``) and its OpenAI server,
driven through the ``openai`` client as an API user meets it (DESIGN §10).

One sidecar, one guarded server (``fse-vllm serve``) and one plain vLLM server for the
reference answers are started for the module; the sidecar is killed and restarted by
the last tests. Every request to the guarded server is guarded, whatever it leaves out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from engine_adapters import vllm_process
from engine_adapters.vllm_process import MODEL
from sidecar.launch import LocalSidecar, start_local_sidecar

pytestmark = pytest.mark.slow

HALT = {"id": "no-paris", "kind": "literal", "patterns": ["Paris"], "action": "halt"}
BLOCK = {"id": "no-blue", "kind": "literal", "patterns": ["blue"], "action": "block"}
POLICIES = {"default": {}, "strict": {"rules": [HALT]}, "blocky": {"rules": [BLOCK]}}
PROMPTS = [
    "The capital of Germany is",
    "Write a short line about the sea:",
    "One, two, three,",
    "The best thing about Python is",
    "Name three colours:",
    "Once upon a time",
    "The moon is",
    "Here is a list of fruits:",
]


def _sidecar(workdir: Path, keys: tuple[Path, Path] | None = None) -> LocalSidecar:
    (workdir / "fse.sock").unlink(missing_ok=True)  # a killed sidecar leaves its socket
    sc = start_local_sidecar(
        workdir, {"policies": POLICIES, "max_batch_rows": 64, "audit": {"dir": str(workdir / "audit")}}, keys
    )
    sc.wait_started()
    return sc


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    why = vllm_process.missing()
    if why:
        pytest.fail(why)
    work = tmp_path_factory.mktemp("vllm-real")
    rings_before = _rings()
    sc = _sidecar(work)
    env = {"FSE_SIDECAR": sc.target, "FSE_PUBLIC_KEY": str(sc.public_key), "FSE_POLICIES": "strict,blocky"}
    guarded = vllm_process.start_vllm(work / "guarded.log", guarded=True, env=env)
    plain = vllm_process.start_vllm(work / "plain.log", guarded=False)
    keys = (work / "keys" / "fse_signing.key", sc.public_key)
    ns = SimpleNamespace(work=work, sidecar=sc, guarded=guarded, plain=plain, keys=keys)
    try:
        guarded.wait_ready()
        plain.wait_ready()
        ns.engine_rings = _rings() - rings_before
        ns.g = openai.OpenAI(base_url=guarded.base_url, api_key="none", max_retries=0, timeout=120)
        ns.p = openai.OpenAI(base_url=plain.base_url, api_key="none", max_retries=0, timeout=120)
        yield ns
    finally:
        plain.stop()
        guarded.stop()
        ns.sidecar.stop()


def _rings() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("fse-ring-*")}


def audit_files(real: SimpleNamespace) -> list[Path]:
    return sorted((real.work / "audit").glob("*.audit"), key=lambda p: p.stat().st_mtime_ns)


def verdict_tokens(path: Path) -> list[int]:
    """The tokens a session's verdicts let out, in order (ACCEPT and HEALED frames)."""
    frames = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f["token_id"] for f in frames if f.get("kind") == "frame" and f["decision"] in ("accept", "healed")]


def complete(client: openai.OpenAI, prompt: str, max_tokens: int, **kw: Any) -> Any:
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"return_token_ids": True, **kw}
    )


def test_guarded_greedy_equals_unguarded_in_mixed_batches(real) -> None:
    # Eight requests at once with different lengths, some arriving later: vLLM batches them
    # and adds and removes rows as they start and finish. Run twice on each server.
    lengths = [8, 24, 40, 16, 32, 12, 28, 20]

    def run(client: openai.OpenAI) -> list[list[int]]:
        def one(i: int) -> list[int]:
            time.sleep(0.15 * (i % 3))
            return list(complete(client, PROMPTS[i], lengths[i]).choices[0].token_ids)

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(8)))

    want = run(real.p)
    before = len(audit_files(real))
    for _ in range(2):
        got = run(real.g)
        assert [g == w for g, w in zip(got, want, strict=True)] == [True] * 8
    assert len(audit_files(real)) == before + 16  # every request had a session, none asked for it


def test_a_request_that_says_nothing_of_the_guard_is_guarded_under_the_default_policy(real) -> None:
    before = len(audit_files(real))
    r = real.g.completions.create(model=MODEL, prompt="Say hi.", max_tokens=4)  # vLLM's defaults, no vllm_xargs
    assert r.choices[0].text and len(audit_files(real)) == before + 1
    genesis = json.loads(audit_files(real)[-1].read_text().splitlines()[0])
    assert genesis.get("policy") == "default"


@pytest.mark.parametrize("stream", [False, True])
def test_a_halt_ends_the_choice_with_content_filter_and_the_verified_text_up_to_it(real, stream: bool) -> None:
    prompt = "Q: What is the capital of France?\nA: The capital of France is"
    want = real.p.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    assert "Paris" in want
    args = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"vllm_xargs": {"fse_policy": "strict"}})
    if stream:
        chunks = list(real.g.completions.create(stream=True, **args))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        r = real.g.completions.create(**args)
        text, finish = r.choices[0].text, [r.choices[0].finish_reason]
    assert finish == ["content_filter"]
    assert "Paris" not in text and want.startswith(text)  # the model's own words up to the rule


def test_a_block_rule_never_lets_its_pattern_out_and_the_answer_is_healed_not_cut(real) -> None:
    prompt = "Q: What colour is the clear sky on a sunny day?\nA: The sky is"
    want = real.p.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert "blue" in want
    r = real.g.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"vllm_xargs": {"fse_policy": "blocky"}}
    )
    assert "blue" not in r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")  # the redo chose another token: a whole answer
    frames = [json.loads(line) for line in audit_files(real)[-1].read_text().splitlines()]
    assert any(f.get("decision") == "healed" for f in frames)


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"extra_body": {"ignore_eos": True}}, "ignore_eos"),
        ({"extra_body": {"min_tokens": 4}}, "min_tokens"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50": 5}}, "logit_bias"),
        ({"extra_body": {"vllm_xargs": {"fse_policy": "nope"}}}, "fse_policy"),
        ({"extra_body": {"vllm_xargs": {"fse_request": "0" * 32}}}, "fse_request"),
        ({"n": 2}, "n:"),
        ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ],
)
def test_admission_refuses_what_would_weaken_or_bypass_the_guard_naming_it(real, kw: dict, named: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        real.g.completions.create(model=MODEL, prompt="Hi", max_tokens=4, **kw)
    assert e.value.status_code == 400 and named in str(e.value)


def test_generation_endpoints_the_guard_does_not_report_on_are_not_served(real) -> None:
    with pytest.raises(openai.NotFoundError):
        real.g.responses.create(model=MODEL, input="Hi", max_output_tokens=4)


def test_streaming_chat_through_the_openai_client_equals_unguarded(real) -> None:
    messages = [{"role": "user", "content": "Name two animals."}]

    def chat(client: openai.OpenAI) -> tuple[str, str | None]:
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True)
        parts, finish = [], None
        for c in stream:
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
        return "".join(parts), finish

    want = chat(real.p)
    assert chat(real.g) == want and want[0]


def test_the_vllm_bench_measures_both_servers_side_by_side(real) -> None:
    out = real.work / "bench-vllm.json"
    cmd = [sys.executable, "-m", "sidecar", "bench", "vllm", "--guarded-url", real.guarded.base_url, "--plain-url",
           real.plain.base_url, "--vllm-batches", "1,2", "--vllm-rounds", "2", "--tokens", "4", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["batches"]) == {"1", "2"} and "guarded tok/s" in done.stdout
    for b in result["batches"].values():
        assert len(b["guarded_all"]) == len(b["unguarded_all"]) == 2 and b["ratio"] > 0


def test_sidecar_killed_mid_stream_no_token_without_its_verdict_then_a_restart_serves_again(real) -> None:
    args = dict(model=MODEL, prompt="Count from one to one hundred: one, two, three,", max_tokens=300, temperature=0)
    stream = real.g.completions.create(stream=True, extra_body={"return_token_ids": True}, **args)
    received: list[int] = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            received += list(getattr(chunk.choices[0], "token_ids", None) or []) if chunk.choices else []
            if len(received) >= 6 and real.sidecar.proc.poll() is None:
                real.sidecar.kill()  # SIGKILL, mid-stream
    assert "content guard could not check" in str(e.value)
    session = audit_files(real)[-1]
    verdicts = verdict_tokens(session)
    assert received and received == verdicts[: len(received)]  # every token the client got had its verdict
    assert len(received) < 300

    # Guarded requests while the sidecar is down: a 503 with Retry-After, never an empty "stop"
    with pytest.raises(openai.APIStatusError) as e:
        real.g.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert e.value.status_code == 503 and e.value.response.headers.get("retry-after")
    with pytest.raises(openai.APIStatusError) as e:
        list(real.g.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True))
    assert e.value.status_code == 503

    # The sidecar restarts (same socket and key, nothing of the old one kept): a client that
    # honours Retry-After is served again (the engine waits for a reconnect at most once
    # every 2 s, so a request right after the failed ones may still get the 503)
    real.sidecar = _sidecar(real.work, real.keys)
    r = complete(real.g.with_options(max_retries=3), PROMPTS[0], 8)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].token_ids == complete(real.p, PROMPTS[0], 8).choices[0].token_ids


def _leaked_segments(log: str) -> int:
    m = re.search(r"There appear to be (\d+) leaked shared_memory", log)
    return int(m.group(1)) if m else 0


def test_the_engine_closes_and_unlinks_its_ring_at_exit(real) -> None:
    assert real.engine_rings, "the guarded engine's ring is in /dev/shm while it runs"
    assert real.guarded.stop() is not None and real.plain.stop() is not None
    assert not (_rings() & real.engine_rings)
    # vLLM SIGKILLs its workers; the server unlinked the ring, the tracker found nothing of ours:
    # it names no ring of ours (it names what it could not unlink) and counts what plain vLLM
    # leaves too (stop() returned after the tracker's report: it outlives the server)
    guarded_log, plain_log = real.guarded.log_text(), real.plain.log_text()
    assert not any(name in guarded_log for name in real.engine_rings)
    assert _leaked_segments(guarded_log) == _leaked_segments(plain_log)


def test_stopping_a_server_waits_for_the_processes_it_leaves_behind(tmp_path: Path) -> None:
    # what vLLM's server does at exit: a child of its group (the resource tracker) reports late
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["sh", "-c", "(sleep 1; echo tracker report) & exit 0"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    server = vllm_process.VllmServer(proc, 0, log)
    proc.wait()  # the server has exited, its child has not
    assert server.stop() == 0
    assert "tracker report" in server.log_text() and not vllm_process.group_members(proc.pid)
