"""``fse-sidecar bench load``: a soak. N guarded sessions at once against one sidecar.

Several engine processes (``--engines``) each drive their share of ``--sessions`` sessions,
one thread per session, for ``--minutes``: seeded synthetic logits (a broad mass and a few
peaks, like a model's), written into real shared-memory rings and judged over the gRPC
stream or the fast lane (``--lane``). A session runs ``--tokens-per-session`` steps (or
until an ABORT), is closed, its receipt checked, and the thread opens the next one, so
sessions churn as they do behind an engine. Every verdict is verified by the engine as in
production: no token is counted that did not verify.

Measured: verdicts/s, the step latency the engine sees (write, round trip, verification)
at p50/p99/p99.9, errors by kind, the sidecar's resident memory sampled every second
(growth after the warm-up, and its slope), and, from the sidecar's audit files checked
against every verdict and receipt the engines kept: audit frames lost (a verified verdict
with no frame), duplicated (a frame the chain holds twice) and unverifiable (a file
whose chain, genesis or receipt does not check). Those three must be 0.

By default it starts its own sidecar (audit on, the default policy plus a rule set);
``--target`` with ``--public-key`` drives a running one (``--pid`` for its memory and
``--audit-dir`` for its audit files, when on this host).

Prints a table, writes JSON, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core import ledger
from ..launch import LocalSidecar, start_local_sidecar
from .common import machine, table

VOCAB = 32_000  # Llama 2's vocabulary: FULL rows of 128 KB
POOL = 64  # distinct rows per engine, drawn at random each step (no loop for the loop guard)
LOAD_POLICY: dict[str, Any] = {
    "default": {
        "rules": [
            # A block rule on one token's text (redone when drawn) and a flag regex: the
            # matcher runs on every step, and some steps are redone.
            {"id": "no-w3", "kind": "literal", "patterns": ["w3 "], "action": "block"},
            {"id": "w1x-w2", "kind": "regex", "patterns": [r"w1\d w2"], "action": "flag"},
        ]
    }
}


def load_config(audit_dir: Path) -> dict[str, Any]:
    return {
        "policies": LOAD_POLICY,
        "audit": {"dir": str(audit_dir)},
        "max_sessions": 4096,
        "max_sessions_per_client": 4096,
    }


@dataclass(frozen=True)
class EngineJob:
    index: int
    target: str
    public_key: str
    sessions: int
    seconds: float
    vocab: int
    tokens_per_session: int
    lane: str  # "grpc", "shm" or "both" (alternate threads)
    seed: int
    step_timeout: float


@dataclass
class SessionRecord:
    session_id: str
    steps: int  # verdicts the engine verified
    receipt: dict[str, Any] | None  # receipt_json of a checked receipt; None if it ended on an error
    ended: str  # "done", "abort" or the error's class name


@dataclass
class EngineResult:
    index: int
    latencies: bytes = b""  # float64 seconds, one per verified verdict
    sessions: list[SessionRecord] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    aborts: int = 0


def _rows(vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(-2.0, 2.5, (POOL, vocab)).astype(np.float32)
    for r in rows:
        r[rng.choice(vocab, 12, replace=False)] += rng.uniform(8.0, 16.0, 12).astype(np.float32)
    return rows


def _engine(job: EngineJob, results: Any) -> None:
    """One engine process: ``job.sessions`` threads, each a guarded session after another."""
    from engine_adapters.client import GuardClient
    from sidecar.core.sampling import SamplingParams
    from sidecar.errors import GuardAbort, GuardError
    from sidecar.ring import RingWriter
    from sidecar.wire import receipt_json

    tokens = [f"w{i} ".encode() for i in range(job.vocab)]
    rows = _rows(job.vocab, job.seed)
    out = EngineResult(job.index)
    lock = threading.Lock()
    lat: list[np.ndarray] = []
    client = GuardClient(job.target, job.public_key, step_timeout=job.step_timeout)
    client.wait_ready(30)
    digest = client.register_vocabulary(tokens)
    end = time.monotonic() + job.seconds

    def error(kind: str, what: str) -> None:
        with lock:
            out.errors[kind] = out.errors.get(kind, 0) + 1
            if len(out.error_samples) < 5:
                out.error_samples.append(what)

    def worker(t: int) -> None:
        lane = job.lane if job.lane != "both" else ("shm" if t % 2 else "grpc")
        ring = RingWriter.create(slots=1, vocab_size=job.vocab, verdict_capacity=8192 if lane == "shm" else 0)
        rng = np.random.default_rng((job.seed, t))
        mine = np.empty(1 << 16)
        n_mine = 0
        n = 0
        try:
            while time.monotonic() < end:
                sid = f"load-e{job.index}-t{t}-{n}"
                n += 1
                params = (
                    SamplingParams(seed=int(rng.integers(1 << 31)))
                    if n % 3 == 0
                    else SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=int(rng.integers(1 << 31)))
                )
                try:
                    s = client.open_session(digest, params, ring=ring, session_id=sid, lane=lane)
                except GuardError as exc:
                    error(type(exc).__name__, f"open {sid}: {exc}")
                    time.sleep(0.05)
                    continue
                steps, ended = 0, "done"
                try:
                    while steps < job.tokens_per_session and time.monotonic() < end:
                        t0 = time.perf_counter()
                        s.step(rows[rng.integers(POOL)])
                        if n_mine == len(mine):
                            lat.append(mine.copy())
                            n_mine = 0
                        mine[n_mine] = time.perf_counter() - t0
                        n_mine += 1
                        steps += 1
                except GuardAbort:
                    steps += 1  # an ABORT is a verified verdict: its frame is in the chain
                    ended = "abort"
                except GuardError as exc:
                    ended = type(exc).__name__
                    error(ended, f"{sid} step {steps}: {exc}")
                receipt = None
                try:
                    s.close()
                    receipt = receipt_json(s.receipt) if s.receipt is not None else None
                except GuardError as exc:
                    error(type(exc).__name__, f"close {sid}: {exc}")
                with lock:
                    out.aborts += ended == "abort"
                    out.sessions.append(SessionRecord(sid, steps, receipt, ended))
        finally:
            with lock:
                lat.append(mine[:n_mine].copy())
            ring.close()  # unlinks it too

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(job.sessions)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    client.close()
    out.latencies = np.concatenate(lat).tobytes() if lat else b""
    results.put(out)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (Linux /proc), None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemorySampler(threading.Thread):
    """RSS of a process every ``period`` seconds: [(seconds since start, bytes)]."""

    def __init__(self, pid: int, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic() - self._t0, rss))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def memory_summary(samples: list[tuple[float, int]], warm_s: float) -> dict[str, Any]:
    """Growth of resident memory after ``warm_s``: last minus first warm sample, and the
    least-squares slope of the warm samples (MB per minute)."""
    warm = [(t, b) for t, b in samples if t >= warm_s]
    if len(warm) < 2:
        return {"samples": len(samples), "warm_samples": len(warm)}
    t = np.array([x for x, _ in warm])
    b = np.array([y for _, y in warm], dtype=np.float64) / 2**20
    slope = float(np.polyfit(t, b, 1)[0]) * 60.0
    return {
        "samples": len(samples),
        "warm_samples": len(warm),
        "start_mb": samples[0][1] / 2**20,
        "warm_mb": float(b[0]),
        "end_mb": float(b[-1]),
        "max_mb": float(max(y for _, y in samples) / 2**20),
        "growth_after_warm_mb": float(b[-1] - b[0]),
        "slope_mb_per_min": slope,
    }


def check_audit(audit_dir: Path, sessions: list[SessionRecord], public_key: Path) -> dict[str, Any]:
    """Every session's audit file against what its engine verified: frames lost,
    duplicated, and files that do not verify (chain, genesis, receipt signature)."""
    from ..signing import TrustedKeys

    check = TrustedKeys.load(public_key).check
    lost = duplicated = unverifiable = frames = 0
    problems: list[str] = []
    seen: set[Path] = set()
    for rec in sessions:
        files = sorted(audit_dir.glob(f"{rec.session_id}.*.audit"))
        if len(files) != 1:
            lost += rec.steps
            unverifiable += 1
            problems.append(f"{rec.session_id}: {len(files)} audit files")
            continue
        seen.add(files[0])
        rep = ledger.verify(files[0].read_bytes().splitlines(keepends=True), rec.receipt, check)
        frames += rep.frames
        if not rep.ok:
            unverifiable += 1
            if "repeated" in rep.error:
                duplicated += 1
            problems.append(f"{files[0].name}: {rep.error}")
        lost += max(0, rec.steps - rep.frames)
        if rec.receipt is not None and rep.frames != rec.steps:
            duplicated += max(0, rep.frames - rec.steps)
        if rec.receipt is not None and not rep.closed:
            unverifiable += 1
            problems.append(f"{files[0].name}: closed with a receipt, but the file has no close record")
    others = [p.name for p in audit_dir.glob("*.audit") if p not in seen]
    return {
        "files": len(seen),
        "frames": frames,
        "lost": lost,
        "duplicated": duplicated,
        "unverifiable": unverifiable,
        "unclaimed_files": len(others),  # files of sessions no engine reports (an open that failed)
        "problems": problems[:10],
    }


def run_load(
    sessions: int,
    seconds: float,
    engines: int = 2,
    *,
    vocab: int = VOCAB,
    tokens_per_session: int = 256,
    lane: str = "both",
    seed: int = 0,
    warmup: float = 0.25,
    target: str | None = None,
    public_key: Path | None = None,
    pid: int | None = None,
    audit_dir: Path | None = None,
    workdir: Path | None = None,
    step_timeout: float = 5.0,
) -> dict[str, Any]:
    """The soak; returns its results (see the module's doc)."""
    if sessions < 1 or engines < 1 or seconds <= 0:
        raise ValueError("sessions, engines and the duration must be positive")
    engines = min(engines, sessions)
    sc: LocalSidecar | None = None
    tmp = None
    if target is None:
        tmp = tempfile.TemporaryDirectory(prefix="fse-load-")
        base = workdir or Path(tmp.name)
        audit_dir = base / "audit"
        sc = start_local_sidecar(base, load_config(audit_dir))
        sc.wait_started()
        target, public_key, pid = sc.target, sc.public_key, sc.proc.pid
    if public_key is None:
        raise ValueError("--target needs --public-key")
    sampler = MemorySampler(pid) if pid is not None else None
    ctx = mp.get_context("spawn")  # no fork of a process that has gRPC's threads
    q = ctx.Queue()
    share = [sessions // engines + (i < sessions % engines) for i in range(engines)]
    jobs = [
        EngineJob(i, target, str(public_key), share[i], seconds, vocab, tokens_per_session, lane, seed + i, step_timeout)
        for i in range(engines)
    ]
    procs = [ctx.Process(target=_engine, args=(j, q), daemon=True) for j in jobs]
    try:
        if sampler is not None:
            sampler.start()
        t0 = time.monotonic()
        for p in procs:
            p.start()
        results: list[EngineResult] = []
        while len(results) < engines:
            try:
                results.append(q.get(timeout=5))
            except Exception:  # queue.Empty: is an engine gone without its result?
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
        wall = time.monotonic() - t0
        for p in procs:
            p.join(30)
        if sampler is not None:
            sampler.stop()
        sidecar_alive = sc.proc.poll() is None if sc is not None else None
        if sc is not None:
            sc.stop()  # closes the audit syncer: every file is whole before it is checked
        lat = np.concatenate([np.frombuffer(r.latencies) for r in results]) if results else np.zeros(0)
        records = [s for r in results for s in r.sessions]
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r.errors.items():
                errors[k] = errors.get(k, 0) + v
        verdicts = sum(s.steps for s in records)
        out: dict[str, Any] = {
            "sessions": sessions,
            "engines": engines,
            "seconds": seconds,
            "wall_s": wall,
            "vocab": vocab,
            "lane": lane,
            "tokens_per_session": tokens_per_session,
            "engines_reported": len(results),
            "sessions_run": len(records),
            "verdicts": verdicts,
            "verdicts_per_s": verdicts / wall if wall > 0 else 0.0,
            "aborts": sum(r.aborts for r in results),
            "errors": errors,
            "error_samples": [e for r in results for e in r.error_samples][:10],
            "latency_us": {
                "p50": float(np.percentile(lat, 50) * 1e6) if lat.size else None,
                "p99": float(np.percentile(lat, 99) * 1e6) if lat.size else None,
                "p99.9": float(np.percentile(lat, 99.9) * 1e6) if lat.size else None,
                "max": float(lat.max() * 1e6) if lat.size else None,
            },
            "sidecar_alive_at_end": sidecar_alive,
        }
        if sampler is not None:
            out["memory"] = memory_summary(sampler.samples, warmup * seconds)
            out["memory"]["series"] = [[round(t, 1), b] for t, b in sampler.samples]
        if audit_dir is not None:
            out["audit"] = check_audit(audit_dir, records, public_key)
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if sc is not None:
            sc.stop()
        if tmp is not None:
            tmp.cleanup()


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def report(r: dict[str, Any]) -> str:
    lat = r["latency_us"]
    rows = [
        ["sessions / engines", f"{r['sessions']} / {r['engines']}"],
        ["duration", f"{r['wall_s']:.1f} s"],
        ["verdicts", str(r["verdicts"])],
        ["verdicts/s", f"{r['verdicts_per_s']:.0f}"],
        ["sessions run (aborted)", f"{r['sessions_run']} ({r['aborts']})"],
        ["latency p50 / p99 / p99.9", f"{_fmt(lat['p50'])} / {_fmt(lat['p99'])} / {_fmt(lat['p99.9'])} µs"],
        ["errors", ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"],
    ]
    m = r.get("memory")
    if m and "warm_mb" in m:
        rows.append(["sidecar RSS start / warm / end", f"{m['start_mb']:.1f} / {m['warm_mb']:.1f} / {m['end_mb']:.1f} MB"])
        rows.append(["RSS after warm-up", f"{m['growth_after_warm_mb']:+.2f} MB ({m['slope_mb_per_min']:+.2f} MB/min)"])
    a = r.get("audit")
    if a:
        rows.append(["audit files / frames", f"{a['files']} / {a['frames']}"])
        rows.append(["audit lost / duplicated / unverifiable", f"{a['lost']} / {a['duplicated']} / {a['unverifiable']}"])
    return table(f"load: {r['lane']} lane(s), vocabulary {r['vocab']}", ["measure", "value"], rows)


def run_load_bench(args: argparse.Namespace) -> int:
    r = run_load(
        args.sessions,
        args.minutes * 60.0,
        args.engines,
        vocab=args.vocab,
        tokens_per_session=args.tokens_per_session,
        lane=args.lane,
        target=args.target,
        public_key=args.public_key,
        pid=args.pid,
        audit_dir=args.audit_dir,
    )
    r["machine"] = machine(platform=platform.platform())
    print(report(r))
    out = args.out.with_name("bench-load.json") if args.out.name == "bench.json" else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0
