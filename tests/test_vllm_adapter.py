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


def sp(vllm_mod: ModuleType, fse: Any = None, **kw: Any) -> Any:
    SamplingParams = sys.modules["vllm"].SamplingParams
    return SamplingParams(extra_args=None if fse is None else {"fse": fse}, **kw)


def test_admission_refuses_what_would_change_the_judged_logits_naming_it(vllm_mod) -> None:
    v = vllm_mod.FseLogitsProcessorV1
    assert v.validate_params(sp(vllm_mod)) is None  # not guarded: nothing to check
    v.validate_params(sp(vllm_mod, {"top_k": 5, "temperature": 0.7, "seed": 3, "policy": "strict"}))
    with pytest.raises(ValueError, match="repetition_penalty, logit_bias"):
        v.validate_params(sp(vllm_mod, True, repetition_penalty=1.2, logit_bias={1: 2.0}))
    with pytest.raises(ValueError, match="min_tokens"):
        vllm_mod.FseLogitsProcessorV2.validate_params(sp(vllm_mod, True, min_tokens=4))
    with pytest.raises(ValueError, match=r"unknown keys \['topk'\]"):
        v.validate_params(sp(vllm_mod, {"topk": 5}))
    with pytest.raises(ValueError, match="sampling.top_p must be in"):
        v.validate_params(sp(vllm_mod, {"top_p": 0}))
    with pytest.raises(ValueError, match="must be true or an object"):
        v.validate_params(sp(vllm_mod, "yes"))


def test_the_processor_needs_the_sidecar_and_key_from_the_pods_environment(vllm_mod, monkeypatch) -> None:
    monkeypatch.delenv("FSE_SIDECAR", raising=False)
    monkeypatch.delenv("FSE_PUBLIC_KEY", raising=False)
    with pytest.raises(ValueError, match="FSE_SIDECAR .* FSE_PUBLIC_KEY"):
        vllm_mod.FseLogitsProcessorV2(config("/nonexistent"), None)


def test_the_runner_picks_its_interface_from_vllms_switch(monkeypatch) -> None:
    sys.path.insert(0, str(STANDINS))
    try:
        for flag, name in (("0", "FseLogitsProcessorV1"), ("1", "FseLogitsProcessorV2")):
            monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", flag)
            sys.modules.pop("engine_adapters.vllm", None)
            assert importlib.import_module("engine_adapters.vllm").FseLogitsProcessor.__name__ == name
    finally:
        sys.path.remove(str(STANDINS))
        sys.modules.pop("engine_adapters.vllm", None)


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
    return SimpleNamespace(
        model=Model(model),
        tok=tokenizer,
        eos=tokenizer.eos_token_id,
        cfg=config(str(tmp_path / "tokenizer"), model.config.vocab_size),
        vocab=model.config.vocab_size,
    )


def workload(vllm_mod: ModuleType, tok: Any) -> tuple[dict[int, list[Req]], list[Req]]:
    """Six requests arriving over three steps, finishing at different lengths: guarded greedy,
    guarded top-k sampling, a guarded one under the halting policy, and unguarded ones."""
    from tests.conftest import CHAT

    def req(name: str, text: str, fse: Any, n: int) -> Req:
        return Req(name, tok(CHAT.format(text))["input_ids"], sp(vllm_mod, fse), n)

    reqs = [
        req("greedy-a", "Name three colours.", True, 6),
        req("plain", "What is 2 + 2?", None, 5),
        req("halted", "What is the capital of France?", {"policy": "strict"}, 10),
        req("greedy-b", "Write one sentence about the sea.", True, 8),
        req("sampled", "Say hello.", {"temperature": 0.8, "top_k": 5, "seed": 7}, 7),
        req("plain-b", "Count to three.", None, 4),
    ]
    return {0: reqs[:3], 1: reqs[3:4], 3: reqs[4:]}, reqs


def check(engine: Any, reqs: list[Req], rows_sent: dict[str, int]) -> None:
    by = {r.name: r for r in reqs}
    for name in ("greedy-a", "greedy-b", "plain", "plain-b"):
        r = by[name]
        assert r.output == engine.model.greedy(r.prompt, r.max_tokens, engine.eos), name
    halted = by["halted"]
    want = engine.model.greedy(halted.prompt, halted.max_tokens, engine.eos)
    assert "Paris" in engine.tok.decode(want)
    assert halted.output[-1] == engine.eos and "Paris" not in engine.tok.decode(halted.output)
    assert halted.output[:-1] == want[: len(halted.output) - 1]  # the model's own words until the rule
    guarded = [r for r in reqs if r.params.extra_args]
    # every guarded row sent once per step, unguarded ones never (the halted row's EOS was forced, not sent)
    assert sum(rows_sent.values()) == sum(len(r.output) for r in guarded)
    assert rows_sent["compact"] > 0


@pytest.mark.slow
def test_v1_bookkeeping_through_adds_removals_moves_and_swaps_gives_each_request_its_own_verdicts(vllm_mod, engine) -> None:
    arrivals, reqs = workload(vllm_mod, engine.tok)
    proc = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    drive_v1(proc, engine.model, arrivals, engine.eos, seed=1)
    check(engine, reqs, proc.guard.batch.rows_sent)
    assert proc.reqs == {}  # every finished request's session was closed on removal
    engine.sampled_v1 = next(r for r in reqs if r.name == "sampled").output


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


@pytest.mark.slow
def test_a_token_the_engine_committed_against_its_verdict_ends_that_request(vllm_mod, engine) -> None:
    arrivals, reqs = workload(vllm_mod, engine.tok)
    proc = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    first = {0: arrivals[0]}
    iface = sys.modules["vllm.v1.sample.logits_processor.interface"]
    added = [(i, r.params, list(r.prompt), r.output) for i, r in enumerate(first[0])]
    proc.update_state(iface.BatchUpdate(3, [], added, []))
    out = proc.apply(torch.stack([engine.model.logits(r.prompt) for r in first[0]]))
    forced = int(out[0].argmax())
    first[0][0].output.append(forced + 1)  # the engine commits another token than the verdict's
    first[0][2].output.append(int(out[2].argmax()))
    first[0][1].output.append(int(out[1].argmax()))
    out = proc.apply(torch.stack([engine.model.logits(r.prompt + r.output) for r in first[0]]))
    assert int(out[0].argmax()) == engine.eos and torch.isinf(out[0]).sum() == engine.vocab - 1
    assert proc.reqs[0].finish_reason == "guard_error"
    assert proc.reqs[2].finish_reason is None  # the others go on


@pytest.mark.slow
def test_a_guard_registered_twice_steps_each_row_once(vllm_mod, engine) -> None:
    first = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)
    second = vllm_mod.FseLogitsProcessorV1(engine.cfg, torch.device("cpu"), False)  # the entry point and the flag
    assert not first.inert and second.inert
    iface = sys.modules["vllm.v1.sample.logits_processor.interface"]
    r = Req("a", engine.tok("Hi")["input_ids"], sp(vllm_mod, True), 3)
    update = iface.BatchUpdate(1, [], [(0, r.params, r.prompt, r.output)], [])
    first.update_state(update)
    second.update_state(update)
    forced = first.apply(engine.model.logits(r.prompt)[None])
    assert torch.equal(second.apply(forced.clone()), forced)
    assert first.guard.batch.rows_sent == {"compact": 1, "full": 0}
