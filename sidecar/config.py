"""Sidecar configuration: one YAML file, validated once at start-up.

Errors name the field (``guards.running_ppl.threshold: Input should be a valid number``)
and the file; nothing starts on a bad file.

Example file (every field optional except ``signing_key_file`` for ``serve``)::

    listen: unix:///run/fse/fse.sock      # or tcp://127.0.0.1:50051
    signing_key_file: /etc/fse/fse_signing.key
    policies:
      default:
        guards:
          running_ppl: {enabled: true, threshold: 400}
          neg_logprob: {enabled: true, threshold: 6.0}
        rules:                             # the FSE policy matcher (sidecar.core.fse)
          - id: no-secrets
            kind: literal                  # literal (a list of strings) or regex
            patterns: ["BEGIN RSA PRIVATE KEY", "password:"]
            action: block                  # block | halt | flag
            case_insensitive: true
          - id: ssn
            kind: regex
            patterns: ['\\d{3}-\\d{2}-\\d{4}']
            action: halt
            whole_word: true
      strict:
        guards:
          entropy: {enabled: true, threshold: 3.0}
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .logs import LogFormat, LogLevel


def _octal(v: object) -> object:
    """A file mode as people write it: 0o660 or 0660. YAML 1.1 (PyYAML) reads ``0o660`` as a
    string (and ``0660`` as octal already); editors on YAML 1.2 read both as numbers."""
    if isinstance(v, str) and re.fullmatch(r"0o?[0-7]{1,4}", v.strip()):
        return int(v.strip().removeprefix("0o"), 8)
    return v


FileMode = Annotated[
    int,
    BeforeValidator(_octal),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 0o770}, {"type": "string", "pattern": "^0o?[0-7]{1,4}$"}]}
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Guard(_Strict):
    """One per-token guard: on or off, and the value past which it trips."""

    enabled: bool  # off: never evaluated
    threshold: float  # trips above it (margin and logit_variance: below it)

    @field_validator("threshold")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        return v


def _guard(enabled: bool, threshold: float) -> Annotated[Guard, Field()]:
    return Field(default_factory=lambda: Guard(enabled=enabled, threshold=threshold))


class GuardSet(_Strict):
    """Per-token guards: thresholds from the seeds, recalibrated on SmolLM2-135M by ``bench
    quality`` (docs/benchmarks.md). -log p is on at 9 nats (seed 000 says 6): healthy sampled
    text almost never draws a token that unlikely, a hot sampler often does; the hot sampler
    is the drift test's to catch (the protective band), this guard heals the single far-tail
    token. Entropy, rank, margin and max-prob trip on ordinary healthy text (a confident
    instruct model), so they stay opt-in; running PPL, logit variance and L2 norm (seed 001's
    defaults plus the collapse sentinel) are on.
    """

    # seed 000: per-token signals (trip when value > threshold, margin when < threshold)
    neg_logprob: Guard = _guard(True, 9.0)  # -log p of the chosen token, nats: heals a far-tail draw
    entropy: Guard = _guard(False, 3.0)  # of the next-token distribution, nats (opt-in: trips on healthy text)
    rank: Guard = _guard(False, 100.0)  # of the chosen token (0: the most probable)
    margin: Guard = _guard(False, 0.01)  # p(chosen) - max p(other): trips below it
    # seed 001: the fail-fast suite
    running_ppl: Guard = _guard(True, 400.0)  # the session's running perplexity (seed 001's halt band)
    logit_variance: Guard = _guard(True, 0.1)  # a collapsed, flat row: trips below it
    max_prob: Guard = _guard(False, 0.99)  # the most probable token's probability
    l2_norm: Guard = _guard(True, 1e4)  # of the logits row: numerical instability
    # Ignore the running-PPL guard for the first N generated tokens: the PPL of one token is
    # exp(-log p) of that token alone (bench quality, healthy T=0.7: a first token at 683 and
    # 726, every run under 200 from its second token and under 50 from its fourth); the
    # -log p guard judges each of those tokens on its own. 0 = judge from the first token.
    ppl_warmup_tokens: int = Field(default=4, ge=0)
    # A far-tail draw (-log p over its threshold) is let through (with a FLAG) when the
    # sampler that drew it had less than this probability of drawing a token that improbable
    # at that step (its "tail") and the stream is calm (the drift test's e-value under its
    # release_e): a healthy sampler's rare draw, mostly a real word the model rated unlikely
    # (" gray", " creative"). A hot sampler goes there often, and its draw is redone. bench
    # quality's "far-tail draws" line: healthy T=0.7's tails 1.5e-5 to 3.1e-4 (at e-values
    # under 0.06); T=1.5's median 0.14, 0.02 or more in nine of ten, the two under 1e-3 at
    # e-values 0.9 and 8; T=3's 1.2e-3 to 0.93. On prompts outside its set, T=0.7 with a
    # repetition penalty of 1.1 drew tails of 1.1e-3 to 0.013 (all four healed at 0.001);
    # at 0.02 the garbage groups of both prompt sets stayed bit for bit the same (none of
    # their far-tail draws came on a calm stream). 0 = every far-tail draw is redone (so is
    # every one with the drift test off).
    neg_logprob_min_tail: float = Field(default=0.02, ge=0, le=1)


class Rule(_Strict):
    """One policy rule of the FSE matcher (compiled by :mod:`sidecar.core.fse`).

    ``literal`` patterns are strings matched as they are; ``regex`` patterns use the
    syntax that both Hyperscan and Python's ``re`` accept, with a bounded match length.
    """

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]  # named in verdicts, the audit and the metrics
    kind: Literal["literal", "regex"]  # how every pattern of the rule is read
    patterns: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]  # one match of any is a hit
    # block: the token that would complete a match is refused and redrawn; halt: the
    # session is aborted; flag: the hit is recorded (verdict, audit, metrics), text goes on.
    action: Literal["block", "halt", "flag"]
    case_insensitive: bool = False  # letters match in any case
    # The match may not touch a word character (Unicode letter, digit or '_') on either side.
    whole_word: bool = False
    # Match on the text folded per character: NFKC compatibility forms (decomposed), case
    # folded, zero-width and other invisible format characters removed. Implies
    # case_insensitive.
    normalize: bool = False


class RedoBounds(_Strict):
    """How hard the redo tries before ABORT when rules exclude candidates."""

    # Proposals of the request's sampler, each with every blocked token masked, before
    # the strict sampler takes over (with the same mask).
    max_block_retries: int = Field(default=4, ge=0, le=64)
    # Proposals in one step, all samplers together; past it the step is ABORT.
    max_proposals: int = Field(default=16, ge=2, le=256)
    # The strict sampler's repetition penalty (llama.cpp's, over the request's window), when
    # above the request's own: greedy decoding falls into loops, and the strict sampler is
    # what a protective band decodes with. 1 = the request's penalty only.
    strict_repetition_penalty: float = Field(default=1.2, ge=1.0, le=2.0)


class GateEdges(_Strict):
    """Lower edges of the bands on the risk score (HEALTHY below ``drifting``)."""

    drifting: float = Field(default=0.35, gt=0, lt=1)  # watched: shown in verdicts and metrics, no action
    strict: float = Field(default=0.55, gt=0, lt=1)  # every draw is redone by the strict (greedy) sampler
    halt: float = Field(default=0.8, gt=0, le=1)  # the session is aborted

    @model_validator(mode="after")
    def _ordered(self) -> GateEdges:
        if not self.drifting < self.strict < self.halt:
            raise ValueError(f"edges must rise: drifting {self.drifting} < strict {self.strict} < halt {self.halt}")
        return self


class GateConfig(_Strict):
    """The windowed risk gate (sidecar.core.gate). The risk score of a token is the
    weighted mean of three windowed signals, each divided by its scale and clipped to
    [0, 1]: -log p, entropy and log(1 + rank) of the committed tokens, exponentially
    weighted over about ``window`` tokens."""

    enabled: bool = True  # off: no gate bands in verdicts, no strict band, no gate halt
    window: int = Field(default=16, ge=1, le=4096)  # tokens the signals are averaged over (exponentially)
    neg_logprob_scale: float = Field(default=5.0, gt=0)  # nats at which that signal saturates
    entropy_scale: float = Field(default=6.0, gt=0)  # nats of entropy at which that signal saturates
    log_rank_scale: float = Field(default=7.0, gt=0)  # log(1 + rank): 7 ~ rank 1100
    weights: tuple[float, float, float] = (0.5, 0.2, 0.3)  # -log p, entropy, log rank
    edges: GateEdges = Field(default_factory=GateEdges)  # where each band starts on the risk score
    # The band changes only once the score is this far past an edge, up or down (no flapping).
    hysteresis: float = Field(default=0.05, ge=0, lt=0.5)
    # A pending band becomes current after this many consecutive tokens in it ...
    debounce_tokens: int = Field(default=4, ge=1, le=4096)
    # ... and, when > 0, after this many seconds of the step timestamps too.
    debounce_s: float = Field(default=0.0, ge=0)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or abs(sum(v) - 1.0) > 1e-9:
            raise ValueError(f"must be three non-negative numbers that sum to 1, got {list(v)}")
        return v


class LoopGuardConfig(_Strict):
    """Text that repeats itself back to back (sidecar.core.loops)."""

    enabled: bool = True  # off: repetition is never refused
    # The longest unit looked for, in normalised characters (letters and digits).
    max_period_chars: int = Field(default=256, ge=1, le=4096)
    # A unit may repeat back to back this many times (the first character of a fourth
    # repetition is refused), and is never refused while its repetition covers at most
    # min_chars characters ("no no no" stays free, a sixth "the" does not).
    max_repeats: float = Field(default=3, ge=1.5, le=1024)
    min_chars: int = Field(default=16, ge=2, le=1 << 16)  # (see max_repeats)
    # A long unit (a sentence) twice in a row is a loop once the repetition runs past this.
    # 32: a sentence of 16 letters or more is refused at its third copy (100 let "I'm so glad
    # you're here." stand three times at the end of a loop prompt's answer; bench quality).
    max_loop_chars: int = Field(default=32, ge=2, le=1 << 16)
    # A unit that occurs in the prompt (requested repetition) may repeat this often (and
    # always over min_chars): a request bounds it, an unbounded one ("without stopping")
    # too. 8 left a loop prompt's "beep" eight times at the end of its answer (bench quality,
    # loop-greedy: still looping there); 4 changed no run of the legitimate-repetition group.
    prompt_repeats: float = Field(default=4, ge=1.5, le=1024)
    prompt_chars: int = Field(default=4096, ge=0, le=1 << 20)  # normalised characters of the prompt's end kept
    # A numbered item of fewer letters ("12. Goodbye", "Chapter 12"; digits masked) may
    # repeat this often: a list, but a list of one item; the prompt's own item is free.
    max_list_repeats: float = Field(default=16, ge=1.5, le=1 << 16)
    # Babble: the last babble_window letters (with at most a quarter as many digits among
    # them) drawn from at most babble_letters distinct letters ("LARMA, LARA, LERA", "no nah
    # nuh") is a loop of variants, unless its last 8 letters occur in the prompt (0: off).
    babble_letters: int = Field(default=5, ge=0, le=255)
    babble_window: int = Field(default=32, ge=8, le=4096)  # (see babble_letters)
    # A span of recur_chars characters may recur this often in the window, with other text
    # between (a loop of variants: "I'm not sure what you're asking / looking for ...").
    recur_chars: int = Field(default=24, ge=8, le=4096)
    max_recurrences: int = Field(default=3, ge=1, le=1 << 16)  # (see recur_chars)
    # ... and in a Markdown code fence, where statements recur (a guard clause in every
    # method, the same call in every test): 3 there cut a generated word-count function's
    # fourth alike body on prompts outside bench quality's set; a loop of variants in code
    # still passes 8 within the window.
    max_code_recurrences: int = Field(default=8, ge=1, le=1 << 16)
    # Tokens in a row with no letter or digit (whitespace, punctuation) before the next is refused.
    max_blank_tokens: int = Field(default=32, ge=1, le=1 << 16)
    action: Literal["heal", "halt"] = "heal"  # heal: the token that would loop is refused and redrawn; halt: abort
    # Steps over which heals are counted and a healed loop's unit is remembered.
    window: int = Field(default=256, ge=2, le=1 << 16)
    # Steps in the window in which the guard had to refuse a token; one more halts.
    max_heals: int = Field(default=8, ge=0, le=1 << 16)
    # After a heal, this many tokens come from the strict sampler (greedy, with the redo's
    # strict_repetition_penalty), each verdict flagging it: a sampler that just looped
    # would find its way back to the loop (0: no band, neither after a heal nor before one).
    # With 16, healthy greedy text came back to a healed loop 20-40 tokens later (three
    # heals for one loop); 48 holds it off (bench quality: heals per loop, loops at the end).
    # The band also starts before a heal, outside a code fence, once the text stands at a
    # limit its next copy would pass (a long unit twice back to back, a recur_chars span
    # max_recurrences times): healthy greedy heals per 100 tokens 0.13 -> 0.04, loop runs
    # looping at their end 1 of 9 -> 0 (bench quality, 192 tokens, sentences); on prompts
    # outside its set five healthy greedy heals, each a span's fourth time in prose, -> 0.
    band_tokens: int = Field(default=48, ge=0, le=1 << 16)


class DriftConfig(_Strict):
    """The anytime-valid drift test (sidecar.core.evidence)."""

    enabled: bool = True  # off: no evidence in verdicts, no protective band
    # The test's level: its evidence crossing 1/alpha is drift (a false alarm on healthy
    # text has probability at most alpha, however long the session).
    alpha: float = Field(default=0.01, gt=0, lt=1)
    # delta: how many nats more surprising than the model itself a healthy sampler may
    # be per token on average (repetition penalty, rounding); calibrated by bench quality.
    margin_nats: float = Field(default=0.5, ge=0)
    # Bet sizes of the mixture (each a fraction of the largest safe bet).
    bets: tuple[float, ...] = (0.25, 0.5, 0.9)
    # What a crossing of 1/alpha does. protect (heal first): the session enters the
    # protective band: each step's sampler draw is redone by the strict sampler (HEALED),
    # and the band is left once the sampler's evidence, restarted at the entry, has stayed
    # below release_e for release_tokens tokens (hysteresis and debounce, seed 003). halt:
    # the session is aborted at the crossing.
    on_drift: Literal["protect", "halt"] = "protect"
    release_e: float = Field(default=0.1, gt=0, lt=1)  # (see on_drift)
    release_tokens: int = Field(default=8, ge=1)  # (see on_drift)

    @field_validator("bets")
    @classmethod
    def _bets(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < b < 1 for b in v):
            raise ValueError(f"must be one or more fractions in (0, 1), got {list(v)}")
        return v


class Policy(_Strict):
    """What a session is judged by. Sessions choose one by name (``default`` when they name
    none); every part has working defaults."""

    guards: GuardSet = Field(default_factory=GuardSet)  # per-token guards
    rules: list[Rule] = Field(default_factory=list)  # the policy matcher's rules (FSE), ids unique
    redo: RedoBounds = Field(default_factory=RedoBounds)  # how hard a step is redone before ABORT
    gate: GateConfig = Field(default_factory=GateConfig)  # the windowed risk gate
    loop_guard: LoopGuardConfig = Field(default_factory=LoopGuardConfig)  # text repeating itself
    drift: DriftConfig = Field(default_factory=DriftConfig)  # the anytime-valid drift test

    @model_validator(mode="after")
    def _unique_rule_ids(self) -> Policy:
        seen: dict[str, int] = {}
        for i, r in enumerate(self.rules):
            if r.id in seen:
                raise ValueError(f"rules[{i}] (id {r.id!r}).id: duplicate rule id, already used by rules[{seen[r.id]}]")
            seen[r.id] = i
        return self


class TlsConfig(_Strict):
    """mTLS for a TCP listener: the sidecar's certificate and key, and the CA whose
    client certificates it accepts (a client without one is refused at the handshake)."""

    cert_file: Path  # the sidecar's certificate (PEM)
    key_file: Path  # its private key (PEM)
    client_ca_file: Path  # the CA that signed the engines' client certificates (PEM)


class AuditConfig(_Strict):
    """Audit files (one per session opening) and when they reach the disk."""

    # None: no audit files (the chain still runs inside the verdicts).
    dir: Path | None = None
    # every_frame: fsync each frame as soon as the syncer thread gets to it; interval:
    # every fsync_every_frames frames or fsync_interval_ms, whichever comes first; close:
    # only when the session closes. Never on the step path; closing always syncs.
    fsync: Literal["every_frame", "interval", "close"] = "interval"
    fsync_every_frames: int = Field(default=64, ge=1)  # (see fsync)
    fsync_interval_ms: float = Field(default=200.0, gt=0)  # (see fsync)
    # A signed checkpoint (the receipt's fields, its own domain) after every
    # checkpoint_every_frames frames, or after the first frame checkpoint_interval_ms past
    # the last one: a file whose close record never comes (a crash) is signed up to there,
    # so `audit verify` can tell a forged frame from a real one without the close record.
    checkpoint_every_frames: int = Field(default=64, ge=1)
    checkpoint_interval_ms: float = Field(default=1000.0, gt=0)  # (see checkpoint_every_frames)


def _host_port(v: str | None) -> str | None:
    if v is None:
        return v
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'must be "host:port" with a port in 0-65535, got {v!r}')
    return v


class MetricsConfig(_Strict):
    """The Prometheus exporter: ``listen`` is "host:port" for ``/metrics`` (port 0: any free
    one, logged); unset, nothing is exported. Serve it on the pod's IP (or 0.0.0.0) for a
    Prometheus outside the pod; it shows no session ids, tokens or text."""

    listen: str | None = None  # "host:port" of /metrics; unset: no exporter

    _listen = field_validator("listen")(_host_port)


class LaneConfig(_Strict):
    """The fast lane (a Unix socket beside the gRPC one, `<socket>.lane`)."""

    enabled: bool = True  # off: engines step over gRPC only


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SidecarConfig(_Strict):
    """The sidecar's configuration file (``fse-sidecar serve --config FILE``)."""

    listen: str = "unix:///tmp/fse-sidecar.sock"  # unix:///path.sock, or tcp://host:port (off loopback: tls)
    # The key verdicts are signed with (fse-sidecar keygen): an Ed25519 PEM or an fse HMAC
    # key; the scheme follows the file. Required to serve; refused if others may read it.
    signing_key_file: Path | None = None
    # Policies by name; "default" is required (a session that names none gets it).
    policies: dict[str, Policy] = Field(default_factory=lambda: {"default": Policy()})
    # Largest vocabulary accepted; bounds memory per registered vocabulary and ring row.
    max_vocab_size: int = Field(default=1 << 20, gt=1)
    # Registered vocabularies kept; past it the least recently used one that no open
    # session uses is dropped (a client registers it again when it needs it).
    max_vocabularies: int = Field(default=16, gt=0)
    # Total bytes of a RegisterVocabulary message (token bytes plus framing): refused
    # before it is parsed (Llama 3's 128k vocabulary is ~1 MB, a 1M-token one ~12 MB).
    max_vocab_bytes: int = Field(default=32 << 20, ge=1 << 16, le=1 << 30)
    max_sessions: int = Field(default=4096, gt=0)  # sessions open at once, all clients together
    # Sessions open at once from one client: a TCP connection, or with mTLS one client
    # certificate. gRPC does not tell Unix-socket clients apart: there, max_sessions only.
    max_sessions_per_client: int = Field(default=1024, gt=0)
    # Rows of one StepBatch (a batched engine's decoding step): bounds the message and the
    # time one call holds the event loop.
    max_batch_rows: int = Field(default=256, gt=0, le=4096)
    # Slots of a fast-lane ring: a doorbell reads each slot's request record.
    max_lane_slots: int = Field(default=64, gt=0, le=4096)
    # Longest prompt an OpenSession may carry (only its last repetition_window ids are kept).
    max_prompt_tokens: int = Field(default=1 << 20, gt=0)
    # A session with no step for this long is closed (an engine that died without
    # CloseSession would otherwise hold its slot and its ring mapping forever).
    session_idle_timeout_s: float = Field(default=300.0, gt=0)
    # Who may call the ReloadPolicy RPC. It only makes the sidecar read its own file again
    # (no client sends policy content), so by default anyone who may connect may ask;
    # false keeps reloads to SIGHUP and watch_config_s; under mTLS, reload_identities
    # names the client certificates (common name or URI SAN, e.g. a SPIFFE id) allowed.
    allow_reload_rpc: bool = True
    reload_identities: list[str] | None = None  # (see allow_reload_rpc)
    # A policy reload (ReloadPolicy, SIGHUP, the config watch) compiles in a child process:
    # it is killed past reload_timeout_s (a config path that blocks, e.g. a FIFO, would hold
    # the reload lock for ever) and may use at most reload_max_memory_mb of address space
    # (100k literal rules peak at ~160 MB; YAML aliases can multiply a rule list).
    reload_timeout_s: float = Field(default=60.0, gt=0)
    reload_max_memory_mb: int = Field(default=1024, ge=128)  # (see reload_timeout_s)
    log_level: LogLevel = "info"  # session ids are logged at debug only
    # text: for people (key=value fields after the message); json: one object per line, for
    # a log pipeline (serve --log-format overrides it)
    log_format: LogFormat = "text"
    # The Unix socket's mode and group: the owner only by default; give a group (and
    # 0o660) when the engine runs as another user that shares it.
    unix_socket_mode: FileMode = Field(default=0o600, ge=0, le=0o770)
    unix_socket_group: str | None = None  # (see unix_socket_mode)
    # The longest repetition window a session may ask for (the ids the sidecar keeps of
    # each session's prompt and output for the penalty): bounds a session's memory.
    max_repetition_window: int = Field(default=4096, ge=0, le=1 << 20)
    # TCP: mutual TLS. Required for any non-loopback address unless allow_insecure_tcp.
    tls: TlsConfig | None = None
    allow_insecure_tcp: bool = False  # true: a non-loopback tcp:// listener without tls, said out loud
    audit: AuditConfig = Field(default_factory=AuditConfig)  # audit files (off unless dir is set)
    lane: LaneConfig = Field(default_factory=LaneConfig)  # the shared-memory fast lane
    # gRPC server reflection (grpc.reflection.v1 and v1alpha): generic tools (grpcurl,
    # grpcui, Postman) list and call the API without the .proto files. It reveals only the
    # schema, which is public in proto/; turn it off to expose nothing beyond the calls.
    reflection: bool = True
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # the Prometheus exporter (off unless listen is set)
    # "host:port" serving only grpc.health.v1 over plain TCP: the kubelet's gRPC probes
    # cannot dial a Unix socket. It answers the same statuses as the main socket and
    # nothing else (no GuardService there). Unset: no such port.
    health_listen: str | None = None
    # Poll the configuration file every this many seconds and reload it when it changes
    # (a Kubernetes ConfigMap update swaps the file under a mounted volume). Unset: reload
    # only on SIGHUP or ReloadPolicy.
    watch_config_s: float | None = Field(default=None, gt=0, le=3600)

    _health_listen = field_validator("health_listen")(_host_port)

    @field_validator("unix_socket_mode")
    @classmethod
    def _owner_and_group_only(cls, v: int) -> int:
        if v & 0o007:
            raise ValueError(f"{v:#o} lets every user of the machine connect: give a group (0o660 and unix_socket_group)")
        return v

    # serve --record DIR: every session's opening, rows and ledger, for `fse-sidecar replay`.
    record_dir: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix://") and len(v) > len("unix://"):
            return v
        if v.startswith("tcp://"):
            host, _, port = v[len("tcp://") :].rpartition(":")
            if host and port.isdigit() and 0 < int(port) < 65536:
                return v
        raise ValueError("must be unix:///path/to.sock or tcp://host:port")

    @model_validator(mode="after")
    def _default_policy(self) -> SidecarConfig:
        if "default" not in self.policies:
            raise ValueError("policies must define 'default'")
        return self

    @model_validator(mode="after")
    def _transport_security(self) -> SidecarConfig:
        if self.listen.startswith("unix://"):
            if self.tls is not None:
                raise ValueError("tls applies to tcp:// listeners; a Unix socket is guarded by its mode and group")
            return self
        host = self.listen[len("tcp://") :].rpartition(":")[0]
        if self.tls is None and not self.allow_insecure_tcp and not _is_loopback(host):
            raise ValueError(
                f"listen {self.listen}: a non-loopback address serves prompts and verdicts in clear without tls "
                "(cert_file, key_file, client_ca_file); set allow_insecure_tcp: true to accept that"
            )
        return self

    def grpc_address(self) -> str:
        """The address in grpcio's syntax (unix:PATH or host:port)."""
        if self.listen.startswith("unix://"):
            return "unix:" + self.listen[len("unix://") :]
        return self.listen[len("tcp://") :]


def parse_config(data: object, source: str = "<config>") -> SidecarConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_where(data, err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def _where(data: object, loc: tuple[int | str, ...]) -> str:
    """A pydantic location as a path a person can find: ``policies.default.rules[2] (id 'ssn').action``."""
    parts: list[str] = []
    node = data
    for key in loc:
        if isinstance(key, int):
            label = f"[{key}]"
            item = node[key] if isinstance(node, list) and 0 <= key < len(node) else None
            if parts and parts[-1] == "rules" and isinstance(item, dict) and isinstance(item.get("id"), str):
                label += f" (id {item['id']!r})"
            parts[-1:] = [(parts[-1] if parts else "") + label]
            node = item
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "<root>"


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> SidecarConfig:
    """Read and validate ``path``; ``overrides`` (command-line flags) win over the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if overrides and (data is None or isinstance(data, dict)):
        data = {**(data or {}), **overrides}
    return parse_config(data, str(p))
