"""Write docs/reliability.md from the suite's own results (issue 15).

    python scripts/gen_reliability.py [--soak bench-results/bench-load.json]

1. runs the fault matrix, the hostile-input tests and the tests of issue 28's findings
   (tests/reliability_table.EDGES) with pytest, recording each case's outcome;
2. runs the soak as CI runs it (table.CI_SOAK: 4 sessions, 12 s, 2 engine processes);
3. takes the long soak from ``--soak`` (a ``fse-sidecar bench load`` JSON; without it the
   one already in tests/reliability.json is kept);
4. writes tests/reliability.json and docs/reliability.md's section between its markers.

A failed case is written as failed (and tests/test_reliability.py then fails): the table
says what happened, not what should have.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.bench.load import run_load  # noqa: E402
from tests import reliability_table as table  # noqa: E402


def soak_summary(r: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of a bench-load result (no series, no samples of problems)."""
    mem = {k: v for k, v in r.get("memory", {}).items() if k != "series"}
    audit = {k: v for k, v in r["audit"].items() if k != "problems"}
    keep = ("sessions", "engines", "lane", "vocab", "tokens_per_session", "verdicts", "verdicts_per_s", "latency_us", "errors")
    return {**{k: r[k] for k in keep}, "minutes": r["seconds"] / 60.0, "memory": mem, "audit": audit}


def run_suite() -> list[dict[str, Any]]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = {**os.environ, "FSE_RELIABILITY_OUT": str(out)}
    tests = ["tests/test_fault_matrix.py", "tests/test_hostile_input.py"]
    tests += sorted({t for e in table.EDGES for t in e["tests"]})
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env, check=False)
    try:
        return list(json.loads(out.read_text()))
    finally:
        out.unlink()


def build(outcomes: list[dict[str, Any]], soak: dict[str, Any] | None, soak_ci: dict[str, Any]) -> dict[str, Any]:
    from tests import test_fault_matrix  # noqa: F401 - registers the matrix
    from tests import test_hostile_input as hostile
    from tests.faults import MATRIX

    faults = []
    for f in MATRIX.values():
        lanes: dict[str, str] = {}
        for o in outcomes:
            if o["fault"] == f.id:
                # a fault with extra parameters (NaN and Inf) holds on a lane only if all of them do
                lanes[o["lane"]] = o["outcome"] if lanes.get(o["lane"], "passed") == "passed" else lanes[o["lane"]]
        faults.append(
            {
                "id": f.id,
                "group": f.group,
                "what": f.what,
                "held": f.held,
                "lanes": {ln: lanes.get(ln, "not run") for ln in f.lanes},
            }
        )
    fuzz = []
    for o in outcomes:
        if o["test"].startswith("tests/test_hostile_input.py"):
            fn = getattr(hostile, o["function"])
            param = o["test"].partition("[")[2].rstrip("]")
            target = hostile.FUZZ_TARGETS[o["function"]].format(param=param)
            examples = fn._hypothesis_internal_use_settings.max_examples
            fuzz.append({"target": target, "test": o["function"], "examples": examples, "outcome": o["outcome"]})
    edges = [{**e, "outcome": table.edge_outcome(e["tests"], outcomes)} for e in table.EDGES]
    return {
        "generated_by": "scripts/gen_reliability.py",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "faults": faults,
        "fuzz": fuzz,
        "edges": edges,
        "soak": soak,
        "soak_ci": soak_ci,
    }


def write_readme(data: dict[str, Any]) -> None:
    readme = ROOT / "docs" / "reliability.md"
    text = readme.read_text()
    readme.write_text(text.replace(table.section(text), table.render(data)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--soak", type=Path, help="a 'fse-sidecar bench load' JSON for the long soak's row")
    p.add_argument("--render-only", action="store_true", help="rewrite docs/reliability.md from tests/reliability.json only")
    args = p.parse_args()
    if args.render_only:
        write_readme(json.loads(table.RESULTS.read_text()))
        return 0
    old = json.loads(table.RESULTS.read_text()) if table.RESULTS.exists() else {}
    soak = soak_summary(json.loads(args.soak.read_text())) if args.soak else old.get("soak")
    outcomes = run_suite()
    ci = soak_summary(run_load(**table.CI_SOAK))
    data = build(outcomes, soak, ci)
    table.RESULTS.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    write_readme(data)
    bad = [f["id"] for f in data["faults"] if any(v != "passed" for v in f["lanes"].values())]
    bad += [z["test"] for z in data["fuzz"] if z["outcome"] != "passed"]
    bad += [f"issue 28 item {e['item']}" for e in data["edges"] if e["outcome"] != "passed"]
    print(
        f"wrote {table.RESULTS.relative_to(ROOT)} and docs/reliability.md; {'not held: ' + ', '.join(bad) if bad else 'all held'}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
