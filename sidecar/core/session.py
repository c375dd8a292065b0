"""One guarded sequence: its parameters, history, evaluators and chain (pure, no I/O).

:meth:`Session.judge` proposes and evaluates without touching the state;
:meth:`Session.commit` applies an outcome (the evaluators advance with it). A rejected
candidate therefore commits nothing, and an ABORT commits only the audit frame that
records it (the sequence ends).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidSessionId, RowError, SessionError
from . import chain
from .batch_draw import Draw, draws_itself
from .compact import CompactRow
from .evaluators import Evaluator, PolicyRules, TokenGuards
from .evidence import DriftTest
from .gate import GateView, RiskGate
from .guards import Trip
from .loops import LoopGuard
from .metrics import row_stats
from .policy import CompiledPolicy
from .redo import Decision, StepOutcome, accept_first, decide
from .sampling import Row, SamplingParams

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Session:
    session_id: str
    tag: int
    params: SamplingParams
    policy: CompiledPolicy
    tokens: Sequence[bytes]  # the registered vocabulary: id -> bytes
    # The tail of prompt + committed tokens that the samplers read: the repetition
    # penalty's window. Trimmed as it grows, so a session's memory does not grow with its
    # length (the loop guard keeps its own bounded window).
    history: list[int] = field(default_factory=list)
    next_step: int = 0
    ppl_sum: float = 0.0
    generated: int = 0
    chain_hash: bytes = b""
    aborted: bool = False
    ring_name: str = ""
    last_active: float = 0.0  # monotonic seconds of the last open/step (set by the service)
    # What it was opened with (the service fills it: a fresh nonce, the digests, the
    # model and key ids); the genesis hash binds it. None: a bare session (tests).
    opening: chain.Opening | None = None
    secret: bytes = field(default=b"", repr=False)  # the opener's credential (the service draws it)
    # The prompt's end that the loop guard reads for requested repetition (None: the
    # history the session starts from).
    prompt: Sequence[int] | np.ndarray | None = None
    evaluators: list[Evaluator] = field(init=False)
    genesis_hash: bytes = field(init=False, default=b"")
    tally: chain.Tally = field(init=False, default_factory=chain.Tally)
    _frame_prefix: bytes = field(init=False, default=b"", repr=False)

    def __post_init__(self) -> None:
        if not SESSION_ID.fullmatch(self.session_id):
            # the id itself is not echoed: it may be huge or hold control characters
            raise InvalidSessionId(f"session_id must match {SESSION_ID.pattern} (got {len(self.session_id.encode())} bytes)")
        if self.opening is None:
            self.opening = chain.Opening(self.session_id, b"", self.params.canonical_bytes(), self.policy.digest, "", "", "")
        self.genesis_hash = self.opening.genesis()
        self._frame_prefix = chain.frame_prefix(self.session_id)
        if not self.chain_hash:
            self.chain_hash = self.genesis_hash
        # In this order: the order of their trips in a verdict.
        pol = self.policy
        prompt = self.history if self.prompt is None else self.prompt
        self.loop_guard = LoopGuard(pol.loop_guard, self.tokens, prompt) if pol.loop_guard.enabled else None
        self._trim_history()
        self.gate = RiskGate(pol.gate) if pol.gate.enabled else None
        self.drift = DriftTest(pol.drift) if pol.drift.enabled else None
        # a rare far-tail draw goes through only while the drift test finds the sampler calm
        self.evaluators = [TokenGuards(pol.guards, self.drift.calm if self.drift is not None else None)]
        if pol.matcher is not None:
            self.evaluators.append(PolicyRules(pol.matcher, self.tokens))
        self.evaluators += [ev for ev in (self.loop_guard, self.gate, self.drift) if ev is not None]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def check_step(self, step: int) -> None:
        if self.aborted:
            raise SessionError(f"session {self.session_id} was aborted at step {self.next_step - 1}; open a new one")
        if step != self.next_step:
            raise SessionError(f"session {self.session_id}: step {step} is out of order, expected {self.next_step}")

    def judge(self, row: Row, step: int, now_s: float = 0.0) -> StepOutcome:
        """Decide on ``row`` (vocab,) or a COMPACT row for ``step`` without changing the session.

        ``now_s``: the step's timestamp; only a gate with ``debounce_s`` reads it.
        """
        self.check_step(step)
        if isinstance(row, CompactRow):
            if row.vocab_size != self.vocab_size:
                raise RowError(
                    f"session {self.session_id}: a COMPACT row over {row.vocab_size} ids, "
                    f"the registered vocabulary has {self.vocab_size}"
                )
            stats = row.stats()
        elif row.ndim != 1 or row.shape[0] != self.vocab_size:
            raise RowError(
                f"session {self.session_id}: logits row has {row.shape[-1] if row.ndim else 0} entries, "
                f"the registered vocabulary has {self.vocab_size}"
            )
        else:
            stats = row_stats(row)
        return decide(
            row, stats, self.history, self.params, self.evaluators, self.ppl_sum, self.generated, step, self.policy.redo, now_s
        )

    def accept_drawn(self, draw: Draw, step: int, now_s: float = 0.0) -> StepOutcome | None:
        """:meth:`judge`'s outcome when ``draw`` (:func:`~sidecar.core.batch_draw.first_draws`
        of this step's row) is accepted as it is; None when the row must go through
        :meth:`judge` (a penalty that now applies, the strict band, any trip)."""
        self.check_step(step)
        if not draws_itself(self.params, self.history):
            return None
        return accept_first(draw.stats, draw.candidate, self.evaluators, self.ppl_sum, self.generated, step, now_s, draw.tail)

    def next_chain_hash(self, step: int, outcome: StepOutcome) -> bytes:
        """The chain hash that committing ``outcome`` at ``step`` would give (nothing changes)."""
        frame = chain.frame_bytes_after(
            self._frame_prefix,
            step,
            outcome.token,
            int(outcome.decision),
            int(outcome.sampler or 0),
            outcome.proposals,
            outcome.reasons,
        )
        return chain.chain_next(self.chain_hash, frame)

    def commit(self, step: int, outcome: StepOutcome, timestamp_ns: int = 0) -> tuple[bytes, bytes]:
        """Apply ``outcome``; returns (previous chain hash, new chain hash).

        ``timestamp_ns``: the step's wall-clock time, for the receipt's tally only (it
        never enters the chain)."""
        self.check_step(step)
        prev = self.chain_hash
        self.chain_hash = self.next_chain_hash(step, outcome)
        self.tally = self.tally.add(int(outcome.decision), timestamp_ns)
        self.next_step = step + 1
        if outcome.decision == Decision.ABORT:
            self.aborted = True
        else:
            assert outcome.proposal is not None
            for ev in self.evaluators:
                ev.commit(outcome.proposal)
            self.history.append(outcome.token)
            self._trim_history()
            self.ppl_sum += outcome.metrics.neg_logprob
            self.generated += 1
        return prev, self.chain_hash

    def _trim_history(self) -> None:
        keep = self.params.repetition_window
        if len(self.history) > 2 * keep + 64:  # amortised: cut once in a while, keep the window
            del self.history[: len(self.history) - keep]

    def gate_view(self) -> GateView | None:
        return self.gate.view() if self.gate is not None else None

    @property
    def e_value(self) -> float:
        return self.drift.e_value if self.drift is not None else 1.0

    def finish(self) -> list[Trip]:
        """Flag hits that only the end of the text confirms (call at close)."""
        return [t for ev in self.evaluators if isinstance(ev, PolicyRules) for t in ev.finish()]
