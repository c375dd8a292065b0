"""Write the measured tables of docs/ from the benchmark runs kept in docs/bench/*.json.

Each block between ``<!-- bench:SUITE -->`` and ``<!-- /bench:SUITE -->`` in docs/*.md is
replaced by the table ``fse-sidecar bench SUITE`` printed for the JSON docs/bench/SUITE.json
(the suite's own ``render``), with the run's machine and date; ``--check`` exits 1 when a
block is stale. To publish a new run: ``fse-sidecar bench SUITE --out docs/bench/SUITE.json``
(the default suite is ``guard``), then this script. tests/test_docs.py fails on a measured
figure in the docs outside such a block.

    .venv/bin/python scripts/gen_bench_docs.py [--check]
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.generated import write_or_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "bench"
BLOCK = re.compile(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", re.S)
COMMAND = ".venv/bin/python scripts/gen_bench_docs.py"


def _provenance(run: dict) -> str:
    m = run.get("machine", {})
    parts = [f"{m['cpus']} CPUs" if "cpus" in m else "", f"Python {m['python']}" if "python" in m else ""]
    parts += [m.get("core", ""), m.get("date", "")]
    return ", ".join(p for p in parts if p)


def block(suite: str) -> str:
    path = RUNS / f"{suite}.json"
    if not path.exists():
        raise SystemExit(f"docs name bench:{suite}, but {path.relative_to(ROOT)} does not exist")
    run = json.loads(path.read_text())
    table = importlib.import_module(f"sidecar.bench.{suite}").render(run)
    where = _provenance(run)
    return (
        f"<!-- bench:{suite} -->\n"
        f"From [`docs/bench/{suite}.json`](bench/{suite}.json){f' ({where})' if where else ''}:\n\n"
        f"```text\n{table.rstrip()}\n```\n"
        f"<!-- /bench:{suite} -->"
    )


def main() -> int:
    status = 0
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        new = BLOCK.sub(lambda m: block(m.group(1)), text)
        if new != text or "--check" in sys.argv:
            status = max(status, write_or_check(doc, new, COMMAND))
    return status


if __name__ == "__main__":
    sys.exit(main())
