"""Prometheus metrics of the guard (docs/observability.md): the "Glass Box" ECG.

A thin shell: the server tells an :class:`Exporter` of each verdict, refusal and session
event; the exporter turns them into counters and histograms in its own registry (no global
state) and ``serve_metrics`` exposes that registry at ``/metrics``. No label holds a
session id, a token or free text: decisions, guards, status codes and bands are fixed
sets, and rule ids are bounded by the configured policies.

Buckets follow each value's real range, measured on the embedded model under guard
(``tests/test_prometheus_e2e.py`` scraping a real generation, the README's picture): a
step is judged in ~1.2 ms p50 with a tail to ~10 ms p99 while llama.cpp shares the
machine; -log p of a committed token is ~0.8 nats p50, ~2.6 p90, 6-7 p99 (the 9-nat
guard); entropy ~2 nats p50, ~5.7 p99 (ln of a 49k vocabulary is 10.8); the perplexity
buckets hold seed 001's bands (healthy < 200 <= drifting <= 400 < halt).
"""

from __future__ import annotations

import math
import platform
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ._pb.fse.v1 import guard_pb2 as pb
from .bounded_http import BoundedThreadingMixIn, best_family
from .config import GuardSet

LATENCY_BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
NLP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.5, 8.0, 10.0, 15.0)
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 11.0)
MARGIN_BUCKETS = (-0.5, -0.1, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)
PPL_BUCKETS = (1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 400.0, 1000.0, 1e4)

DECISIONS = {pb.DECISION_ACCEPT: "accept", pb.DECISION_HEALED: "healed", pb.DECISION_ABORT: "abort"}
GATE_BANDS = {0: "none", 1: "healthy", 2: "drifting", 3: "strict", 4: "halt"}
HEALTH_BANDS = {pb.HEALTH_BAND_HEALTHY: "healthy", pb.HEALTH_BAND_DRIFTING: "drifting", pb.HEALTH_BAND_HALT: "halt"}
ACTIONS = {pb.ACTION_REDO: "redo", pb.ACTION_BLOCK: "block", pb.ACTION_HALT: "halt", pb.ACTION_FLAG: "flag"}
CLOSE_OUTCOMES = ("closed", "aborted", "reaped", "dropped")
# Every code a trip that is not a rule hit can carry: the token guards, the stream-level
# evaluators and the step's own (pre-created at 0, so an alert on "audit" has a series).
GUARDS = tuple(n for n in GuardSet.model_fields if n != "ppl_warmup_tokens") + (
    "loop",
    "gate",
    "drift",
    "non_finite",
    "audit",
    "redo_exhausted",
    "no_allowed_token",
)
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(slots=True)
class _SessionView:
    """An open session as its last verdict left it (no label: only counted)."""

    health: str = "healthy"  # its running-perplexity band
    gate: int = 0  # its gate band (0: none yet)
    ppl: float = 0.0  # its running perplexity


class _BandCollector(Collector):
    """Live sessions, and how many sit in each health band, read at scrape time."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        bands = [view.health for view in list(self.exporter._sessions.values())]  # list(): one C call, safe against the loop
        live = GaugeMetricFamily("fse_live_sessions", "Sessions open now")
        live.add_metric([], float(self.exporter.live()))
        yield live
        per = GaugeMetricFamily(
            "fse_sessions_by_health_band", "Open sessions by the health band of their last verdict", labels=["band"]
        )
        counts = Counter(bands)
        for band in HEALTH_BANDS.values():
            per.add_metric([band], float(counts.get(band, 0)))
        yield per


class Exporter:
    """The guard's metrics in ``registry``. Called from the event loop only; read by the
    HTTP thread of :func:`serve_metrics` (prometheus-client's metrics are thread-safe)."""

    def __init__(self, registry: CollectorRegistry, live: Callable[[], int] | None = None) -> None:
        """``live``: how many sessions are open (the service's count; by default the
        sessions this exporter was told of)."""
        self.registry = registry
        self.live = live if live is not None else (lambda: len(self._sessions))
        self._sessions: dict[str, _SessionView] = {}  # what the last verdict of each open session said
        self._pending: list[tuple[str, pb.Verdict, float]] = []  # verdicts sent, not yet counted
        # A `_created` series per counter and histogram doubles what every scrape stores for a
        # timestamp nobody queries (rate() handles resets): off, process-wide, before any is made.
        disable_created_metrics()
        r = registry
        # The sidecar's own CPU, memory, file descriptors and start time (process_*), and
        # python_info: what an operator reads first when the node is busy.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.latency = Histogram(
            "fse_verdict_latency_seconds", "Time the sidecar takes to judge and sign a step", registry=r, buckets=LATENCY_BUCKETS
        )
        self.entropy = Histogram(
            "fse_token_entropy_nats", "Entropy of the next-token distribution", registry=r, buckets=ENTROPY_BUCKETS
        )
        self.nlp = Histogram("fse_token_neg_logprob_nats", "-log p of the committed token", registry=r, buckets=NLP_BUCKETS)
        self.margin = Histogram(
            "fse_token_margin", "p(committed) - max p(other) (probability units)", registry=r, buckets=MARGIN_BUCKETS
        )
        self.window_ppl = Histogram(
            "fse_window_perplexity", "The gate's windowed perplexity after each step", registry=r, buckets=PPL_BUCKETS
        )
        self.final_ppl = Histogram(
            "fse_session_perplexity", "Running perplexity of a session when it closes", registry=r, buckets=PPL_BUCKETS
        )
        self.verdicts = PromCounter("fse_verdicts", "Verdicts by decision", ["decision"], registry=r)
        self.redos = PromCounter("fse_redos", "Steps whose first proposal was refused, by outcome", ["outcome"], registry=r)
        self.trips = PromCounter(
            "fse_guard_trips", "Guard trips (a guard, the gate, the loop guard, the drift test...)", ["guard"], registry=r
        )
        self.hits = PromCounter("fse_policy_hits", "Policy rule matches by rule id and action", ["rule", "action"], registry=r)
        self.transitions = PromCounter("fse_gate_transitions", "Gate band changes", ["from_band", "to_band"], registry=r)
        self.opened = PromCounter("fse_sessions_opened", "Sessions opened", registry=r)
        self.closed = PromCounter("fse_sessions_closed", "Sessions that ended, by outcome", ["outcome"], registry=r)
        self.refused = PromCounter("fse_steps_refused", "Steps answered with an error instead of a verdict", ["code"], registry=r)
        self.info = Info("fse_build", "The sidecar's build", registry=r)
        self.info.info(
            {
                "version": _version("libfse"),
                "python": platform.python_version(),
                "grpcio": _version("grpcio"),
                "protobuf": _version("protobuf"),
            }
        )
        # Pre-create the label sets that are known up front, so every series exists (as 0)
        # before the first event: rate() and the dashboard see a zero, not "no data".
        for d in DECISIONS.values():
            self.verdicts.labels(d)
        for o in ("healed", "aborted"):
            self.redos.labels(o)
        for o in CLOSE_OUTCOMES:
            self.closed.labels(o)
        for g in GUARDS:
            self.trips.labels(g)
        r.register(_BandCollector(self))

    # -- events -----------------------------------------------------------------------------
    def session_opened(self, session_id: str) -> None:
        self.opened.inc()
        self._sessions[session_id] = _SessionView()

    def session_gone(self, session_id: str, why: str) -> None:
        """A hook of GuardService.on_drop: count how the session ended and forget it."""
        view = self._sessions.pop(session_id, None)
        if why in CLOSE_OUTCOMES:
            self.closed.labels(why).inc()
            if view is not None and math.isfinite(view.ppl) and view.ppl > 0:
                self.final_ppl.observe(view.ppl)

    def note_verdict(self, session_id: str, v: pb.Verdict, seconds: float) -> None:
        """Count ``v`` at the next :meth:`flush`: the lanes flush after the answer has left,
        so the step never waits for its metrics."""
        self._pending.append((session_id, v, seconds))
        if len(self._pending) > 64:  # a caller that never flushes still stays bounded
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for session_id, v, seconds in pending:
            self.verdict(session_id, v, seconds)

    def verdict(self, session_id: str, v: pb.Verdict, seconds: float) -> None:
        self.latency.observe(seconds)
        decision = DECISIONS.get(v.decision, "abort")
        self.verdicts.labels(decision).inc()
        m = v.metrics
        if math.isfinite(m.entropy_nats):  # a non-finite row has NaN metrics: nothing to plot
            self.entropy.observe(m.entropy_nats)
            self.nlp.observe(m.neg_logprob_nats)
            self.margin.observe(m.margin)
        if v.stream.window_ppl > 0:
            self.window_ppl.observe(v.stream.window_ppl)
        if decision == "healed":
            self.redos.labels("healed").inc()
        elif decision == "abort" and len(v.proposals) > 1:
            self.redos.labels("aborted").inc()
        self._count_reasons(v.reasons)
        view = self._sessions.get(session_id)
        if view is not None:
            view.health, view.ppl = HEALTH_BANDS.get(v.band, "halt"), m.running_ppl
            after = int(v.stream.band)
            if after != view.gate:
                self.transitions.labels(GATE_BANDS.get(view.gate, "none"), GATE_BANDS.get(after, "none")).inc()
                view.gate = after

    def _count_reasons(self, reasons: Iterable[pb.Reason]) -> None:
        for r in reasons:
            if r.span_end > 0:  # a rule match always spans at least one byte; a guard never does
                self.hits.labels(r.code, ACTIONS.get(r.action, "flag")).inc()
            else:
                self.trips.labels(r.code).inc()

    def step_refused(self, code: int) -> None:
        self.refused.labels(_CODE_NAMES.get(code, "UNKNOWN")).inc()


class _MetricsServer(BoundedThreadingMixIn, WSGIServer):
    pass


class _MetricsHandler(WSGIRequestHandler):
    timeout = 5.0  # a scrape's request is a few hundred bytes: a client that stalls is cut off

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged."""


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, max_connections: int = 16
) -> tuple[int, threading.Thread, WSGIServer]:
    """``/metrics`` over HTTP in a daemon thread (prometheus_client's WSGI app; our server:
    at most ``max_connections`` handler threads, each read bounded by a timeout, where
    prometheus_client's own keeps a thread per slow client for ever); returns the bound
    port, the thread and the server."""
    family, addr = best_family(host, port)
    server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
    server: _MetricsServer = make_server(  # type: ignore[assignment]
        addr, port, make_wsgi_app(registry), server_class, handler_class=_MetricsHandler
    )
    server.bound(max_connections)
    thread = threading.Thread(target=server.serve_forever, name="fse-metrics", daemon=True)
    thread.start()
    return server.server_port, thread, server
