"""Record and replay (issue 9, item 5): a real guarded generation recorded by
``serve --record``, judged again by ``fse-sidecar replay``: byte-identical with the same
policy; with a changed threshold it differs at the first step the change affects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from engine_adapters.client import GuardClient
from engine_adapters.llama_cpp import GuardedLlama
from sidecar.bench.quality import OFF
from sidecar.core.sampling import SamplingParams
from sidecar.launch import start_local_sidecar

from .conftest import CHAT

pytestmark = pytest.mark.slow

HOT = SamplingParams(temperature=1.1, top_k=80, seed=9, repetition_penalty=1.0)


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "replay", *args], capture_output=True, text=True, timeout=300)


def test_a_recorded_generation_replays_byte_identical_and_a_changed_threshold_differs_where_it_bites(
    llama, tmp_path, keys
) -> None:
    rec = tmp_path / "rec"
    sc = start_local_sidecar(tmp_path, {"policies": {"default": OFF}, "record_dir": str(rec)}, (keys.private, keys.public))
    sc.wait_started()
    try:
        client = GuardClient(sc.target, keys.public)
        client.wait_ready()
        with GuardedLlama(llama, client) as g:
            runs = []
            for prompt in ("Write a short poem about the sea.", "What is the capital of France?"):
                llama.reset()
                runs.append(g.complete(CHAT.format(prompt), max_tokens=32, sampling=HOT))
        client.close()
    finally:
        sc.stop()  # the recorder flushes on the way out
    assert all(r.error is None for r in runs)

    same = _replay(str(rec))
    assert same.returncode == 0, same.stdout + same.stderr
    steps = sum(r.receipt.steps for r in runs)  # an end-of-sequence step has a verdict but emits no token
    assert f"replayed 2 sessions, {steps} steps: 0 differ" in same.stdout
    assert same.stdout.count("ledger identical") == 2

    # The same traffic under a rank guard at 5: the first step whose sampled token ranked
    # above 5 now trips (known from the verdicts, independently of the replay).
    first = next(i for i, t in enumerate(runs[0].tokens) if t.verdict.metrics.rank > 5)
    stricter = {"default": {**OFF, "guards": {**OFF["guards"], "rank": {"enabled": True, "threshold": 5}}}}
    cfg = tmp_path / "new.yaml"
    cfg.write_text(yaml.safe_dump({"policies": stricter}))
    diff = _replay(str(rec), "--config", str(cfg))
    assert diff.returncode == 1, diff.stdout + diff.stderr
    line = next(ln for ln in diff.stdout.splitlines() if ln.startswith(runs[0].receipt.session_id))
    assert f"DIFFERS at step {first}: recorded accept token {runs[0].tokens[first].token_id} [no trips]" in line
    assert "rank" in line.split("replayed", 1)[1]

    meta = json.loads(next(rec.glob(f"{runs[0].receipt.session_id}.*/open.json")).read_text())
    assert meta["sampling"]["temperature"] == 1.1 and meta["policy"] == "default" and meta["model_id"].startswith("llama.cpp:")


def test_replay_refuses_what_is_not_a_recording(tmp_path) -> None:
    r = _replay(str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not a recording directory" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _replay(str(tmp_path / "empty"))
    assert r.returncode == 2 and "no recorded session" in r.stderr
