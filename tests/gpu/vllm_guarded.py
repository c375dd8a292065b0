"""Real vLLM under guard, on a GPU machine (not collected by pytest; run by hand).

    python tests/gpu/vllm_guarded.py MODEL_DIR [--requests 64] [--tokens 64] [--runner v2|v1]

MODEL_DIR: a local model (the machine cannot download): a tiny random-weight Llama saved
here with transformers, or a small instruct model carried over. Needs vLLM 0.33.0 and this
project installed in the same environment (`pip install -e .`; the wheels carried).

What it checks and prints:
1. 64 concurrent requests, greedy, on a plain engine, then the same 64 on an engine with the
   guard's processor (every request guarded): equal token for token;
2. throughput: output tokens/s unguarded vs guarded (median of --repeats runs each,
   alternated), and the ratio;
3. the batch changes vLLM made (V1: every BatchUpdate; V2: every add_request and row
   order), recorded in the engine process by tests/gpu/recording.py, are written to
   bench-results/vllm-batch-updates.json: the sequences the CI stand-ins stand for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runner", choices=["v1", "v2"], default="v2")
    args = ap.parse_args()
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0" if args.runner == "v1" else "1"

    from sidecar.launch import start_local_sidecar

    work = Path(tempfile.mkdtemp(prefix="fse-gpu-"))
    sc = start_local_sidecar(work, {"max_batch_rows": max(256, args.requests)})
    sc.wait_started()
    os.environ["FSE_SIDECAR"] = sc.target
    os.environ["FSE_PUBLIC_KEY"] = str(sc.public_key)

    from vllm import LLM, SamplingParams

    record = work / "batch-updates.jsonl"
    os.environ["FSE_RECORD"] = str(record)  # inherited by vLLM's engine processes
    # Two engines: every request of the guarded one is guarded (the operator's choice).
    common = {"model": args.model, "max_num_seqs": args.requests, "gpu_memory_utilization": 0.4}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # for the engine's import
    plain = LLM(**common)
    guarded = LLM(**common, logits_processors=["tests.gpu.recording:Recording"])
    prompts = [f"Write a short line about the number {i}." for i in range(args.requests)]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens)

    def run(llm: LLM) -> tuple[list[list[int]], float]:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, greedy)
        dt = time.perf_counter() - t0
        return [list(o.outputs[0].token_ids) for o in outs], sum(len(o.outputs[0].token_ids) for o in outs) / dt

    want, _ = run(plain)
    got, _ = run(guarded)
    same = sum(a == b for a, b in zip(want, got, strict=True))
    print(f"guarded greedy equals unguarded: {same}/{len(want)} requests")
    speeds: dict[str, list[float]] = {"unguarded": [], "guarded": []}
    for _ in range(args.repeats):
        speeds["unguarded"].append(run(plain)[1])
        speeds["guarded"].append(run(guarded)[1])
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(
        f"output tokens/s: unguarded {med['unguarded']:.0f}, guarded {med['guarded']:.0f}, "
        f"ratio {med['guarded'] / med['unguarded']:.3f}"
    )
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "vllm-gpu.json").write_text(json.dumps({"equal": same, "requests": len(want), "tokens_per_s": med}, indent=2) + "\n")
    updates = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    print(f"batch changes recorded in the engine process: {len(updates)}")
    (out / "vllm-batch-updates.json").write_text(json.dumps(updates, indent=1) + "\n")
    sc.stop()
    return 0 if same == len(want) else 1


if __name__ == "__main__":
    raise SystemExit(main())
