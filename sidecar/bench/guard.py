"""``fse-sidecar bench``: every comparison measured side by side, in one run, as medians.

1. transport: the verdict round trip through the shm ring, the same with the logits
   inside the gRPC message, and a bare echo on the same kind of stream (the floor),
   interleaved round by round, at 32k and 128k vocabularies; once back to back and once
   paced like a decoding engine (a pause between steps, so threads go idle as they do
   between forward passes). The HMAC-SHA256 sidecar is a second process with its own
   echo, so each ring is compared with the floor of its own process.
2. metrics: row_stats + candidate against one ``np.exp`` pass over the row (the memory
   floor) and a naive ``np.partition`` top-2, interleaved.
3. model: tokens/s of the real SmolLM2-135M: unguarded, guarded with Ed25519 verdicts and
   guarded with HMAC-SHA256 verdicts, in turn, round after round; and the guard step's
   latency inside that loop (ring write + round trip + verification, as the adapter
   sees it between two forward passes).

Prints a table and writes JSON. No assertion here: these machines are shared and noisy,
so read the ratios, which are taken pair by pair within the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._pb.fse.v1 import guard_pb2 as pb
from ..core.metrics import candidate, row_stats
from ..core.sampling import SamplingParams
from ..launch import LocalSidecar, start_local_sidecar
from ..signing import generate_hmac_key
from .common import interleave, machine, median_ratio, pct, rotation, summ, table

SAMPLING = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=1)
# The transport rounds cycle through 8 synthetic rows, a loop the loop guard rightly
# halts: those sessions run the default policy without it. The model runs the default.
SYNTHETIC = "synthetic"
BENCH_CONFIG = {"policies": {"default": {}, SYNTHETIC: {"loop_guard": {"enabled": False}}}}


def _transport_calls(echoes: dict[str, Any], sessions: dict[str, Any], pool: list[np.ndarray]) -> dict[str, Callable[[], object]]:
    """One call per transport; each step cycles through ``pool`` so rows differ."""
    msg = pb.EchoRequest(payload=b"\0" * 64)
    counter = iter(range(1 << 62))

    def stepper(session: Any) -> Callable[[], object]:
        return lambda: session.step(pool[next(counter) % len(pool)])

    def echoer(call: Any) -> Callable[[], object]:
        return lambda: call.roundtrip(msg, 5.0, "echo")

    return {**{name: echoer(c) for name, c in echoes.items()}, **{name: stepper(s) for name, s in sessions.items()}}


def bench_transport(ed: LocalSidecar, hm: LocalSidecar, rounds: int, paced_rounds: int) -> list[dict[str, Any]]:
    from engine_adapters.client import GuardClient, StreamCall

    from ..ring import RingWriter

    rows: list[dict[str, Any]] = []
    client = GuardClient(ed.target, ed.public_key, step_timeout=5.0)
    hclient = GuardClient(hm.target, hm.public_key, step_timeout=5.0)
    client.wait_ready(30)
    hclient.wait_ready(30)
    rng = np.random.default_rng(0)
    for vocab in (32768, 131072):
        tokens = [i.to_bytes(4, "little") for i in range(vocab)]
        digest = client.register_vocabulary(tokens)
        hclient.register_vocabulary(tokens)
        pool = [(rng.standard_normal(vocab) * 3).astype(np.float32) for _ in range(8)]
        for pace_ms, n in ((0.0, rounds), (7.0, paced_rounds)):
            with RingWriter.create(slots=2, vocab_size=vocab) as ring, RingWriter.create(slots=2, vocab_size=vocab) as hring:
                sessions = {
                    "ring": client.open_session(digest, SAMPLING, ring=ring, policy=SYNTHETIC),
                    "ring_hmac": hclient.open_session(digest, SAMPLING, ring=hring, policy=SYNTHETIC),
                    "inline": client.open_session(digest, SAMPLING, policy=SYNTHETIC),
                }
                # Each sidecar gets its own echo: the HMAC ring is compared with the floor
                # of the same process, whose caches are as warm or cold as its steps'.
                echoes = {"echo": StreamCall(client._stub.Echo), "echo_hmac": StreamCall(hclient._stub.Echo)}
                t = interleave(_transport_calls(echoes, sessions, pool), n, pace_ms / 1e3)
                for e in echoes.values():
                    e.close()
                for sess in sessions.values():
                    sess.close()

            rows.append(
                {
                    "vocab": vocab,
                    "pace_ms": pace_ms,
                    **{k: summ(t[k]) for k in ("echo", "ring", "inline", "echo_hmac", "ring_hmac")},
                    "ring_over_echo_median": median_ratio(t["ring"], t["echo"]),
                    "inline_over_echo_median": median_ratio(t["inline"], t["echo"]),
                    "ring_hmac_over_echo_hmac_median": median_ratio(t["ring_hmac"], t["echo_hmac"]),
                }
            )
    client.close()
    hclient.close()
    return rows


def bench_lane(ed: LocalSidecar, rounds: int) -> dict[str, Any]:
    """The fast lane against its floors, between the same two processes (49k ids): a raw
    eventfd ping-pong (PING: the doorbells only), the lane with no guard work (ECHO: the
    request record, a verdict-area write, both doorbells), a guarded step on the lane, and
    beside them the gRPC stream's echo and step."""
    from engine_adapters.client import GuardClient, StreamCall

    from ..ring import REQUEST_ECHO, REQUEST_PING, RingWriter

    vocab = 49152
    client = GuardClient(ed.target, ed.public_key, step_timeout=5.0)
    client.wait_ready(30)
    digest = client.register_vocabulary([i.to_bytes(4, "little") for i in range(vocab)])
    rng = np.random.default_rng(3)
    pool = [(rng.standard_normal(vocab) * 3).astype(np.float32) for _ in range(8)]
    with (
        RingWriter.create(slots=2, vocab_size=vocab, verdict_capacity=8192) as ring,
        RingWriter.create(slots=2, vocab_size=vocab) as gring,
    ):
        lane_s = client.open_session(digest, SAMPLING, ring=ring, policy=SYNTHETIC, lane="shm")
        grpc_s = client.open_session(digest, SAMPLING, ring=gring, policy=SYNTHETIC)
        echo = StreamCall(client._stub.Echo)
        lane = lane_s.lane
        assert lane is not None
        seq = iter(range(2, 1 << 62, 2))
        counter = iter(range(1 << 62))
        msg = pb.EchoRequest(payload=b"\0" * 64)
        fns: dict[str, Callable[[], object]] = {
            "eventfd_ping": lambda: lane.roundtrip(1, next(seq), 5.0, "ping", REQUEST_PING),
            "lane_echo": lambda: lane.roundtrip(1, next(seq), 5.0, "echo", REQUEST_ECHO),
            "lane_step": lambda: lane_s.step(pool[next(counter) % len(pool)]),
            "grpc_echo": lambda: echo.roundtrip(msg, 5.0, "echo"),
            "grpc_step": lambda: grpc_s.step(pool[next(counter) % len(pool)]),
        }
        t = interleave(fns, rounds, 0.0)
        echo.close()
        lane_s.close()
        grpc_s.close()
    client.close()
    return {
        "vocab": vocab,
        **{k: summ(v) for k, v in t.items()},
        "lane_echo_over_eventfd_ping_median": median_ratio(t["lane_echo"], t["eventfd_ping"]),
        "lane_step_over_grpc_step_median": median_ratio(t["lane_step"], t["grpc_step"]),
        "grpc_echo_over_lane_echo_median": median_ratio(t["grpc_echo"], t["lane_echo"]),
    }


AUDIT_MODES = ("off", "close", "interval", "every_frame")


def _stepped_in_turn(
    workdir: Path,
    settings: dict[str, dict[str, Any]],
    rounds: int,
    measure: Callable[[dict[str, Path]], dict[str, Any]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Step latency under each setting (extra sidecar config): one sidecar each, the same
    rows (49k ids, the embedded model's), stepped in turn round after round. ``measure``
    reads the sidecars' directories before they stop."""
    from engine_adapters.client import GuardClient

    from ..ring import RingWriter

    vocab = 49152
    tokens = [i.to_bytes(4, "little") for i in range(vocab)]
    rng = np.random.default_rng(2)
    pool = [(rng.standard_normal(vocab) * 3).astype(np.float32) for _ in range(8)]
    sidecars, clients, rings, sessions, dirs = {}, {}, {}, {}, {}
    try:
        for name, extra in settings.items():
            dirs[name] = d = workdir / name
            d.mkdir()
            sidecars[name] = start_local_sidecar(d, {**BENCH_CONFIG, **extra})
        for name, sc in sidecars.items():
            clients[name] = GuardClient(sc.target, sc.public_key, step_timeout=5.0)
            clients[name].wait_ready(30)
            digest = clients[name].register_vocabulary(tokens)
            rings[name] = RingWriter.create(slots=2, vocab_size=vocab)
            sessions[name] = clients[name].open_session(digest, SAMPLING, ring=rings[name], policy=SYNTHETIC)
        t = interleave(_transport_calls({}, sessions, pool), rounds, 0.0)
        extra_out = measure(dirs) if measure is not None else {}
    finally:
        for s in sessions.values():
            s.close()
        for r in rings.values():
            r.close()
        for c in clients.values():
            c.close()
        for sc in sidecars.values():
            sc.stop()
    return t, extra_out


def bench_audit(workdir: Path, rounds: int) -> dict[str, Any]:
    """Step latency with the audit off and on under each fsync policy."""
    settings = {
        m: {} if m == "off" else {"audit": {"dir": str(workdir / f"audit-{m}" / "files"), "fsync": m}} for m in AUDIT_MODES
    }

    def sizes(dirs: dict[str, Path]) -> dict[str, Any]:
        return {m: sum(f.stat().st_size for f in (dirs[m] / "files").glob("*.audit")) for m in AUDIT_MODES[1:]}

    t, files = _stepped_in_turn(
        workdir,
        {f"audit-{m}": c for m, c in settings.items()},
        rounds,
        lambda d: sizes({m: d[f"audit-{m}"] for m in AUDIT_MODES}),
    )
    t = {m: t[f"audit-{m}"] for m in AUDIT_MODES}
    out: dict[str, Any] = {"vocab": 49152, "rounds": rounds, **{m: summ(t[m]) for m in AUDIT_MODES}}
    for m in AUDIT_MODES[1:]:
        out[f"{m}_over_off_median"] = median_ratio(t[m], t["off"])
        out[f"{m}_bytes_per_frame"] = files[m] / max(len(t[m]) + 50, 1)  # + the warm-up steps
    return out


def bench_exporter(workdir: Path, rounds: int) -> dict[str, Any]:
    """Step latency with the Prometheus exporter off and on (scraped meanwhile, as deployed)."""
    import socket
    import threading
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = threading.Event()

    def scraper() -> None:  # a Prometheus scraping every 100 ms: far more often than a real one
        while not stop.wait(0.1):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            except OSError:
                pass

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        settings = {"exporter-off": {}, "exporter-off-2": {}, "exporter-on": {"metrics": {"listen": f"127.0.0.1:{port}"}}}
        t, _ = _stepped_in_turn(workdir, settings, rounds)
    finally:
        stop.set()
        thread.join(5)
    return {
        "vocab": 49152,
        "rounds": rounds,
        "off": summ(t["exporter-off"]),
        "on": summ(t["exporter-on"]),
        "on_over_off_median": median_ratio(t["exporter-on"], t["exporter-off"]),
        # two identical sidecars without it: what "no difference" measures as here
        "off2_over_off_median": median_ratio(t["exporter-off-2"], t["exporter-off"]),
    }


def bench_metrics(reps: int) -> list[dict[str, Any]]:
    """Row statistics plus one candidate's metrics, for the top-1 token (greedy and most
    samples: the rank needs no pass) and for another token (the rank counts a pass)."""
    rows = []
    rng = np.random.default_rng(1)
    for vocab in (32768, 49152, 131072):
        x = (rng.standard_normal(vocab) * 3).astype(np.float32)
        top1 = int(np.argmax(x))
        other = (top1 + vocab // 2) % vocab

        def exp_pass(x: np.ndarray = x) -> object:
            return np.exp(x)

        def metrics_top1(x: np.ndarray = x, t: int = top1) -> object:
            return candidate(x, row_stats(x), t)

        def metrics_other(x: np.ndarray = x, t: int = other) -> object:
            return candidate(x, row_stats(x), t)

        def partition_top2(x: np.ndarray = x) -> object:
            return np.partition(x, x.shape[0] - 2)[-2:]

        fns: dict[str, Callable[[], object]] = {
            "exp_pass": exp_pass,
            "top1": metrics_top1,
            "other": metrics_other,
            "partition_top2": partition_top2,
        }
        t = interleave(fns, reps, 0.0)
        row: dict[str, Any] = {
            "vocab": vocab,
            "exp_pass_us": pct(t["exp_pass"], 50) * 1e6,
            "partition_top2_us": pct(t["partition_top2"], 50) * 1e6,
        }
        for key in ("top1", "other"):
            row[f"metrics_{key}_us"] = pct(t[key], 50) * 1e6
            row[f"metrics_{key}_over_exp_median"] = median_ratio(t[key], t["exp_pass"])
        rows.append(row)
    return rows


class _TransportFloor:
    """What any guard pays here before doing any work: per token, copy the logits into the
    ring and make one bare round trip, then evaluate llama.cpp's own greedy choice (driven by
    hand, as GuardedLlama is). On gRPC the round trip is an Echo on a stream; on the fast lane
    it is an ECHO request (the request record, both doorbells, an empty verdict area written
    and read). The ceiling of guarded/unguarded on each lane on this machine."""

    def __init__(self, llama: Any, client: Any, lane: str = "grpc", vocab_digest: str = "") -> None:
        from engine_adapters.client import StreamCall
        from engine_adapters.llama_cpp import LANE_VERDICT_CAPACITY

        from ..ring import REQUEST_ECHO, RingWriter

        self.llama = llama
        # The round trip a token (given the frame's seq) and what ends it, chosen once.
        self._roundtrip: Callable[[int], object]
        self._end: Callable[[], object]
        if lane == "shm":
            self.ring = RingWriter.create(slots=1, vocab_size=llama.n_vocab(), verdict_capacity=LANE_VERDICT_CAPACITY)
            session = client.open_session(vocab_digest, SamplingParams(temperature=0.0), ring=self.ring, lane="shm")
            self._roundtrip = lambda seq: session.lane.roundtrip(0, seq, 5.0, "echo", REQUEST_ECHO)
            self._end = session.close
        else:
            self.ring = RingWriter.create(slots=1, vocab_size=llama.n_vocab())
            echo = StreamCall(client._stub.Echo)
            msg = pb.EchoRequest(payload=b"\0" * 320)  # about a verdict's size
            self._roundtrip = lambda _seq: echo.roundtrip(msg, 5.0, "echo")
            self._end = echo.close

    def run(self, ids: list[int], tokens: int) -> list[int]:
        """Driven by hand as GuardedLlama is: per token the last token's logits into the ring,
        one bare round trip, then llama.cpp's own greedy choice evaluated."""
        from engine_adapters.llama_cpp import last_logits

        llama, out, eos = self.llama, [], self.llama.token_eos()
        llama.eval(list(ids))
        for _ in range(tokens):
            row = last_logits(llama)
            with self.ring.frame(0) as f:
                f.write_row(1, 0, row)
            self._roundtrip(f.seq)
            best = int(row.argmax())
            if best == eos:
                break
            out.append(best)
            if len(out) < tokens:
                llama.eval([best])
        return out

    def close(self) -> None:
        self._end()
        self.ring.close()


def bench_model(ed: LocalSidecar, hm: LocalSidecar, tokens: int, repeats: int, threads: int = 2) -> dict[str, Any]:
    from engine_adapters.client import GuardClient
    from engine_adapters.llama_cpp import GuardedLlama, load_llama, unguarded_greedy

    from ..demo import CHAT

    llama = load_llama(n_threads=threads)
    prompt = CHAT.format("Write a long story about a dragon who learns to paint.")
    ids = llama.tokenize(prompt.encode(), add_bos=True, special=True)
    greedy = SamplingParams(temperature=0.0)
    clients = {
        "ed25519": GuardClient(ed.target, ed.public_key, step_timeout=5.0),
        "hmac": GuardClient(hm.target, hm.public_key, step_timeout=5.0),
    }
    for c in clients.values():
        c.wait_ready(30)
    guarded = {name: GuardedLlama(llama, c) for name, c in clients.items()}
    guarded.update({f"{name}_shm": GuardedLlama(llama, c, lane="shm") for name, c in clients.items()})
    guarded["hmac_shm_spec"] = GuardedLlama(llama, clients["hmac"], lane="shm", speculate=True)

    step_latency: dict[str, list[float]] = {name: [] for name in guarded}
    phases: dict[str, list[tuple[float, ...]]] = {name: [] for name in guarded}

    def run_guarded(name: str) -> list[int]:
        done = guarded[name].complete(ids, max_tokens=tokens, sampling=greedy)
        if done.error is not None:
            raise done.error
        step_latency[name] += [t.latency_s for t in done.tokens[1:]]  # the first step opens the stream
        phases[name] += [t.phases_s for t in done.tokens[1:]]
        return done.token_ids

    floor = _TransportFloor(llama, clients["hmac"])
    lane_floor = _TransportFloor(llama, clients["hmac"], "shm", guarded["hmac_shm"].vocab_digest)
    runs: dict[str, Callable[[], list[int]]] = {
        "unguarded": lambda: unguarded_greedy(llama, ids, tokens),
        "transport_floor": lambda: floor.run(ids, tokens),
        "lane_floor": lambda: lane_floor.run(ids, tokens),
        "ed25519": lambda: run_guarded("ed25519"),
        "hmac": lambda: run_guarded("hmac"),
        "ed25519_shm": lambda: run_guarded("ed25519_shm"),
        "hmac_shm": lambda: run_guarded("hmac_shm"),
        "hmac_shm_spec": lambda: run_guarded("hmac_shm_spec"),
    }
    tps: dict[str, list[float]] = {k: [] for k in runs}
    same = True
    names = list(runs)
    for i in range(repeats + 1):  # the first round warms caches and is not counted
        outputs = {}
        for name in rotation(names, i):
            fn = runs[name]
            llama.reset()  # each run evaluates the prompt from scratch
            t0 = time.perf_counter()
            outputs[name] = fn()
            if i:
                tps[name].append(len(outputs[name]) / (time.perf_counter() - t0))
        same = same and all(out == outputs["unguarded"] for out in outputs.values())
        if i == 0:
            for lat in step_latency.values():
                lat.clear()  # like the tokens/s, the warm-up round's latencies do not count
    floor.close()
    lane_floor.close()
    for g in guarded.values():
        g.close()
    for c in clients.values():
        c.close()
    out: dict[str, Any] = {"tokens": tokens, "repeats": repeats, "n_threads": llama.n_threads, "identical_greedy_output": same}
    for name, values in tps.items():
        out[f"{name}_tok_s_median"] = statistics.median(values)
    for name, lat in step_latency.items():
        out[f"{name}_step_latency"] = summ(lat)
        ph = np.asarray(phases[name]) * 1e6
        out[f"{name}_phases_us_p50"] = {
            "write": float(np.median(ph[:, 0])),
            "wait": float(np.median(ph[:, 1])),
            "verify": float(np.median(ph[:, 2])),
            "sidecar": float(np.median(ph[:, 3])),  # inside the wait; reported by the fast lane only
        }
    out["speculation"] = dict(guarded["hmac_shm_spec"].speculation)
    for name in ("transport_floor", "lane_floor", "ed25519", "hmac", "ed25519_shm", "hmac_shm", "hmac_shm_spec"):
        pairs = list(zip(tps[name], tps["unguarded"], strict=True))
        out[f"{name}_over_unguarded_median"] = median_ratio(tps[name], tps["unguarded"])
        out[f"{name}_overhead_ms_per_token_median"] = statistics.median(1e3 / g - 1e3 / b for g, b in pairs)
    return out


def _phases_cell(p: dict[str, float]) -> str:
    wait = f"{p['wait']:.0f} ({p['sidecar']:.0f})" if p.get("sidecar") else f"{p['wait']:.0f}"
    return f"{p['write']:.0f} / {wait} / {p['verify']:.0f}"


def render(result: dict[str, Any]) -> str:
    """The tables ``run_bench`` prints, from its JSON (docs/benchmarks.md is made from them)."""
    out: list[str] = []
    t = result["transport"]
    out.append(
        table(
            "verdict round trip (µs, p50 / p99; ratio = median of per-round ratios to the echo)",
            ["vocab", "pace", "echo", "ring", "inline", "ring/echo", "inline/echo", "hmac: echo", "ring", "ring/echo"],
            [
                [
                    str(r["vocab"]),
                    f"{r['pace_ms']:.0f} ms",
                    *(f"{r[k]['p50_us']:.0f} / {r[k]['p99_us']:.0f}" for k in ("echo", "ring", "inline")),
                    f"{r['ring_over_echo_median']:.2f}x",
                    f"{r['inline_over_echo_median']:.2f}x",
                    *(f"{r[k]['p50_us']:.0f} / {r[k]['p99_us']:.0f}" for k in ("echo_hmac", "ring_hmac")),
                    f"{r['ring_hmac_over_echo_hmac_median']:.2f}x",
                ]
                for r in t
            ],
        )
    )
    out.append("")
    out.append(
        table(
            "metrics of one row (µs, p50; ratio = median of per-round ratios to the exp pass)",
            ["vocab", "exp pass", "metrics, top-1 chosen", "ratio", "metrics, other chosen", "ratio", "np.partition top-2"],
            [
                [
                    str(r["vocab"]),
                    f"{r['exp_pass_us']:.1f}",
                    f"{r['metrics_top1_us']:.1f}",
                    f"{r['metrics_top1_over_exp_median']:.2f}x",
                    f"{r['metrics_other_us']:.1f}",
                    f"{r['metrics_other_over_exp_median']:.2f}x",
                    f"{r['partition_top2_us']:.1f}",
                ]
                for r in result["metrics"]
            ],
        )
    )
    ln = result["lane"]
    out.append("")
    out.append(
        table(
            f"fast lane round trip (µs, p50 / p99; {ln['vocab']} ids; the same two processes, in turn)",
            ["eventfd ping-pong", "lane, no guard work", "ratio", "lane step", "gRPC echo", "gRPC step", "lane/gRPC step"],
            [
                [
                    *(f"{ln[k]['p50_us']:.0f} / {ln[k]['p99_us']:.0f}" for k in ("eventfd_ping", "lane_echo")),
                    f"{ln['lane_echo_over_eventfd_ping_median']:.2f}x",
                    *(f"{ln[k]['p50_us']:.0f} / {ln[k]['p99_us']:.0f}" for k in ("lane_step", "grpc_echo", "grpc_step")),
                    f"{ln['lane_step_over_grpc_step_median']:.2f}x",
                ]
            ],
        )
    )
    a = result["audit"]
    out.append("")
    out.append(
        table(
            f"step latency with the audit file (µs, p50 / p99; {a['vocab']} ids; ratio = median of per-round ratios to off)",
            ["audit", "step", "ratio", "bytes/frame"],
            [
                [
                    m if m == "off" else f"on, fsync {m}",
                    f"{a[m]['p50_us']:.0f} / {a[m]['p99_us']:.0f}",
                    "1.00x" if m == "off" else f"{a[m + '_over_off_median']:.2f}x",
                    "" if m == "off" else f"{a[m + '_bytes_per_frame']:.0f}",
                ]
                for m in AUDIT_MODES
            ],
        )
    )
    e = result["exporter"]
    out.append("")
    out.append(
        table(
            f"step latency with the Prometheus exporter (µs, p50 / p99; {e['vocab']} ids; scraped every 100 ms)",
            ["exporter", "step", "ratio"],
            [
                ["off", f"{e['off']['p50_us']:.0f} / {e['off']['p99_us']:.0f}", "1.00x"],
                ["off (a second sidecar: the noise floor)", "", f"{e['off2_over_off_median']:.2f}x"],
                ["on", f"{e['on']['p50_us']:.0f} / {e['on']['p99_us']:.0f}", f"{e['on_over_off_median']:.2f}x"],
            ],
        )
    )
    if "model" in result:
        m = result["model"]
        out.append("")
        out.append(
            table(
                f"SmolLM2-135M, greedy, {m['tokens']} tokens, {m['repeats']} rounds of each in turn, the order rotating; "
                "ratio = vs unguarded",
                [
                    "run",
                    "tok/s",
                    "ratio",
                    "ms/token added",
                    "guard step in the loop (µs, p50 / p99)",
                    "write / wait (of it the sidecar's) / verify (µs, p50)",
                ],
                [
                    [
                        f"{label}",
                        f"{m[key + '_tok_s_median']:.1f}",
                        f"{m.get(key + '_over_unguarded_median', 1.0):.3f}",
                        f"{m.get(key + '_overhead_ms_per_token_median', 0.0):.2f}",
                        f"{m[key + '_step_latency']['p50_us']:.0f} / {m[key + '_step_latency']['p99_us']:.0f}"
                        if key + "_step_latency" in m
                        else "",
                        _phases_cell(m[key + "_phases_us_p50"]) if key + "_phases_us_p50" in m else "",
                    ]
                    for key, label in (
                        ("unguarded", "unguarded"),
                        ("transport_floor", "ring + bare gRPC echo (floor)"),
                        ("lane_floor", "ring + bare fast-lane echo (floor)"),
                        ("ed25519", "gRPC lane, Ed25519"),
                        ("hmac", "gRPC lane, HMAC-SHA256"),
                        ("ed25519_shm", "fast lane, Ed25519"),
                        ("hmac_shm", "fast lane, HMAC-SHA256"),
                        ("hmac_shm_spec", "fast lane, HMAC, speculating"),
                    )
                ],
            )
        )
        out.append(f"identical greedy output: {m['identical_greedy_output']}")
    return "\n".join(out)


def run_bench(args: argparse.Namespace) -> int:
    import grpc

    result: dict[str, Any] = {"machine": machine(grpcio=grpc.__version__, platform=platform.platform())}
    with tempfile.TemporaryDirectory(prefix="fse-bench-") as tmp:
        secret = generate_hmac_key(Path(tmp) / "hmac")
        (Path(tmp) / "ed").mkdir()
        (Path(tmp) / "hm").mkdir()
        ed = start_local_sidecar(Path(tmp) / "ed", BENCH_CONFIG)
        hm = start_local_sidecar(Path(tmp) / "hm", BENCH_CONFIG, keys=(secret, secret))
        try:
            print("transport ...", file=sys.stderr)
            result["transport"] = bench_transport(ed, hm, args.rounds, max(args.rounds // 10, 50))
            print("metrics ...", file=sys.stderr)
            result["metrics"] = bench_metrics(args.rounds)
            print("lane ...", file=sys.stderr)
            result["lane"] = bench_lane(ed, args.rounds)
            print("audit ...", file=sys.stderr)
            result["audit"] = bench_audit(Path(tmp), args.rounds)
            print("exporter ...", file=sys.stderr)
            result["exporter"] = bench_exporter(Path(tmp), args.rounds)
            if not args.skip_model:
                print("model ...", file=sys.stderr)
                result["model"] = bench_model(ed, hm, args.tokens, args.repeats, args.threads)
        finally:
            ed.stop()
            hm.stop()
    print(render(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0
