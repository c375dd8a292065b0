"""``fse-sidecar`` command line: serve, demo, bench, keygen, audit, replay, accel (also ``python -m sidecar``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import logs
from .errors import FseError

if TYPE_CHECKING:
    from .core import ledger


def _serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .server import serve
    from .signing import Signer

    overrides: dict[str, object] = {}
    if args.listen:
        overrides["listen"] = args.listen
    if args.record:
        overrides["record_dir"] = str(args.record)
    if args.log_format:
        overrides["log_format"] = args.log_format
    config = load_config(args.config, overrides=overrides or None)
    logs.configure(config.log_level, config.log_format)
    signer = Signer.from_file(config.signing_key_file)  # refuses to start without a key
    log = logging.getLogger("fse.server")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(sig: signal.Signals) -> None:
            log.info("stopping: draining the calls in flight", extra=logs.fields(event="stopping", signal=sig.name))
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        try:
            await serve(config, signer, config_path=args.config)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    return 0


def _accel(args: argparse.Namespace) -> int:
    from . import accel

    if args.accel_command == "build":
        if not args.force and accel.check_overlay()[0] is not None:
            print(f"up to date: {accel.ACCEL_DIR} matches every source it was compiled from")
            return 0
        where = accel.build(jobs=args.jobs, quiet=not args.verbose, progress=lambda m: print(f"accel build: {m}", flush=True))
        print(f"compiled {len(accel.COMPILED_MODULES)} modules into {where}; new processes use them")
        return 0
    state = accel.status()
    print(state.describe())
    for module in state.modules:
        print(f"  {module}")
    return 0 if state.compiled or not args.require else 1


def _keygen(args: argparse.Namespace) -> int:
    from .signing import Verifier, generate_hmac_key, generate_keypair

    if args.algorithm == "hmac-sha256":
        path = generate_hmac_key(args.out, overwrite=args.force)
        print(f"HMAC secret: {path} (mode 0600; the sidecar's signing_key_file AND the adapters' key)")
        print(f"key id:      {Verifier.from_file(path).key_id}")
        return 0
    priv, pub = generate_keypair(args.out, overwrite=args.force)
    print(f"private key: {priv} (mode 0600; give it to the sidecar as signing_key_file)")
    print(f"public key:  {pub} (give it to the engine adapters)")
    print(f"key id:      {Verifier.from_file(pub).key_id}")
    return 0


# audit verify's exit status: the worst over the files
AUDIT_VERIFIED, AUDIT_BROKEN, AUDIT_UNREADABLE, AUDIT_UNVERIFIED = 0, 1, 2, 3
_AUDIT_SEVERITY = (AUDIT_VERIFIED, AUDIT_UNVERIFIED, AUDIT_UNREADABLE, AUDIT_BROKEN)
_AUDIT_NAMES = dict(zip(_AUDIT_SEVERITY, ("verified", "unverified", "unreadable", "broken"), strict=True))


def _audit_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.audit"))
            if not found:
                raise FseError(f"{p}: a directory with no .audit files")
            files += found
        else:
            files.append(p)
    return files


def _audit_verify(args: argparse.Namespace) -> int:
    """Exit 0: every file verified (the whole session there, every frame under a checked
    signature); 1: a file is broken (its first bad record named); 2: a file cannot be
    read; 3: a file's chain holds but not all of it is signed and checked (no key given,
    an unsigned tail after a crash, a file that ends without its close)."""
    import json

    from .core import ledger
    from .signing import TrustedKeys

    if args.public_key and args.no_signatures:
        raise FseError("--public-key and --no-signatures: give one or the other")
    if not args.public_key and not args.no_signatures:
        print("note: no --public-key: signatures are not checked, so no file can be VERIFIED (exit 3)")
    files = _audit_files(args.paths)
    if args.receipt and len(files) != 1:
        raise FseError(f"--receipt holds one file to a receipt; {len(files)} files given")
    try:
        receipt = json.loads(args.receipt.read_text()) if args.receipt else None
    except OSError as exc:
        raise FseError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        raise FseError(f"--receipt {args.receipt} is not a JSON receipt: {type(exc).__name__}: {str(exc)[:200]}") from None
    if receipt is not None and not isinstance(receipt, dict):
        raise FseError(f"--receipt {args.receipt} is not a JSON object")
    check = TrustedKeys.load(args.public_key).check if args.public_key else None
    worst = AUDIT_VERIFIED
    counts = dict.fromkeys(_AUDIT_NAMES.values(), 0)
    for f in files:
        try:
            lines = f.read_bytes().splitlines(keepends=True)
        except OSError as exc:
            print(f"{f}: UNREADABLE: {exc.strerror}")
            status = AUDIT_UNREADABLE
        else:
            status = _audit_report(f, ledger.verify(lines, receipt, check), args.no_signatures)
        counts[_AUDIT_NAMES[status]] += 1
        worst = max(worst, status, key=_AUDIT_SEVERITY.index)
    if len(files) > 1:
        print(f"{len(files)} files: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return worst


def _audit_report(path: Path, rep: ledger.Report, unsigned_ok: bool) -> int:
    t = rep.tally
    counts = f"{t.accepted} accepted, {t.healed} healed, {t.aborted} aborted"
    if not rep.ok:
        print(f"{path}: BROKEN at line {rep.bad_line}: {rep.error}")
        print(f"chain holds before it: session {rep.session_id or '?'}, {rep.frames} frames ({counts})")
        return AUDIT_BROKEN
    end = "closed (receipt)" if rep.closed else f"ended by the sidecar ({rep.ended})" if rep.ended else "NOT CLOSED"
    what = f"session {rep.session_id}, {rep.frames} frames ({counts}), {end}"
    if rep.verified:
        print(f"{path}: VERIFIED: {what}, every frame signed and checked")
        status = AUDIT_VERIFIED
    elif not rep.signatures_checked:
        label = "chain consistent, signatures not checked (--no-signatures)" if unsigned_ok else "UNVERIFIED"
        print(f"{path}: {label}: {what}")
        status = AUDIT_VERIFIED if unsigned_ok and rep.complete else AUDIT_UNVERIFIED
    else:
        why = []
        if rep.signed_frames < rep.frames:
            why.append(
                f"frames {rep.signed_frames}-{rep.frames - 1} are chained but under no signature "
                "(written after the last checkpoint: anyone who can write the file could have made them)"
            )
        if not rep.complete:
            why.append("no close record or final checkpoint: the sidecar stopped, or the file was cut, after it")
        print(f"{path}: UNVERIFIED: {what}; signed and checked through frame {rep.signed_frames}: " + "; ".join(why))
        status = AUDIT_UNVERIFIED
    print(f"chain head {rep.chain_hash}")
    for note in rep.notes:
        print(f"note: {note}")
    return status


def _ring_size(args: argparse.Namespace) -> int:
    from .ring import DTYPE_CODES, RingLayout

    if args.rings < 1:
        raise FseError("--rings must be >= 1")
    layout = RingLayout(
        args.slots, args.rows, args.vocab, DTYPE_CODES[args.dtype], args.topk, args.lane_capacity > 0, args.lane_capacity
    )
    total = layout.total_size * args.rings
    mib = -(-total // (1 << 20))
    print(
        f"{args.rings} ring(s) of {args.slots} slot(s) x {args.rows} row(s) x {args.vocab} {args.dtype} logits"
        f"{f', lane verdicts {args.lane_capacity} B/row' if args.lane_capacity else ''}: "
        f"{layout.total_size} bytes each, {total} bytes in all; /dev/shm sizeLimit >= {mib}Mi"
    )
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .replay import run_replay

    return run_replay(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    if args.suite == "fse":
        from .bench.fse import run_fse_bench

        return run_fse_bench(args)
    if args.suite == "ring":
        from .bench.ring import run_ring_bench

        return run_ring_bench(args)
    if args.suite == "batch":
        from .bench.batch import run_batch_bench

        return run_batch_bench(args)
    if args.suite == "load":
        from .bench.load import run_load_bench

        return run_load_bench(args)
    if args.suite == "quality":
        from .bench.quality import run_quality_bench

        return run_quality_bench(args)
    if args.suite == "vllm":
        from .bench.vllm import run_vllm_bench

        return run_vllm_bench(args)
    if args.suite == "contention":
        from .bench.contention import run_contention_bench

        return run_contention_bench(args)
    if args.suite == "step":
        from .bench.step import run_step_bench

        return run_step_bench(args)
    if args.suite == "http":
        from .bench.http import run_http_bench

        return run_http_bench(args)
    from .bench.guard import run_bench

    return run_bench(args)


def _milliseconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of milliseconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: milliseconds must be finite and >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from engine_adapters import omp

    from .about import add_version_flag
    from .logs import LOG_FORMATS

    p = argparse.ArgumentParser(prog="fse-sidecar", description="libfse: fail-closed inference guard sidecar")
    add_version_flag(p, "fse-sidecar")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the sidecar (gRPC on a Unix socket by default)")
    s.add_argument("--config", required=True, type=Path, help="YAML configuration file")
    s.add_argument("--listen", help="override listen (unix:///path.sock or tcp://host:port)")
    s.add_argument("--record", type=Path, help="record every session (opening, rows, ledger) under DIR for 'replay'")
    s.add_argument("--log-format", choices=list(LOG_FORMATS), help="override log_format: text, or json (one object per line)")
    s.set_defaults(func=_serve)

    k = sub.add_parser(
        "keygen",
        help="write a key for signing verdicts (Ed25519 pair by default)",
        description="Rotation: keygen --out NEWDIR; give the adapters both public keys; point signing_key_file at "
        "NEWDIR's private key and send the sidecar SIGHUP (or ReloadPolicy): open sessions continue under the new key; "
        "then drop the old public key from the adapters.",
    )
    k.add_argument("--out", required=True, type=Path, help="directory for fse_signing.key / fse_signing.pub (or fse_hmac.key)")
    k.add_argument("--algorithm", choices=["ed25519", "hmac-sha256"], default="ed25519", help="default: ed25519")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    k.set_defaults(func=_keygen)

    d = sub.add_parser("demo", help="guarded generation on the embedded SmolLM2-135M model")
    d.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--temperature", type=float, default=0.9)
    d.add_argument("--top-k", type=int, default=40)
    d.add_argument("--top-p", type=float, default=0.95)
    d.add_argument("--min-p", type=float, default=0.0)
    d.add_argument("--repetition-penalty", type=float, default=1.1)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--config", type=Path, help="sidecar YAML (default: the built-in demo policy)")
    d.add_argument("--model", type=Path, help="GGUF file (default: the embedded SmolLM2-135M)")
    d.add_argument(
        "--lane", choices=["grpc", "shm"], default="grpc", help="verdicts over gRPC (default) or the shared-memory fast lane"
    )
    d.add_argument(
        "--speculate", action="store_true", help="with --lane shm: evaluate the likely next token while the sidecar judges"
    )
    d.add_argument("--audit-dir", type=Path, help="keep the session's .audit file here (default: a temporary directory)")
    d.add_argument(
        "--omp-wait",
        choices=list(omp.POLICIES),
        default=omp.DEFAULT,
        help="how llama.cpp's OpenMP workers wait (bounded: a short spin, then sleep; docs/troubleshooting.md)",
    )
    d.set_defaults(func=_demo)

    z = sub.add_parser(
        "ring-size",
        help="bytes of /dev/shm the engine's rings take (proto/fse/v1/RING.md): size a pod's shm volume",
    )
    z.add_argument("--vocab", type=int, required=True, help="the model's vocabulary size (logits per FULL row)")
    z.add_argument("--slots", type=int, default=2, help="slots per ring (steps in flight; GuardedLlama: 2)")
    z.add_argument("--rows", type=int, default=1, help="rows per slot (sequences per step)")
    z.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    z.add_argument("--topk", type=int, default=0, help="room for COMPACT rows of up to this many entries")
    z.add_argument(
        "--lane-capacity", type=int, default=0, help="bytes per row of the fast lane's verdict area (GuardedLlama: 8192)"
    )
    z.add_argument("--rings", type=int, default=1, help="rings the engine creates (one per GuardedLlama)")
    z.set_defaults(func=_ring_size)

    r = sub.add_parser("replay", help="judge a recording (serve --record DIR) again; exit 1 if any decision differs")
    r.add_argument("dir", type=Path, help="the recording directory")
    r.add_argument("--config", type=Path, help="judge with this file's policies instead of the recorded ones")
    r.set_defaults(func=_replay)

    a = sub.add_parser("audit", help="audit files: 'audit verify FILE'")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    av = asub.add_parser(
        "verify",
        help="check .audit files' chains, checkpoints and receipts: exit 0 verified, 1 broken, 2 unreadable, 3 not all signed",
    )
    av.add_argument("paths", type=Path, nargs="+", metavar="PATH", help=".audit files, or directories of them")
    av.add_argument("--receipt", type=Path, help="a receipt the adapter kept (JSON): the file must match it")
    av.add_argument(
        "--public-key",
        type=Path,
        action="append",
        help="a key that may have signed the checkpoints and receipt (repeat during a key rotation)",
    )
    av.add_argument(
        "--no-signatures",
        action="store_true",
        help="check the chains only, and say so: a complete file then exits 0 (without it and without a key: exit 3)",
    )
    av.set_defaults(func=_audit_verify)

    c = sub.add_parser("accel", help="the compiled fast path (mypyc): 'accel build', 'accel status'")
    csub = c.add_subparsers(dest="accel_command", required=True, metavar="SUBCOMMAND")
    cb = csub.add_parser("build", help="compile the pure core and the service into sidecar/_accel (needs mypy and a C compiler)")
    cb.add_argument("--jobs", type=int, default=2, help="parallel C compiles")
    cb.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    cb.add_argument("--force", action="store_true", help="build even when the overlay is current")
    cb.set_defaults(func=_accel)
    cs = csub.add_parser("status", help="say whether this process would run compiled or pure Python, and why")
    cs.add_argument("--require", action="store_true", help="exit 1 unless the compiled modules are used")
    cs.set_defaults(func=_accel)

    b = sub.add_parser(
        "bench",
        help="benchmarks: verdict round trip, metrics, guarded tokens/s; 'bench fse': the policy matcher",
    )
    b.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=["all", "batch", "contention", "fse", "http", "load", "quality", "ring", "step", "vllm"],
        help="all: transport, metrics, model (default); fse: the streaming matcher against rescanning; "
        "quality: the default policy on healthy, garbage, looping and legitimately repetitive generations; "
        "ring: reading a row by pread against a view of a mapping; "
        "batch: the sidecar's cost per row of a batch step, FULL against COMPACT frames; "
        "load: a soak of many concurrent sessions (verdicts/s, latency, the sidecar's memory, the audit files); "
        "vllm: real vLLM (make setup-vllm), guarded against unguarded tokens/s at batch 1, 8, 32; "
        "http: fse-engine-llama's HTTP layer against the same guarded generation in process (tokens/s, TTFT); "
        "contention: unguarded and every lane on a busy node and a quiet one, OpenMP's active and passive waits; "
        "step: the guard's CPU per token in one process (write, the sidecar's step, verify), warm and cold",
    )
    b.add_argument(
        "--out", type=Path, default=Path("bench-results/bench.json"), help="JSON results file (fse: bench-fse.json beside it)"
    )
    b.add_argument("--rounds", type=int, default=2000, help="round trips per transport measurement")
    b.add_argument("--tokens", type=int, default=64, help="tokens per generation in the model benchmark")
    b.add_argument("--repeats", type=int, default=9, help="rounds of every model run in turn (the order rotates each round)")
    b.add_argument("--skip-model", action="store_true", help="skip the llama.cpp tokens/s benchmark")
    b.add_argument("--threads", type=int, default=2, help="llama.cpp threads in the model benchmark (the aims are for 2)")
    b.add_argument("--fse-tokens", type=int, default=2000, help="fse: tokens of text streamed per rule set")
    b.add_argument("--fse-rounds", type=int, default=5, help="fse: rounds of every rule set in turn")
    b.add_argument("--rescan-reps", type=int, default=3, help="fse: rescans timed at each text length")
    b.add_argument("--max-tokens", type=int, default=192, help="quality: tokens per run")
    b.add_argument("--healthy", type=int, default=16, help="quality: healthy prompts (of 16)")
    b.add_argument("--garbage", type=int, default=8, help="quality: prompts sampled hot (of 16)")
    b.add_argument("--loops", type=int, default=9, help="quality: looping prompts (of 9)")
    b.add_argument("--legit", type=int, default=12, help="quality: legitimate-repetition prompts (of 12)")
    b.add_argument("--config", type=Path, help="quality: a sidecar YAML whose 'default' policy is judged")
    b.add_argument("--ring-rounds", type=int, default=200, help="ring: rounds of each reader in turn")
    b.add_argument("--step-rows", type=int, default=128, help="step: rows of the model captured and fed in order")
    b.add_argument("--step-passes", type=int, default=4, help="step: passes over the captured rows")
    b.add_argument("--evict-mb", type=int, default=64, help="step: MiB read before each cold step (the forward pass)")
    b.add_argument("--idle-ms", type=_milliseconds, default=11.0, help="step: ms asleep before each idle step (a forward pass)")
    b.add_argument("--batch-rounds", type=int, default=15, help="batch: rounds of every batch size and frame kind in turn")
    b.add_argument("--sessions", type=int, default=16, help="load: guarded sessions at once")
    b.add_argument("--minutes", type=float, default=1.0, help="load: how long")
    b.add_argument("--engines", type=int, default=2, help="load: engine processes sharing the sessions")
    b.add_argument("--lane", choices=["grpc", "shm", "both"], default="both", help="load: the verdict lane (both: alternate)")
    b.add_argument("--vocab", type=int, default=32_000, help="load: synthetic vocabulary size")
    b.add_argument("--tokens-per-session", type=int, default=256, help="load: steps before a session closes and the next opens")
    b.add_argument("--target", help="load: a running sidecar (unix:/path.sock or host:port) instead of starting one")
    b.add_argument("--public-key", type=Path, help="load: with --target, the key its verdicts verify with")
    b.add_argument("--pid", type=int, help="load: with --target, its process id (memory is read from /proc)")
    b.add_argument("--audit-dir", type=Path, help="load: with --target, its audit directory (files checked at the end)")
    b.add_argument("--vllm-batches", default="1,8,32", help="vllm: batch sizes, comma-separated")
    b.add_argument("--vllm-rounds", type=int, default=7, help="vllm: rounds of every batch size on both servers in turn")
    b.add_argument("--guarded-url", help="vllm: a running guarded server (http://host:port/v1) instead of starting one")
    b.add_argument("--plain-url", help="vllm: with --guarded-url, the unguarded server to compare with")
    b.add_argument("--http-rounds", type=int, default=9, help="http: rounds of both paths in turn")
    b.add_argument("--contention-rounds", type=int, default=5, help="contention: rounds of every path in turn, per setting")
    b.add_argument("--load-procs", type=int, help="contention: busy background processes (default: one per core)")
    b.add_argument(
        "--omp-policies",
        default="default,bounded,passive",
        help="contention: OpenMP wait policies to compare (engine_adapters/omp.py)",
    )
    b.set_defaults(func=_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FseError as exc:
        print(f"fse-sidecar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
