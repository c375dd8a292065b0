"""``fse-sidecar bench ring``: what reading a row by ``pread`` costs against a mapping.

Layout 2's reader copies each row out of the engine's segment with ``pread`` (a mapping
of a file its owner truncates kills the reader with SIGBUS). Timed here in one process,
side by side, round after round, per vocabulary size and ring dtype:

- ``view``: the layout-1 way: a numpy view of a read-only mapping, seqlock read before
  and after, f16/bf16 widened to f32 (the only copy that way makes);
- ``pread``: :meth:`RingReader.row`: the slot head and descriptor, the row and the
  seqlock word, three ``pread`` calls into reused buffers, then the same widening;
- ``row_stats``: the first pass the sidecar makes over the row anyway (max, log-sum-exp,
  moments): the yardstick for whether the copy matters.

Ratios are medians of per-round ratios. Prints a table and writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from ..core.metrics import row_stats
from ..ring import DTYPES, HEADER_SIZE, RingReader, RingWriter, mapped_view
from .common import machine, publish, table

VOCABS = (49_152, 128_256)  # the embedded SmolLM2's, and Llama 3's


def _viewer(name: str, dtype_code: int, vocab: int):
    m, lay = mapped_view(name)
    buf = memoryview(m)
    base = HEADER_SIZE  # slot 0
    seq = np.ndarray((1,), dtype="<u8", buffer=buf, offset=base)
    row = np.ndarray((vocab,), dtype=DTYPES[dtype_code][0], buffer=buf, offset=base + lay.heap_offset)

    def read(published: int) -> np.ndarray:
        assert int(seq[0]) == published
        x = (
            row
            if dtype_code == 1
            else (row.astype(np.float32) if dtype_code == 2 else (row.astype(np.uint32) << 16).view(np.float32))
        )
        assert int(seq[0]) == published
        return x

    def close() -> None:
        nonlocal seq, row, buf
        del seq, row
        buf.release()
        m.close()

    return read, close


def _bench_one(vocab: int, dtype: str, rounds: int, reps: int) -> dict[str, Any]:
    x = np.random.default_rng(vocab).standard_normal(vocab).astype(np.float32)
    with RingWriter.create(slots=1, vocab_size=vocab, dtype=dtype) as w:
        with w.frame(0) as f:
            f.write_row(1, 0, x)
        reader = RingReader(w.name)
        view_read, view_close = _viewer(w.name, w.layout.dtype_code, vocab)
        runs: dict[str, list[float]] = {"view": [], "pread": [], "row_stats": []}
        # row_stats timed on its own (a copy of the row read): timed as read + stats minus the
        # read, two noisy figures, its difference went below zero on a busy machine
        full = np.array(reader.row(0, 0, f.seq, 1, 0), dtype=np.float32)  # a FULL row
        fns = {
            "view": lambda: view_read(f.seq),
            "pread": lambda: reader.row(0, 0, f.seq, 1, 0),
            "row_stats": lambda: row_stats(full),
        }
        for fn in fns.values():
            fn()  # warm the buffers and the page cache
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter_ns()
                for _ in range(reps):
                    fn()
                runs[k].append((time.perf_counter_ns() - t0) / reps / 1e3)
        np.testing.assert_array_equal(view_read(f.seq), reader.row(0, 0, f.seq, 1, 0))  # same values both ways
        view_close()
        reader.close()
    extra = [p - v for p, v in zip(runs["pread"], runs["view"], strict=True)]
    return {
        "vocab": vocab,
        "dtype": dtype,
        "row_bytes": w.layout.full_size,
        **{f"{k}_us_p50": round(statistics.median(v), 2) for k, v in runs.items()},
        "pread_over_view": round(statistics.median(p / v for p, v in zip(runs["pread"], runs["view"], strict=True)), 2),
        "copy_cost_over_row_stats": round(statistics.median(e / s for e, s in zip(extra, runs["row_stats"], strict=True)), 3),
    }


def bench_ring(rounds: int, reps: int) -> list[dict[str, Any]]:
    return [_bench_one(vocab, dtype, rounds, reps) for vocab in VOCABS for dtype in ("f32", "f16")]


def render(result: dict[str, Any]) -> str:
    """The table ``run_ring_bench`` prints, from its JSON."""
    return table(
        "row read per step (µs, medians over rounds): layout 2's pread copy vs a view of a mapping",
        ["vocab", "dtype", "bytes", "view", "pread", "pread/view", "row_stats", "(pread-view)/row_stats"],
        [
            [
                str(r["vocab"]),
                r["dtype"],
                str(r["row_bytes"]),
                f"{r['view_us_p50']:.1f}",
                f"{r['pread_us_p50']:.1f}",
                f"{r['pread_over_view']:.2f}x",
                f"{r['row_stats_us_p50']:.1f}",
                f"{r['copy_cost_over_row_stats']:.2f}",
            ]
            for r in result["ring"]
        ],
    )


def run_ring_bench(args: argparse.Namespace) -> int:
    rows = bench_ring(args.ring_rounds, 20)
    result = {"machine": machine(), "ring": rows}
    return publish(result, args.out, "ring", render)
