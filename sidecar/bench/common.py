"""What every benchmark shares: medians and pair-by-pair ratios, the rotating order of a
round, interleaved timing, the JSON header of a model run and the printed table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def summ(xs: list[float]) -> dict[str, float]:
    return {"p50_us": pct(xs, 50) * 1e6, "p99_us": pct(xs, 99) * 1e6, "n": len(xs)}


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of the round-by-round ratios: each pair was measured side by side."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def rotation(names: list[str], i: int) -> list[str]:
    """Round ``i``'s order: who goes first rotates each round. Measured here, the second of
    two identical sidecars stepped in a fixed order was 6% slower than the first, and the
    model runs in a fixed order read the fast lane 0.80-0.83 against 0.85-0.91 rotated."""
    k = i % len(names)
    return names[k:] + names[:k]


def interleave(fns: dict[str, Callable[[], object]], rounds: int, pace_s: float, warmup: int = 50) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds + warmup):
        for name in rotation(names, i):
            fn = fns[name]
            if pace_s:
                time.sleep(pace_s)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def machine(**extra: Any) -> dict[str, Any]:
    """Where and when a benchmark ran, for its JSON (and the docs made from it)."""
    from .. import accel

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "core": accel.status().describe(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def run_header(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    """What a model benchmark's JSON opens with: the machine and the run's size."""
    return {
        "machine": machine(),
        "tokens": args.tokens,
        "rounds": rounds,
        "threads": args.threads,
    }


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def publish(result: dict[str, Any], out: Path, suite: str, render: Callable[[dict[str, Any]], str]) -> int:
    """Print a suite's tables and write its JSON: to ``out``, or beside the default
    bench.json as bench-SUITE.json when ``--out`` was left alone."""
    path = out.with_name(f"bench-{suite}.json") if out.name == "bench.json" else out
    path.parent.mkdir(parents=True, exist_ok=True)
    print(render(result))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0
