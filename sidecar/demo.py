"""``fse-sidecar demo``: a real guarded generation on the embedded SmolLM2-135M.

Starts a sidecar in its own process (throwaway key pair, Unix socket in a temporary
directory), generates through llama.cpp with every token proposed, checked and signed by
the sidecar, and prints one line per token plus the "cognitive ECG" and a summary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from engine_adapters.llama_cpp import CHAT, GuardedCompletion

from . import accel
from ._pb.fse.v1 import guard_pb2 as pb
from .config import load_config
from .core.sampling import SamplingParams
from .errors import FseError, GuardAbort
from .launch import start_local_sidecar

# The demo turns on seed 000's surprise guards on top of the defaults so that a heal is
# visible: a sampled token with -log p > 6 nats or rank > 100 is redone greedily.
DEMO_POLICY = {
    "default": {
        "guards": {
            "neg_logprob": {"enabled": True, "threshold": 6.0},
            "rank": {"enabled": True, "threshold": 100},
        }
    }
}
DECISION = {pb.DECISION_ACCEPT: "ACCEPT", pb.DECISION_HEALED: "HEALED", pb.DECISION_ABORT: "ABORT"}
BAND = {pb.HEALTH_BAND_HEALTHY: "healthy", pb.HEALTH_BAND_DRIFTING: "drifting", pb.HEALTH_BAND_HALT: "HALT"}
GATE = {
    pb.GATE_BAND_UNSPECIFIED: "-",
    pb.GATE_BAND_HEALTHY: "healthy",
    pb.GATE_BAND_DRIFTING: "drifting",
    pb.GATE_BAND_STRICT: "STRICT",
    pb.GATE_BAND_HALT: "HALT",
}
SPARK = "▁▂▃▄▅▆▇█"


def spark(values: list[float], top: float) -> str:
    return "".join(SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for v in values)


def run_demo(args: argparse.Namespace) -> int:
    from engine_adapters.omp import apply_wait_policy

    omp = apply_wait_policy(args.omp_wait)  # before llama_cpp loads libgomp

    from engine_adapters.client import GuardClient
    from engine_adapters.llama_cpp import GuardedLlama, load_llama

    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    if args.speculate and args.lane != "shm":
        raise FseError("--speculate needs --lane shm (the step is submitted, then collected)")
    if args.config:
        load_config(args.config)  # a bad file is named here, field by field, before a sidecar starts on it
    config = yaml.safe_load(args.config.read_text()) if args.config else {"policies": DEMO_POLICY}
    with tempfile.TemporaryDirectory(prefix="fse-demo-") as tmp:
        audit_dir = args.audit_dir or Path(tmp) / "audit"
        config = {**config, "audit": {**config.get("audit", {}), "dir": str(audit_dir)}}
        sc = start_local_sidecar(Path(tmp), config)
        try:
            sc.wait_started(timeout=30)  # a child that exits at once says so now, with its log
            client = GuardClient(sc.target, sc.public_key, step_timeout=2.0)
            llama = load_llama(args.model)
            with GuardedLlama(llama, client, lane=args.lane, speculate=args.speculate) as guarded:
                model = Path(llama.model_path).name
                keys = ", ".join(client.trusted.key_ids)
                lane = "fast lane (shared memory + eventfds)" if args.lane == "shm" else "gRPC stream"
                lane += ", speculating" if args.speculate else ""
                print(f"model: {model}  vocab {len(guarded.vocab)}  sidecar pid {sc.proc.pid}  key {keys}  lane: {lane}")
                print(f"sidecar core: {accel.status().describe()}  OpenMP wait: {omp}")
                print(f"prompt: {args.prompt!r}")
                print(
                    f"sampling: T={sampling.temperature} top_k={sampling.top_k} top_p={sampling.top_p} "
                    f"min_p={sampling.min_p} rep_penalty={sampling.repetition_penalty} seed={sampling.seed}\n"
                )
                print(
                    f"{'step':>4}  {'token':<16} {'decision':<8} {'H nats':>7} {'-logp':>7} {'margin':>7} {'PPL':>8}  "
                    f"{'gate':<17} {'risk':>5} {'e-value':>8}"
                )
                tokens = []
                error: FseError | None = None
                t0 = time.perf_counter()
                try:
                    for tok in guarded.generate(CHAT.format(args.prompt), max_tokens=args.max_tokens, sampling=sampling):
                        tokens.append(tok)
                        print(_token_line(tok.step, repr(tok.text.decode("utf-8", "replace")), tok.verdict))
                    end = guarded.last_end  # end-of-sequence: no text, but a verdict (the guard may have chosen it)
                    if end is not None:
                        print(_token_line(end.step, "(end)", end))
                except FseError as exc:
                    error = exc
                elapsed = time.perf_counter() - t0
            client.close()
        finally:
            sc.stop()
        _summary(GuardedCompletion(tokens, error, guarded.last_receipt, guarded.last_end), elapsed)
        _audit_summary(audit_dir, guarded.last_receipt, sc.public_key, kept=args.audit_dir is not None)
    # A guard ABORT is the product working; no verdict at all (unavailable, rejected) is not.
    return 1 if error is not None and not isinstance(error, GuardAbort) else 0


def _audit_summary(audit_dir: Path, receipt: pb.Receipt | None, public_key: Path, kept: bool) -> None:
    """The session's audit file, checked as `fse-sidecar audit verify` would."""
    from .core import ledger
    from .signing import TrustedKeys
    from .wire import receipt_json

    files = sorted(audit_dir.glob("*.audit"), key=lambda p: p.stat().st_mtime)
    if not files:
        print("audit: no file written")
        return
    f = files[-1]
    rep = ledger.verify(
        f.read_bytes().splitlines(keepends=True), receipt_json(receipt) if receipt else None, TrustedKeys.load(public_key).check
    )
    state = "VERIFIED: chain, checkpoints and receipt signed and checked" if rep.verified else (rep.error or "NOT VERIFIED")
    where = f" (kept: fse-sidecar audit verify {f})" if kept else " (use --audit-dir DIR to keep it)"
    print(f"audit file: {rep.frames} frames, {state}{where}")


def _token_line(step: int, shown: str, v: pb.Verdict) -> str:
    m = v.metrics
    g = v.stream
    gate = GATE[g.band] + (f">{GATE[g.pending]}" if g.pending else "")
    line = (
        f"{step:>4}  {shown:<16} {DECISION[v.decision]:<8} "
        f"{m.entropy_nats:7.3f} {m.neg_logprob_nats:7.3f} {m.margin:7.3f} {m.running_ppl:8.2f}  "
        f"{gate:<17} {g.risk:5.2f} {g.e_value:8.3g}"
    )
    return line + (f"   <- {', '.join(r.detail for r in v.reasons)}" if v.reasons else "")


def _summary(done: GuardedCompletion, elapsed: float) -> None:
    tokens, end, error = done.tokens, done.end, done.error
    text = done.text
    counts = {name: sum(1 for v in done.verdicts if DECISION[v.decision] == name) for name in ("ACCEPT", "HEALED")}
    entropy = [t.verdict.metrics.entropy_nats for t in tokens]
    nlp = [t.verdict.metrics.neg_logprob_nats for t in tokens]
    print("\ncognitive ECG (one column per token)")
    if tokens:
        print(f"  entropy  {spark(entropy, max(max(entropy), 1e-9))}  max {max(entropy):.2f} nats")
        print(f"  -log p   {spark(nlp, max(max(nlp), 1e-9))}  max {max(nlp):.2f} nats")
        risks = [t.verdict.stream.risk for t in tokens]
        print(f"  risk     {spark(risks, 1.0)}  max {max(risks):.2f} (the gate's score, 0 to 1)")
        print(
            "  verdict  "
            + "".join("H" if t.verdict.decision == pb.DECISION_HEALED else "·" for t in tokens)
            + ("X" if error else "")
        )
    print(f"\ntext: {text!r}")
    last = tokens[-1].verdict if tokens else None
    ppl = f"{last.metrics.running_ppl:.2f} ({BAND[last.band]})" if last else "n/a"
    lat = sorted(t.latency_s for t in tokens)
    print(
        f"summary: {len(tokens)} tokens{' and end-of-sequence' if end is not None else ''} in {elapsed:.2f}s "
        f"({len(tokens) / elapsed if elapsed else 0:.1f} tok/s), "
        f"ACCEPT {counts['ACCEPT']}, HEALED {counts['HEALED']}, ABORT {int(isinstance(error, GuardAbort))}; "
        f"running PPL {ppl}"
    )
    if lat:
        print(f"verdict round trip: p50 {statistics.median(lat) * 1e3:.3f} ms, max {lat[-1] * 1e3:.3f} ms")
    if last:
        print(f"audit chain head: {last.chain_hash.hex()}")
    if error is not None:
        print(f"stopped by the guard: {type(error).__name__}: {error}")
