"""The soak as CI runs it, the service's memory once warm, and docs/reliability.md kept
current with the suite (tests/reliability_table.py, scripts/gen_reliability.py)."""

from __future__ import annotations

import gc
import inspect
import json
import tracemalloc

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.bench.load import LOAD_POLICY, memory_summary, run_load
from sidecar.config import SidecarConfig
from sidecar.core.sampling import SamplingParams
from sidecar.service import GuardService
from sidecar.signing import Ed25519Signer
from sidecar.wire import params_to_pb
from tests import reliability_table as table
from tests import test_fault_matrix  # noqa: F401 - registers the matrix
from tests import test_hostile_input as hostile
from tests.faults import MATRIX


def _data() -> dict:
    return json.loads(table.RESULTS.read_text())


def test_the_reliability_doc_is_the_one_made_from_the_results() -> None:
    readme = (table.ROOT / "docs" / "reliability.md").read_text()
    assert table.section(readme) == table.render(_data()), "run: python scripts/gen_reliability.py --render-only"


def test_the_results_cover_every_fault_of_the_matrix_on_its_lanes_and_all_held() -> None:
    got = {f["id"]: f for f in _data()["faults"]}
    assert sorted(got) == sorted(MATRIX), "the matrix changed: run python scripts/gen_reliability.py"
    for fid, f in MATRIX.items():
        g = got[fid]
        assert (g["group"], g["what"], g["held"]) == (f.group, f.what, f.held), fid
        assert set(g["lanes"]) == set(f.lanes), fid
        assert all(v == "passed" for v in g["lanes"].values()), f"{fid}: {g['lanes']}"


def test_the_results_cover_every_fuzz_test_and_all_held() -> None:
    tests = {name for name, fn in inspect.getmembers(hostile, inspect.isfunction) if hasattr(fn, "hypothesis")}
    assert tests == set(hostile.FUZZ_TARGETS)
    fuzz = _data()["fuzz"]
    assert {z["test"] for z in fuzz} == tests, "the fuzz tests changed: run python scripts/gen_reliability.py"
    assert all(z["outcome"] == "passed" for z in fuzz)
    calls = {m.name for m in hostile.SERVICE.methods}

    def targets(name: str) -> set[str]:
        return {z["target"].split(":")[0].removeprefix("gRPC ") for z in fuzz if z["test"] == name}

    assert targets("test_random_bytes_to_any_call_are_refused_cleanly") == calls | set(hostile._OTHER_CALLS)
    assert targets("test_well_formed_messages_with_hostile_fields_are_refused_or_answered_cleanly") == calls


def test_the_results_cover_every_finding_of_issue_28_and_all_held() -> None:
    got = _data()["edges"]
    assert [{k: v for k, v in e.items() if k != "outcome"} for e in got] == table.EDGES, (
        "the findings changed: run python scripts/gen_reliability.py"
    )
    assert all(e["outcome"] == "passed" for e in got), [e["item"] for e in got if e["outcome"] != "passed"]


def test_every_test_a_finding_names_exists() -> None:
    import importlib

    for e in table.EDGES:
        for t in e["tests"]:
            path, _, name = t.partition("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            fn = name.partition("[")[0]
            assert callable(getattr(module, fn, None)), f"issue 28 item {e['item']}: {t} does not exist"
            if "[" in name:  # a mutant, by its id
                from tests.test_mutants import MUTANTS

                assert name.partition("[")[2].rstrip("]") in {m.name for m in MUTANTS}, t


def test_the_published_soaks_lost_no_audit_frame_and_had_no_error() -> None:
    d = _data()
    for key in ("soak", "soak_ci"):
        s = d[key]
        assert s is not None, key
        assert (s["audit"]["lost"], s["audit"]["duplicated"], s["audit"]["unverifiable"]) == (0, 0, 0), key
        assert not s["errors"] and s["verdicts"] > 0 and s["audit"]["frames"] >= s["verdicts"], key


@pytest.mark.slow
def test_a_short_soak_verifies_every_verdict_and_loses_no_audit_frame() -> None:
    r = run_load(**table.CI_SOAK)  # type: ignore[arg-type]
    assert r["engines_reported"] == 2 and r["sidecar_alive_at_end"]
    assert not r["errors"], r["error_samples"]
    assert r["verdicts"] > 0 and r["sessions_run"] >= 4
    a = r["audit"]
    assert (a["lost"], a["duplicated"], a["unverifiable"]) == (0, 0, 0), a["problems"]
    assert a["files"] == r["sessions_run"] and a["frames"] == r["verdicts"]
    assert r["memory"]["samples"] >= 5


def test_memory_summary_reports_growth_and_slope_after_the_warm_up() -> None:
    samples = [(float(t), (100 << 20) + (t << 20 if t >= 10 else 0)) for t in range(0, 30)]
    m = memory_summary(samples, warm_s=10)
    assert m["warm_samples"] == 20 and m["growth_after_warm_mb"] == pytest.approx(19.0)
    assert m["slope_mb_per_min"] == pytest.approx(60.0)


def test_the_service_holds_no_more_memory_after_thousands_more_steps_once_warm(tmp_path) -> None:
    """Sessions open, step and close (audit on, the load policy with its rules): what the
    service keeps does not grow with tokens or sessions once warm (tracemalloc)."""
    from sidecar.config import parse_config

    cfg = parse_config({"policies": LOAD_POLICY, "audit": {"dir": str(tmp_path)}})
    assert isinstance(cfg, SidecarConfig)
    svc = GuardService(cfg, Ed25519Signer(Ed25519PrivateKey.generate()))
    v = 2000
    digest = svc.register_vocabulary([f"w{i} ".encode() for i in range(v)]).digest
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        x = rng.normal(-2.0, 2.5, v).astype(np.float32)
        x[rng.choice(v, 6, replace=False)] += rng.uniform(8.0, 16.0, 6).astype(np.float32)
        rows.append(x.tobytes())
    opened = [0]

    def run(steps: int, per_session: int) -> None:
        done = 0
        while done < steps:
            n = opened[0] = opened[0] + 1
            params = params_to_pb(SamplingParams(temperature=0.8, top_k=40, seed=n))
            s = svc.open_session(pb.OpenSessionRequest(session_id=f"m{n}", vocab_digest=digest, sampling=params))
            for k in range(per_session):
                r = pb.StepRequest(session_id=s.session_id, session_secret=s.secret, step=k)
                r.inline.data, r.inline.dtype = rows[int(rng.integers(16))], pb.DTYPE_F32
                done += 1
                if svc.step(r).decision == pb.DECISION_ABORT:
                    break
            closed = svc.close_session(s.session_id, s.secret)
            assert closed.audit is not None
            closed.audit.close()

    run(1500, 300)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(3000, 300)  # ten more sessions
        run(1200, 1200)  # one long one: history, windows and matcher state stay bounded
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        svc.close()
    assert grown < 64 * 1024, f"the service kept {grown} more bytes after 4200 more steps"
