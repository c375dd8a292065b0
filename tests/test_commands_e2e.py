"""The README's main job and the benchmark, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_prints_verdicts_ecg_and_summary() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--max-tokens", "12", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OpenMP wait: bounded (GOMP_SPINCOUNT=1000)" in r.stdout  # set before llama.cpp loaded libgomp
    lines = r.stdout.splitlines()
    token_lines = [ln for ln in lines if ln[:4].strip().isdigit() and ("ACCEPT" in ln or "HEALED" in ln)]
    assert len(token_lines) >= 1
    assert any(ln.strip().startswith("entropy") for ln in lines)  # the ECG
    assert any(ln.startswith("summary:") and "tokens" in ln for ln in lines)
    assert any(ln.startswith("audit chain head: ") for ln in lines)
    verified = "VERIFIED: chain, checkpoints and receipt signed and checked"
    assert any(ln.startswith("audit file: ") and verified in ln for ln in lines)


def test_demo_shows_the_verdict_that_ended_the_answer() -> None:
    """End-of-sequence has no text but a verified verdict: the demo prints it as the last
    step and counts it."""
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--prompt", "What is the capital of France?", "--temperature", "0"]
        + ["--max-tokens", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    steps = [ln for ln in lines if ln[:4].strip().isdigit() and " ACCEPT " in ln]
    assert steps[-1].split()[1:3] == ["(end)", "ACCEPT"] and int(steps[-1].split()[0]) == len(steps) - 1 < 32
    summary = next(ln for ln in lines if ln.startswith("summary:"))
    assert f"summary: {len(steps) - 1} tokens and end-of-sequence in" in summary and f"ACCEPT {len(steps)}," in summary


def test_bench_writes_json_and_prints_tables(tmp_path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "--rounds", "20", "--tokens", "6", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert {row["vocab"] for row in data["transport"]} == {32768, 131072}
    for row in data["transport"]:
        assert all(row[k]["p50_us"] > 0 for k in ("echo", "ring", "inline", "echo_hmac", "ring_hmac"))
        assert row["ring_hmac_over_echo_hmac_median"] > 0
    assert [row["vocab"] for row in data["metrics"]] == [32768, 49152, 131072]
    audit = data["audit"]
    assert all(audit[m]["p50_us"] > 0 for m in ("off", "close", "interval", "every_frame"))
    assert all(300 < audit[f"{m}_bytes_per_frame"] < 5000 for m in ("close", "interval", "every_frame"))  # frames were written
    assert data["model"]["identical_greedy_output"] is True  # every guarded run and both floors
    m = data["model"]
    assert m["ed25519_step_latency"]["n"] == m["hmac_step_latency"]["n"] == m["ed25519_shm_step_latency"]["n"] > 0
    assert all(m[f"{k}_phases_us_p50"]["wait"] > 0 for k in ("ed25519", "hmac_shm"))
    assert all(m[f"{k}_over_unguarded_median"] > 0 for k in ("transport_floor", "lane_floor"))  # both lanes' floors ran
    assert all(data["lane"][k]["p50_us"] > 0 for k in ("eventfd_ping", "lane_echo", "lane_step", "grpc_echo", "grpc_step"))
    for table in (
        "verdict round trip",
        "metrics of one row",
        "fast lane round trip",
        "step latency with the audit file",
        "SmolLM2-135M",
    ):
        assert table in r.stdout


def test_bench_fse_compares_every_rule_set_with_the_rescan(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = ["bench", "fse", "--fse-tokens", "300", "--fse-rounds", "1", "--rescan-reps", "1", "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "sidecar", *cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    everything = json.loads((tmp_path / "bench-fse.json").read_text())
    data, reload = everything["fse"], everything["reload"]
    assert reload["reload_s"] > 0 and reload["idle"]["steps"] > 0 and reload["reloading"]["steps"] > 0
    assert all(reload[k]["max_us"] >= reload[k]["p99_us"] >= reload[k]["p50_us"] > 0 for k in ("idle", "reloading"))
    assert data["tokens"] == 300 and data["tokenizer"].startswith("SmolLM2")
    assert [row["rules"] for row in data["rows"]] == [
        "10 literals",
        "1000 literals",
        "10000 literals",
        "100000 literals",
        "100000 literals, normalize",
        "10 regexes",
        "100 regexes",
        "1000 regexes",
    ]
    for row in data["rows"]:
        assert row["fse_us_per_token_median"] > 0 and row["fse_over_10_literals_median"] > 0
        assert set(row["rescan_us_at_token"]) == set(row["fse_us_at_token"]) == {"30", "150", "300"}
    assert "FSE: check + commit one token" in r.stdout and "while ReloadPolicy compiles" in r.stdout


def test_bench_quality_reports_every_group_guarded_and_unguarded(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = ["bench", "quality", "--healthy", "1", "--garbage", "1", "--loops", "1", "--legit", "1", "--max-tokens", "24"]
    cmd += ["--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "sidecar", *cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "bench-quality.json").read_text())
    names = ["healthy-greedy", "healthy-t0.7", "healthy-t0.7-penalty", "garbage-t1.5", "garbage-t3.0"]
    names += ["loop-greedy", "loop-variant-t0.4", "legit-repeat"]
    assert list(data["groups"]) == names
    for by in data["groups"].values():
        assert set(by) == {"guarded", "unguarded", "texts"}
        assert by["unguarded"]["heals_per_100_tokens"] == 0 and by["unguarded"]["aborted"] == 0  # everything off
        assert by["unguarded"]["stubs"] == 0 and 0 <= by["guarded"]["completed"] <= 1
        assert by["unguarded"]["changed"] == 0 and by["unguarded"]["heals_by_cause"] == {}
        # every run starts from an empty context: a token differs from the twin's only where the guard acted
        assert by["guarded"]["changed_unexplained"] == 0 and 0 <= by["guarded"]["changed"] <= 1
        assert all(t["guarded"] and t["unguarded"] for t in by["texts"])
        assert 0 <= by["guarded"]["loops_caught"] <= by["guarded"]["twin_loops"] <= by["guarded"]["runs"]
    # the greedy healthy answer is English: the dictionary knows most of its words
    assert data["groups"]["healthy-greedy"]["unguarded"]["dictionary_share_median"] > 0.8
    hot = data["groups"]["garbage-t3.0"]
    assert hot["unguarded"]["max16_nlp_median"] > hot["guarded"]["max16_nlp_median"]
    # T=3's far-tail draws: many, each with a large tail (the sampler goes there often), none let through
    assert hot["guarded"]["far_tail_draws"] > 0 and hot["guarded"]["far_tail_let_through"] == 0
    assert hot["guarded"]["far_tail_tail_median"] > 0.01 and hot["unguarded"]["far_tail_draws"] == 0  # guards off
    assert "quality: SmolLM2-135M" in r.stdout and "far-tail draws (the -log p guard's trips" in r.stdout


def test_bench_http_sets_the_server_beside_the_same_generation_in_process(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = ["bench", "http", "--tokens", "12", "--http-rounds", "2", "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "sidecar", *cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "bench-http.json").read_text())
    assert data["same_text"] is True  # the same tokens both ways: the comparison is like for like
    assert len(data["per_round"]) == 2 and all(p[k]["tokens"] == 12 for p in data["per_round"] for k in ("in_process", "http"))
    assert data["tok_s_ratio"] > 0 and data["in_process"]["ttft_ms"] > 0 and data["http"]["ttft_ms"] > 0
    assert "HTTP/in-process tokens/s" in r.stdout


def test_bench_contention_runs_every_lane_quiet_and_loaded_and_counts_failed_steps(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = ["bench", "contention", "--tokens", "6", "--contention-rounds", "1", "--omp-policies", "bounded,passive"]
    cmd += ["--load-procs", "1"]
    r = subprocess.run([sys.executable, "-m", "sidecar", *cmd, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "bench-contention.json").read_text())
    assert set(data["runs"]) == {"quiet/bounded", "quiet/passive", "loaded/bounded", "loaded/passive"}
    for run in data["runs"].values():
        assert set(run["tok_s"]) == {"unguarded", "grpc", "shm", "shm_spec"} and all(len(v) == 1 for v in run["tok_s"].values())
        assert run["failures"] == []  # a live sidecar: no step fails, loaded or not
    assert "fast + speculation" in r.stdout


def test_bench_step_times_every_stage_warm_cold_and_idle_for_both_signatures(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = ["bench", "step", "--step-rows", "12", "--step-passes", "1", "--evict-mb", "8", "--idle-ms", "2"]
    r = subprocess.run([sys.executable, "-m", "sidecar", *cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "bench-step.json").read_text())["step"]
    assert (data["rows"], data["passes"], data["evict_mb"], data["idle_ms"]) == (12, 1, 8, 2.0)
    for name in ("hmac/warm", "hmac/cold", "hmac/idle", "ed25519/warm", "ed25519/cold", "ed25519/idle"):
        stages = [data[name][f"{s}_us_p50"] for s in ("write", "sidecar", "verify")]
        assert all(v > 0 for v in stages) and data[name]["total_us_p50"] >= max(stages)
    for ratio in ("hmac_cold_over_warm", "hmac_idle_over_warm", "ed25519_cold_over_warm", "ed25519_idle_over_warm"):
        assert data[ratio] > 0
    assert "the guard's CPU per token in one process" in r.stdout
    bad_cmd = [sys.executable, "-m", "sidecar", "bench", "step", "--idle-ms", "-1"]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "milliseconds must be finite and >= 0" in bad.stderr
