"""The vLLM adapters' bookkeeping against stand-ins of both of vLLM's interfaces
(tests/standins/), driven like vLLM drives them, with real logits (the embedded SmolLM2
through transformers) and a real sidecar.

V1: a persistent batch that fills the lowest free index, condenses by moving the last
requests into holes (one-way moves), and swaps rows; every change reaches the processor
as vLLM's ``BatchUpdate`` (removed, added, moved). Model Runner V2: request slots from a
free list (reused after a request finishes, with no removal call), rows in a new order
every step through ``idx_mapping_np``. Either way each request must get exactly its own
verdicts: guarded greedy equals the same request decoded alone, unguarded rows pass as
they are and are never sent to the sidecar.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from engine_adapters.outcomes import OutcomeBoard

STANDINS = Path(__file__).parent / "standins"


@pytest.fixture(scope="module")
def vllm_mod() -> Iterator[ModuleType]:
    """engine_adapters.vllm imported against the stand-ins (only for this module)."""
    sys.path.insert(0, str(STANDINS))
    sys.modules.pop("engine_adapters.vllm", None)
    try:
        yield importlib.import_module("engine_adapters.vllm")
    finally:
        sys.path.remove(str(STANDINS))
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.") or n == "engine_adapters.vllm"]:
            del sys.modules[name]


@pytest.fixture(autouse=True)
def fresh_engine_process(vllm_mod) -> None:
    vllm_mod._claimed = False  # each test is an engine process of its own


def sp(vllm_mod: ModuleType, policy: str | None = None, key: str | None = None, **kw: Any) -> Any:
    """vLLM's SamplingParams of a request (greedy unless told), with its vllm_xargs."""
    SamplingParams = sys.modules["vllm"].SamplingParams
    extra = {k: v for k, v in (("fse_policy", policy), ("fse_request", key)) if v is not None}
    return SamplingParams(extra_args=extra or None, **{"temperature": 0.0, **kw})


def test_every_request_is_guarded_under_the_operators_default_policy_and_its_own_sampling(vllm_mod, monkeypatch) -> None:
    monkeypatch.delenv("FSE_POLICY", raising=False)
    monkeypatch.delenv("FSE_POLICIES", raising=False)
    bare = vllm_mod.guard_args(sys.modules["vllm"].SamplingParams())  # a request that says nothing
    assert bare.policy == "default" and bare.params.temperature == 1.0 and bare.key is None
    assert 0 <= bare.params.seed < 2**63  # no seed: a random one, not a fixed one
    got = vllm_mod.guard_args(sp(vllm_mod, temperature=0.7, top_k=-1, top_p=0.9, min_p=0.05, seed=-3, repetition_penalty=1.1))
    p = got.params
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.seed) == (0.7, 0, 0.9, 0.05, 1.1, 2**64 - 3)
    assert vllm_mod.guard_args(sp(vllm_mod, temperature=1e-6)).params.greedy  # vLLM's own greedy cut-off


def test_a_request_picks_only_among_the_policies_the_operator_allows(vllm_mod, monkeypatch) -> None:
    v = vllm_mod.FseLogitsProcessor
    monkeypatch.setenv("FSE_POLICY", "default")
    monkeypatch.delenv("FSE_POLICIES", raising=False)
    with pytest.raises(ValueError, match=r"fse_policy: 'strict' is not a policy this server allows \(allowed: \['default'\]\)"):
        v.validate_params(sp(vllm_mod, "strict"))
    monkeypatch.setenv("FSE_POLICIES", "strict, lenient")
    v.validate_params(sp(vllm_mod, "strict"))
    assert vllm_mod.guard_args(sp(vllm_mod, "lenient")).policy == "lenient"
    monkeypatch.setenv("FSE_POLICY", "strict")  # the operator's default need not be "default"
    assert vllm_mod.guard_args(sp(vllm_mod)).policy == "strict"
    with pytest.raises(ValueError, match="fse_policy: 1 is not a policy"):
        v.validate_params(sp(vllm_mod, 1))


def test_admission_refuses_what_would_act_after_the_guard_naming_it(vllm_mod) -> None:
    v = vllm_mod.FseLogitsProcessor
    v.validate_params(sp(vllm_mod, temperature=0.7, top_k=5, seed=3, repetition_penalty=1.2))
    for name, value in (
        ("ignore_eos", True),
        ("min_tokens", 4),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.5),
        ("logit_bias", {1: 2.0}),
        ("allowed_token_ids", [1, 2]),
        ("bad_words", ["x"]),
        ("structured_outputs", object()),
        ("thinking_token_budget", 0),
    ):
        with pytest.raises(ValueError, match=f"the guard refuses {name} "):
            v.validate_params(sp(vllm_mod, **{name: value}))
    with pytest.raises(ValueError, match=r"ignore_eos .*; min_tokens"):
        vllm_mod.FseLogitsProcessorV2.validate_params(sp(vllm_mod, ignore_eos=True, min_tokens=2))
    with pytest.raises(ValueError, match=r"unknown guard keys \['fse', 'fse_polcy'\]"):
        v.validate_params(sys.modules["vllm"].SamplingParams(extra_args={"fse": True, "fse_polcy": "x"}))
    with pytest.raises(ValueError, match="fse_request is the server's own key"):
        v.validate_params(sp(vllm_mod, key="../../etc/passwd"))
    with pytest.raises(ValueError, match="sampling.top_p must be in"):
        v.validate_params(sp(vllm_mod, top_p=0.0))


def test_the_processor_needs_the_sidecar_and_key_from_the_pods_environment(vllm_mod, monkeypatch) -> None:
    monkeypatch.delenv("FSE_SIDECAR", raising=False)
    monkeypatch.delenv("FSE_PUBLIC_KEY", raising=False)
    with pytest.raises(ValueError, match="FSE_SIDECAR .* FSE_PUBLIC_KEY"):
        vllm_mod.FseLogitsProcessorV2(config("/nonexistent"), None)


def test_the_one_name_to_load_builds_the_runner_vllms_own_configuration_picks(vllm_mod, monkeypatch) -> None:
    v1 = sys.modules["vllm.v1.sample.logits_processor"].LogitsProcessor
    v2 = sys.modules["vllm.v1.worker.gpu.sample.logits_processor.interface"].LogitsProcessor
    assert issubclass(vllm_mod.FseLogitsProcessor, v1) and issubclass(vllm_mod.FseLogitsProcessor, v2)  # both loaders' checks
    monkeypatch.setenv("FSE_SIDECAR", "unix:///nonexistent")
    monkeypatch.setenv("FSE_PUBLIC_KEY", "/nonexistent")
    built = []
    monkeypatch.setattr(vllm_mod, "_Guard", lambda cfg: built.append(cfg) or SimpleNamespace())
    for v2_runner, cls in ((True, vllm_mod.FseLogitsProcessorV2), (False, vllm_mod.FseLogitsProcessorV1)):
        c = config("/nonexistent")
        c.use_v2_model_runner = v2_runner
        vllm_mod._claimed = False
        args = (None,) if v2_runner else (torch.device("cpu"), False)
        assert type(vllm_mod.FseLogitsProcessor(c, *args)) is cls
    assert len(built) == 2


def test_tensor_parallel_and_speculative_engines_are_refused_at_start(vllm_mod, monkeypatch) -> None:
    monkeypatch.setenv("FSE_SIDECAR", "unix:///nonexistent")
    monkeypatch.setenv("FSE_PUBLIC_KEY", "/nonexistent")
    c = config("/nonexistent")
    c.parallel_config.tensor_parallel_size = 2
    with pytest.raises(ValueError, match="tensor/pipeline parallelism"):
        vllm_mod.FseLogitsProcessorV1(c, torch.device("cpu"), False)
    c = config("/nonexistent")
    c.speculative_config = object()
    with pytest.raises(ValueError, match="speculative decoding"):
        vllm_mod.FseLogitsProcessorV2(c, None)


def config(tokenizer_dir: str, vocab: int = 49152, seqs: int = 8) -> Any:
    """The fields of vLLM's VllmConfig the adapter reads."""
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        speculative_config=None,
        scheduler_config=SimpleNamespace(max_num_seqs=seqs),
        model_config=SimpleNamespace(
            model="SmolLM2-135M-Instruct",
            tokenizer=tokenizer_dir,
            tokenizer_revision=None,
            trust_remote_code=False,
            dtype=torch.float32,
            get_vocab_size=lambda: vocab,
        ),
    )


# ------------------------------------------------------------------ driving the interfaces


@dataclass
class Req:
    name: str
    prompt: list[int]
    params: Any
    max_tokens: int
    output: list[int] = field(default_factory=list)
    done: bool = False
    slot: int = -1


class Model:
    """Next-token logits of a sequence, computed alone (the reference and the batch agree)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(self, ids: list[int]) -> torch.Tensor:
        key = tuple(ids)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.model(torch.tensor([ids])).logits[0, -1].float()
        return self._cache[key].clone()

    def greedy(self, prompt: list[int], n: int, eos: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            t = int(self.logits(prompt + out).argmax())
            out.append(t)
            if t == eos:
                break
        return out


def _finish(r: Req, token: int, eos: int) -> None:
    r.output.append(token)
    if token == eos or len(r.output) >= r.max_tokens:
        r.done = True


def drive_v1(proc: Any, model: Model, arrivals: dict[int, list[Req]], eos: int, seed: int) -> int:
    """vLLM's persistent batch (InputBatch) around a V1 processor; returns the steps run."""
    iface = sys.modules["vllm.v1.sample.logits_processor.interface"]
    rng = np.random.default_rng(seed)
    rows: list[Req | None] = []
    step = 0
    while step == 0 or any(r is not None for r in rows) or any(k >= step for k in arrivals):
        removed = [i for i, r in enumerate(rows) if r is not None and r.done]
        for i in removed:
            rows[i] = None
        added = []
        for r in arrivals.get(step, []):  # the lowest free index first
            i = next((j for j, x in enumerate(rows) if x is None), len(rows))
            rows[i:i] = [] if i < len(rows) else [None]
            rows[i] = r
            added.append((i, r.params, list(r.prompt), r.output))
        moved = []
        while None in rows:  # condense: the last request moves into the first hole
            hole = rows.index(None)
            while rows and rows[-1] is None:
                rows.pop()
            if hole >= len(rows):
                break
            moved.append((len(rows) - 1, hole, iface.MoveDirectionality.UNIDIRECTIONAL))
            rows[hole] = rows.pop()
        if len(rows) >= 2 and rng.random() < 0.5:
            a, b = (int(x) for x in rng.choice(len(rows), 2, replace=False))
            moved.append((a, b, iface.MoveDirectionality.SWAP))
            rows[a], rows[b] = rows[b], rows[a]
        changed = removed or added or moved
        proc.update_state(iface.BatchUpdate(len(rows), removed, added, moved) if changed else None)
        if rows:
            live: list[Req] = [r for r in rows if r is not None]
            logits = torch.stack([model.logits(r.prompt + r.output) for r in live])
            out = proc.apply(logits)
            for i, r in enumerate(live):
                _finish(r, int(out[i].argmax()), eos)
        step += 1
    return step


def drive_v2(proc: Any, model: Model, state: Any, arrivals: dict[int, list[Req]], eos: int, seed: int) -> int:
    """Model Runner V2 around a processor: slots from a free list, rows shuffled each step."""
    iface = sys.modules["vllm.v1.worker.gpu.sample.logits_processor.interface"]
    rng = np.random.default_rng(seed)
    free = list(range(state.max_num_reqs))[::-1]
    running: list[Req] = []
    waiting: list[Req] = []
    step = 0
    while step == 0 or running or waiting or any(k >= step for k in arrivals):
        for r in [r for r in running if r.done]:  # finished: the slot is free, no call for it
            running.remove(r)
            free.append(r.slot)
        waiting += arrivals.get(step, [])
        while waiting and free:  # the scheduler admits a waiting request into a free slot
            r = waiting.pop(0)
            r.slot = free.pop()
            n = len(r.prompt)
            state.all_token_ids.gpu[r.slot, :n] = torch.tensor(r.prompt)
            for buf in (state.prompt_len, state.prefill_len):
                buf.np[r.slot] = n
            state.total_len.gpu[r.slot] = n
            proc.add_request(r.slot, r.params)
            running.append(r)
        if running:
            order = [running[i] for i in rng.permutation(len(running))]
            idx = np.array([r.slot for r in order], dtype=np.int32)
            t = torch.from_numpy(idx)
            ctx = iface.LogitsContext(t, t, idx, torch.zeros_like(t), torch.zeros_like(t), torch.zeros_like(t), idx)
            proc.apply_staged_writes()
            out = proc.apply(torch.stack([model.logits(r.prompt + r.output) for r in order]), ctx)
            for i, r in enumerate(order):
                tok = int(out[i].argmax())
                state.all_token_ids.gpu[r.slot, int(state.total_len.gpu[r.slot])] = tok
                state.total_len.gpu[r.slot] += 1
                _finish(r, tok, eos)
        step += 1
    return step


def v2_state(slots: int, vocab: int) -> Any:
    iface = sys.modules["vllm.v1.worker.gpu.sample.logits_processor.interface"]
    zeros = np.zeros(slots, dtype=np.int32)
    return iface.LogitsProcRequestState(
        torch.device("cpu"),
        slots,
        vocab,
        iface.Buffer(torch.zeros(slots, 512, dtype=torch.int64), np.zeros((slots, 512), dtype=np.int64)),
        iface.Buffer(torch.from_numpy(zeros.copy()), zeros.copy()),
        iface.Buffer(torch.from_numpy(zeros.copy()), zeros.copy()),
        iface.Buffer(torch.zeros(slots, dtype=torch.int64), zeros.copy()),
    )


HALT = {"rules": [{"id": "no-paris", "kind": "literal", "patterns": ["Paris"], "action": "halt"}]}


@pytest.fixture
def engine(vllm_mod, hf_model, start_sidecar, keys, tmp_path, monkeypatch):
    model, tokenizer = hf_model
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    sc = start_sidecar(policies={"default": {}, "strict": HALT}, max_batch_rows=16)
    monkeypatch.setenv("FSE_SIDECAR", sc.target)
    monkeypatch.setenv("FSE_PUBLIC_KEY", str(keys.public))
    monkeypatch.setenv("FSE_POLICIES", "strict")
    (board := tmp_path / "outcomes").mkdir()
    monkeypatch.setenv("FSE_OUTCOMES_DIR", str(board))
    return SimpleNamespace(
        model=Model(model),
        tok=tokenizer,
        eos=tokenizer.eos_token_id,
        cfg=config(str(tmp_path / "tokenizer"), model.config.vocab_size),
        vocab=model.config.vocab_size,
        sidecar=sc,
        board=OutcomeBoard(board),
    )


def workload(vllm_mod: ModuleType, tok: Any) -> tuple[dict[int, list[Req]], list[Req]]:
    """Six requests arriving over three steps, finishing at different lengths, every one
    guarded: greedy ones, one sampled with top-k, one under the halting policy."""
    from tests.conftest import CHAT

    def req(name: str, text: str, n: int, **kw: Any) -> Req:
        return Req(name, tok(CHAT.format(text))["input_ids"], sp(vllm_mod, **kw), n)

    reqs = [
        req("greedy-a", "Name three colours.", 6),
        req("greedy-c", "What is 2 + 2?", 5),
        req("halted", "What is the capital of France?", 10, policy="strict", key=HALTED_KEY),
        req("greedy-b", "Write one sentence about the sea.", 8),
        req("sampled", "Say hello.", 7, temperature=0.8, top_k=5, seed=7),
        req("greedy-d", "Count to three.", 4),
    ]
    return {0: reqs[:3], 1: reqs[3:4], 3: reqs[4:]}, reqs


HALTED_KEY = "ab" * 16


def check(engine: Any, reqs: list[Req], rows_sent: dict[str, int]) -> None:
    by = {r.name: r for r in reqs}
    for name in ("greedy-a", "greedy-b", "greedy-c", "greedy-d"):
        r = by[name]
        assert r.output == engine.model.greedy(r.prompt, r.max_tokens, engine.eos), name
    halted = by["halted"]
    want = engine.model.greedy(halted.prompt, halted.max_tokens, engine.eos)
    assert "Paris" in engine.tok.decode(want)
    assert halted.output[-1] == engine.eos and "Paris" not in engine.tok.decode(halted.output)
    assert halted.output[:-1] == want[: len(halted.output) - 1]  # the model's own words until the rule
    # every row sent once per step, each committed token from its row's answer (the halted
    # request's EOS from its ABORT)
    assert sum(rows_sent.values()) == sum(len(r.output) for r in reqs)
    assert rows_sent["compact"] > 0
    # the halt is on the board under the request's key, for the API server to report
    got = engine.board.take(HALTED_KEY)
    assert got is not None and got.finish == "content_filter" and got.tokens == len(halted.output) - 1
    assert "no-paris" in got.detail


@pytest.mark.slow
def test_v1_bookkeeping_through_adds_removals_moves_and_swaps_gives_each_request_its_own_verdicts(vllm_mod, engine) -> None:
    arrivals, reqs = workload(vllm_mod, engine.tok)
    proc = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    drive_v1(proc, engine.model, arrivals, engine.eos, seed=1)
    check(engine, reqs, proc.guard.batch.rows_sent)
    assert proc.reqs == {}  # every finished request's session was closed on removal


@pytest.mark.slow
def test_model_runner_v2_bookkeeping_through_slot_reuse_and_reordered_rows_gives_each_request_its_own_verdicts(
    vllm_mod, engine
) -> None:
    arrivals, reqs = workload(vllm_mod, engine.tok)
    proc = vllm_mod.FseLogitsProcessorV2(engine.cfg, state := v2_state(4, engine.vocab))
    drive_v2(proc, engine.model, state, arrivals, engine.eos, seed=2)
    check(engine, reqs, proc.guard.batch.rows_sent)
    # four slots for six requests: slots were reused, each new occupant got a session of its own
    assert len({r.slot for r in reqs}) < len(reqs)
    # the seeded sampler gives the same text under either runner
    vllm_mod._claimed = False  # (another engine process)
    arrivals1, reqs1 = workload(vllm_mod, engine.tok)
    drive_v1(vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False), engine.model, arrivals1, engine.eos, 3)
    assert [r.output for r in reqs1 if r.name == "sampled"] == [r.output for r in reqs if r.name == "sampled"]


def _add(proc: Any, reqs: list[Req]) -> None:
    iface = sys.modules["vllm.v1.sample.logits_processor.interface"]
    proc.update_state(iface.BatchUpdate(len(reqs), [], [(i, r.params, list(r.prompt), r.output) for i, r in enumerate(reqs)], []))


def _step(proc: Any, engine: Any, reqs: list[Req]) -> torch.Tensor:
    """One step as an engine that ignores end-of-sequence: every row's token is committed."""
    out = proc.apply(torch.stack([engine.model.logits(r.prompt + r.output) for r in reqs]))
    for i, r in enumerate(reqs):
        r.output.append(int(out[i].argmax()))
    return out


@pytest.mark.slow
def test_a_token_the_engine_committed_against_its_verdict_ends_that_request(vllm_mod, engine) -> None:
    _, reqs = workload(vllm_mod, engine.tok)
    first = reqs[:3]
    proc = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    _add(proc, first)
    _step(proc, engine, first)
    first[0].output[-1] += 1  # the engine commits another token than the verdict's
    out = _step(proc, engine, first)
    assert int(out[0].argmax()) == engine.eos and torch.isinf(out[0]).sum() == engine.vocab - 1
    assert proc.reqs[0].req.finish_reason == "guard_error"
    assert proc.reqs[1].req.finish_reason is None  # the others go on


@pytest.mark.slow
def test_every_row_after_the_guard_ended_a_request_is_end_of_sequence_whatever_the_engine_does(vllm_mod, engine) -> None:
    # An engine that goes on past EOS (ignore_eos slipped past admission): the halted
    # request's every later row is forced to EOS and never reaches the sidecar again.
    _, reqs = workload(vllm_mod, engine.tok)
    halted, other = reqs[2], reqs[0]
    proc = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    _add(proc, [halted, other])
    while proc.reqs[0].req.finish_reason is None:
        _step(proc, engine, [halted, other])
    ended_at = len(halted.output)
    sent = sum(proc.guard.batch.rows_sent.values())
    for _ in range(4):
        out = _step(proc, engine, [halted, other])
        assert torch.isinf(out[0]).sum() == engine.vocab - 1 and int(out[0].argmax()) == engine.eos
    assert halted.output[ended_at - 1 :] == [engine.eos] * 5
    assert sum(proc.guard.batch.rows_sent.values()) - sent == 4  # only the other request's rows
    assert engine.board.take(HALTED_KEY).finish == "content_filter"


@pytest.mark.slow
def test_a_request_whose_session_cannot_open_ends_at_once_and_is_reported_as_a_guard_error(vllm_mod, engine) -> None:
    proc = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    engine.sidecar.kill()
    key = "cd" * 16
    r = Req("a", engine.tok("Hi")["input_ids"], sp(vllm_mod, key=key), 3)
    _add(proc, [r])
    for _ in range(3):  # never a free row, however long the engine goes on
        out = _step(proc, engine, [r])
        assert int(out[0].argmax()) == engine.eos and torch.isinf(out[0]).sum() == engine.vocab - 1
    got = engine.board.take(key)
    assert got.finish == "guard_error" and got.tokens == 0 and "did not open" in got.detail
    assert engine.board.take(key) is None  # taken once


@pytest.mark.slow
def test_rows_the_guard_has_no_request_for_are_end_of_sequence(vllm_mod, engine) -> None:
    proc = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    r = Req("a", engine.tok("Hi")["input_ids"], sp(vllm_mod), 3)
    _add(proc, [r])
    out = proc.apply(torch.stack([engine.model.logits(r.prompt)] * 2))  # a second row nobody added
    assert int(out[1].argmax()) == engine.eos and torch.isinf(out[1]).sum() == engine.vocab - 1
    assert torch.isinf(out[0]).sum() == engine.vocab - 1  # the known row has its verdict's token


@pytest.mark.slow
def test_a_guard_registered_twice_steps_each_row_once(vllm_mod, engine) -> None:
    first = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    second = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)  # listed twice
    assert not first.inert and second.inert
    iface = sys.modules["vllm.v1.sample.logits_processor.interface"]
    r = Req("a", engine.tok("Hi")["input_ids"], sp(vllm_mod), 3)
    update = iface.BatchUpdate(1, [], [(0, r.params, r.prompt, r.output)], [])
    first.update_state(update)
    second.update_state(update)
    forced = first.apply(engine.model.logits(r.prompt)[None])
    assert torch.equal(second.apply(forced.clone()), forced)
    assert first.guard.batch.rows_sent == {"compact": 1, "full": 0}
