"""The Prometheus exporter: what each event counts, and a real sidecar's /metrics."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from engine_adapters.client import GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.config import parse_config
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort, StepRefused
from sidecar.exporter import Exporter
from sidecar.launch import SidecarExited
from sidecar.service import GuardService
from sidecar.signing import Signer

from .conftest import free_port

V = 64
VOCAB = [f" w{i}".encode() for i in range(V)]
POLICY = {
    "guards": {"rank": {"enabled": True, "threshold": 0}},
    "gate": {"enabled": False},
    "loop_guard": {"enabled": False},
    "drift": {"enabled": False},
    "rules": [{"id": "no-w7", "kind": "literal", "patterns": [" w7"], "action": "block"}],
}


def peaked(top: int, second: int | None = None) -> np.ndarray:
    x = np.random.default_rng(top).standard_normal(V).astype(np.float32)
    x[top] = 9.0
    if second is not None:
        x[second] = 8.5
    return x


def inline(s, step: int, x: np.ndarray) -> pb.StepRequest:
    logits = pb.InlineLogits(data=x.astype("<f4").tobytes(), dtype=pb.DTYPE_F32)
    return pb.StepRequest(session_id=s.session_id, session_secret=s.secret, step=step, inline=logits)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_each_event_is_counted_under_bounded_labels(keys) -> None:
    svc = GuardService(parse_config({"policies": {"default": POLICY}}), Signer.from_file(keys.private))
    reg = CollectorRegistry()
    ex = Exporter(reg, lambda: svc.live_sessions)
    svc.on_drop.append(ex.session_gone)
    d = svc.register_vocabulary(VOCAB).digest
    hot = pb.SamplingParams(temperature=1.0, seed=3)
    s = svc.open_session(pb.OpenSessionRequest(session_id="secret-session-name", vocab_digest=d, sampling=hot))
    ex.session_opened(s.session_id)
    outcomes = []
    for step, x in enumerate([peaked(3), peaked(5, 9), peaked(7, 2), peaked(11, 12), np.full(V, np.nan, np.float32)]):
        v = svc.step(inline(s, step, x))
        ex.note_verdict(s.session_id, v, 2e-4)
        outcomes.append(v.decision)
    assert value(reg, "fse_verdicts_total", decision="accept") == 0  # noted, not yet counted: the answer goes first
    ex.flush()
    assert value(reg, "fse_live_sessions") == 1.0
    names = ((pb.DECISION_ACCEPT, "accept"), (pb.DECISION_HEALED, "healed"), (pb.DECISION_ABORT, "abort"))
    n = {d: outcomes.count(k) for k, d in names}
    for decision, count in n.items():
        assert value(reg, "fse_verdicts_total", decision=decision) == count
    assert n["abort"] == 1 and n["healed"] >= 1  # the NaN row aborts; a hot draw of a runner-up heals
    assert value(reg, "fse_redos_total", outcome="healed") == n["healed"]
    assert value(reg, "fse_policy_hits_total", rule="no-w7", action="block") == 1  # " w7" proposed at step 2
    assert value(reg, "fse_guard_trips_total", guard="non_finite") == 1
    assert value(reg, "fse_guard_trips_total", guard="rank") >= 1
    assert value(reg, "fse_verdict_latency_seconds_count") == 5
    assert value(reg, "fse_token_neg_logprob_nats_count") == 4  # NaN metrics are not observed
    assert value(reg, "fse_sessions_by_health_band", band="halt") == 1  # the non-finite row's band
    ex.step_refused(9)
    assert value(reg, "fse_steps_refused_total", code="FAILED_PRECONDITION") == 1
    svc.close_session(s.session_id, s.secret)
    assert value(reg, "fse_sessions_closed_total", outcome="aborted") == 1
    assert value(reg, "fse_live_sessions") == 0.0
    # No label anywhere holds the session id (or any free text).
    for family in reg.collect():
        for sample in family.samples:
            assert "secret-session-name" not in repr(sample.labels)


def test_a_real_sidecar_serves_metrics_that_promtool_accepts(start_sidecar, keys, promtool) -> None:
    port = free_port()
    sc = start_sidecar(policies={"default": POLICY}, metrics={"listen": f"127.0.0.1:{port}"})
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    s = c.open_session(digest, SamplingParams(temperature=0.0))
    for top in (3, 5, 9):
        assert s.step(peaked(top)).token_id == top
    with pytest.raises(GuardAbort):
        s.step(np.full(V, np.inf, np.float32))
    s.close()
    refused = c.open_session(digest, SamplingParams())
    refused.next_step = 4  # out of order: refused in-band, counted by status code
    with pytest.raises(StepRefused):
        refused.step(peaked(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("fse_verdicts_total", (("decision", "accept"),))] == 3
    assert samples[("fse_verdicts_total", (("decision", "abort"),))] == 1
    assert samples[("fse_sessions_opened_total", ())] == 2
    assert samples[("fse_sessions_closed_total", (("outcome", "aborted"),))] == 1
    assert samples[("fse_steps_refused_total", (("code", "FAILED_PRECONDITION"),))] == 1
    assert samples[("fse_verdict_latency_seconds_count", ())] == 4
    assert "fse_build_info" in {s.name for f in families.values() for s in f.samples}
    # the process collector: the sidecar's own CPU and memory beside the guard's series
    assert samples[("process_resident_memory_bytes", ())] > 10e6 and samples[("process_cpu_seconds_total", ())] > 0
    assert ("python_info", ()) not in samples and "python_info" in {s.name for f in families.values() for s in f.samples}
    assert not [line for line in text.splitlines() if "_created" in line]  # no timestamp series per metric
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    c.close()


def test_a_metrics_address_that_cannot_be_bound_stops_the_sidecar_with_a_clear_error(start_sidecar) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SidecarExited, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_sidecar(metrics={"listen": f"127.0.0.1:{port}"}).proc.wait(10)


def test_every_guard_code_the_sidecar_can_trip_has_a_series_from_the_start() -> None:
    import re
    from pathlib import Path

    from sidecar.core.guards import _CHECKS
    from sidecar.exporter import GUARDS

    src = "\n".join(p.read_text() for p in Path(__file__).resolve().parents[1].joinpath("sidecar").rglob("*.py"))
    literal = set(re.findall(r'Trip\(\s*"(\w+)"', src))
    assert literal and literal | {name for name, _, _ in _CHECKS} <= set(GUARDS)
    reg = CollectorRegistry()
    Exporter(reg)
    assert all(
        value(reg, "fse_guard_trips_total", guard=g) == 0
        and reg.get_sample_value("fse_guard_trips_total", {"guard": g}) is not None
        for g in GUARDS
    )


def _threads(pid: int) -> int:
    return int(next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("Threads:")).split()[1])


def test_slow_metrics_clients_hold_a_bounded_number_of_threads_and_are_cut_off(start_sidecar) -> None:
    # prometheus_client's own server kept a thread per half-sent request, for ever
    port = free_port()
    sc = start_sidecar(metrics={"listen": f"127.0.0.1:{port}"})
    url = f"http://127.0.0.1:{port}/metrics"
    assert urllib.request.urlopen(url, timeout=10).status == 200
    before = _threads(sc.proc.pid)
    held = []
    for _ in range(60):  # request lines that never end
        c = socket.create_connection(("127.0.0.1", port), timeout=15)
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        held.append(c)
    time.sleep(0.5)
    assert _threads(sc.proc.pid) <= before + 16 + 1, (before, _threads(sc.proc.pid))
    answers = []
    for c in held:  # 16 are cut off by the read timeout (5 s); the rest were answered 503 at once
        answers.append(b"".join(iter(lambda c=c: c.recv(65536), b"")))
        c.close()
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert len(busy) >= 60 - 16 and all(a in (b"",) or a.startswith(b"HTTP/1.1 503") for a in answers)
    assert urllib.request.urlopen(url, timeout=10).status == 200  # the slots came back
    assert _threads(sc.proc.pid) <= before + 1
