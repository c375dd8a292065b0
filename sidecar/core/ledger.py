"""The audit file's records and their verification (pure: no I/O).

An ``.audit`` file is JSON lines (proto/fse/v1/AUDIT.md): one ``genesis`` record, one
``frame`` per committed step (ABORT included), and a ``close`` record holding the signed
receipt when the session ended normally. Every value the chain hashes is in the record
exactly (floats as JSON numbers that round-trip, non-finite ones as strings), so
:func:`verify` recomputes the genesis, each frame's reasons digest and chain hash, and
the receipt, from the file alone.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import chain
from .guards import Action, Sampler, Trip
from .redo import Decision, ProposalRecord, StepOutcome
from .sampling import SamplingParams

FORMAT = "fse.audit/1"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _num(v: float) -> float | str:
    if math.isfinite(v):
        return v
    return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")


def _float(v: Any) -> float:
    if isinstance(v, str):
        return _NONFINITE[v]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{v!r} is not a number")
    return float(v)


def encode(record: dict[str, Any]) -> bytes:
    """One line: sorted keys, no spaces, UTF-8, a newline (the same record, the same bytes)."""
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode()


def reason_record(t: chain.ReasonLike) -> dict[str, Any]:
    return {
        "code": t.code,
        "value": _num(t.value),
        "threshold": _num(t.threshold),
        "sampler": Sampler(int(t.sampler)).name.lower() if int(t.sampler) else None,
        "detail": t.detail,
        "action": Action(int(t.action)).name.lower(),
        "token_id": t.token_id,
        "span": [t.span_start, t.span_end],
    }


def reason_from(r: dict[str, Any]) -> Trip:
    return Trip(
        code=str(r["code"]),
        value=_float(r["value"]),
        threshold=_float(r["threshold"]),
        sampler=Sampler[r["sampler"].upper()] if r["sampler"] else 0,  # type: ignore[arg-type]
        detail=str(r["detail"]),
        action=Action[str(r["action"]).upper()],
        token_id=int(r["token_id"]),
        span_start=int(r["span"][0]),
        span_end=int(r["span"][1]),
    )


def sampling_record(p: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": p.temperature,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "min_p": p.min_p,
        "repetition_penalty": p.repetition_penalty,
        "repetition_window": p.repetition_window,
        "seed": p.seed,
    }


def genesis_record(
    opening: chain.Opening, params: SamplingParams, policy: str, algorithm: str, timestamp_ns: int
) -> dict[str, Any]:
    return {
        "kind": "genesis",
        "format": FORMAT,
        "session": opening.session_id,
        "opening_nonce": opening.opening_nonce.hex(),
        "sampling": sampling_record(params),
        "policy": policy,
        "policy_digest": opening.policy_digest,
        "vocab_digest": opening.vocab_digest,
        "model_id": opening.model_id,
        "key_id": opening.key_id,
        "algorithm": algorithm,
        "genesis_hash": opening.genesis().hex(),
        "timestamp_ns": timestamp_ns,
    }


def frame_record(
    session_id: str, step: int, o: StepOutcome, prev: bytes, chain_hash: bytes, timestamp_ns: int, key_id: str
) -> dict[str, Any]:
    """The frame of one committed step: every proposal with the trips it made, in order."""
    proposals, i = [], 0
    for p in o.proposals:
        proposals.append(
            {
                "token_id": p.token_id,
                "sampler": p.sampler.name.lower(),
                "trips": [reason_record(t) for t in o.reasons[i : i + p.reasons]],
            }
        )
        i += p.reasons
    return {
        "kind": "frame",
        "session": session_id,
        "step": step,
        "token_id": o.token,
        "decision": o.decision.name.lower(),
        "sampler": o.sampler.name.lower() if o.sampler else None,
        "proposals": proposals,
        "step_trips": [reason_record(t) for t in o.reasons[i:]],
        "reasons_digest": chain.reasons_digest(o.reasons).hex(),
        "timestamp_ns": timestamp_ns,
        "key_id": key_id,
        "prev_chain_hash": prev.hex(),
        "chain_hash": chain_hash.hex(),
    }


def receipt_record(
    session_id: str,
    genesis_hash: bytes,
    chain_hash: bytes,
    tally: chain.Tally,
    policy_digest: str,
    key_id: str,
    signature: bytes,
) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "genesis_hash": genesis_hash.hex(),
        "chain_hash": chain_hash.hex(),
        "steps": tally.steps,
        "accepted": tally.accepted,
        "healed": tally.healed,
        "aborted": tally.aborted,
        "first_timestamp_ns": tally.first_timestamp_ns,
        "last_timestamp_ns": tally.last_timestamp_ns,
        "policy_digest": policy_digest,
        "key_id": key_id,
        "signature": signature.hex(),
    }


def checkpoint_record(statement: dict[str, Any], timestamp_ns: int, ended: str = "") -> dict[str, Any]:
    """A signed statement of the file so far (a :func:`receipt_record`, signed under the
    checkpoint's own domain): ``ended`` names why a session ended without a close record
    (reaped, dropped, shutdown), and is then the file's last record."""
    rec: dict[str, Any] = {
        "kind": "checkpoint",
        "session": statement["session_id"],
        "checkpoint": statement,
        "timestamp_ns": timestamp_ns,
    }
    if ended:
        rec["ended"] = ended
    return rec


def receipt_signed_bytes(r: dict[str, Any], domain: str = "receipt") -> bytes:
    tally = chain.Tally(
        int(r["accepted"]), int(r["healed"]), int(r["aborted"]), int(r["first_timestamp_ns"]), int(r["last_timestamp_ns"])
    )
    if tally.steps != int(r["steps"]):
        raise ValueError(f"steps {r['steps']} is not accepted + healed + aborted ({tally.steps})")
    statement = chain.checkpoint_bytes if domain == "checkpoint" else chain.receipt_bytes
    return statement(
        str(r["session_id"]),
        bytes.fromhex(r["genesis_hash"]),
        bytes.fromhex(r["chain_hash"]),
        tally,
        str(r["policy_digest"]),
        str(r["key_id"]),
    )


# -- verification ---------------------------------------------------------------------------

# (key_id, signed bytes, signature) -> True/False; None when no key with that id is trusted
ReceiptCheck = Callable[[str, bytes, bytes], bool | None]


@dataclass
class Report:
    """What :func:`verify` found. ``ok`` is False at the first bad record, which ``error``
    names; ``verified`` is True only when the whole session is in the file (closed, or
    ended by the sidecar) and every frame is under a signature that was checked."""

    session_id: str = ""
    frames: int = 0  # frames whose chain checks out
    closed: bool = False  # a close record with the receipt
    ended: str = ""  # a final checkpoint: why the session ended without a close
    signed_frames: int = 0  # frames under the last signed statement (checkpoint or receipt)
    signatures_checked: bool = False  # a key was given, and every signature in the file verified under it
    tally: chain.Tally = field(default_factory=chain.Tally)
    chain_hash: str = ""
    error: str = ""
    bad_line: int = 0  # 1-based line of the first bad record
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def complete(self) -> bool:
        return self.closed or bool(self.ended)

    @property
    def verified(self) -> bool:
        return self.ok and self.complete and self.signatures_checked and self.signed_frames == self.frames


class _Bad(Exception):
    pass


# What a hostile record can raise while it is read (a JSON type where another belongs, a
# number no field can hold): each becomes "BROKEN at line N", never a traceback.
_UNREADABLE = (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError, RecursionError, struct.error)


def _genesis(rec: dict[str, Any]) -> tuple[str, bytes, str, str]:
    if rec.get("kind") != "genesis":
        raise _Bad(f"the first record is a {rec.get('kind')!r} record, not the genesis")
    if rec.get("format") != FORMAT:
        raise _Bad(f"format {rec.get('format')!r} is not {FORMAT!r}")
    try:
        params = SamplingParams(**rec["sampling"])
        sampling = params.canonical_bytes()
    except _UNREADABLE as exc:
        raise _Bad(f"genesis sampling parameters are unreadable: {exc}") from None
    for k in ("session", "policy_digest", "vocab_digest", "model_id", "key_id", "genesis_hash", "opening_nonce"):
        if not isinstance(rec.get(k), str):
            raise _Bad(f"genesis field {k} is missing or not a string")
    opening = chain.Opening(
        rec["session"],
        bytes.fromhex(rec["opening_nonce"]),
        sampling,
        rec["policy_digest"],
        rec["vocab_digest"],
        rec["model_id"],
        rec["key_id"],
    )
    g = opening.genesis()
    if g.hex() != rec["genesis_hash"]:
        raise _Bad("genesis hash does not match its fields (session, nonce, sampling, digests, model or key id changed)")
    return rec["session"], g, rec["policy_digest"], rec["key_id"]


def _frame(rec: dict[str, Any], session: str, step: int, prev: bytes) -> tuple[bytes, int, int]:
    if rec.get("kind") != "frame":
        raise _Bad(f"a {rec.get('kind')!r} record where frame {step} should be")
    if rec["session"] != session:
        raise _Bad(f"frame of session {rec['session']!r} in the file of session {session!r}")
    if rec["step"] != step:
        what = "missing or reordered" if isinstance(rec["step"], int) and rec["step"] > step else "repeated or reordered"
        raise _Bad(f"frame {rec['step']!r} where frame {step} should be (a frame {what})")
    if rec["prev_chain_hash"] != prev.hex():
        raise _Bad(f"frame {step} does not link to the previous chain hash (inserted, deleted or reordered)")
    reasons: list[Trip] = []
    proposals = []
    for p in rec["proposals"]:
        trips = [reason_from(t) for t in p["trips"]]
        reasons += trips
        proposals.append(ProposalRecord(int(p["token_id"]), Sampler[p["sampler"].upper()], len(trips)))
    reasons += [reason_from(t) for t in rec["step_trips"]]
    if chain.reasons_digest(reasons).hex() != rec["reasons_digest"]:
        raise _Bad(f"frame {step}: its reasons do not match its reasons digest")
    decision = Decision[str(rec["decision"]).upper()]
    sampler = Sampler[rec["sampler"].upper()] if rec["sampler"] else 0
    frame = chain.frame_bytes(session, step, int(rec["token_id"]), int(decision), int(sampler), proposals, reasons)
    h = chain.chain_next(prev, frame)
    if h.hex() != rec["chain_hash"]:
        raise _Bad(f"frame {step}: chain hash does not match the frame's contents (a field was modified)")
    timestamp = rec["timestamp_ns"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise _Bad(f"frame {step}: timestamp_ns {timestamp!r} is not an integer")
    return h, int(decision), timestamp


def _statement(
    rec: dict[str, Any], what: str, session: str, genesis: bytes, head: bytes, tally: chain.Tally, policy: str
) -> dict[str, Any]:
    """The receipt (of a close record) or checkpoint, held to the frames read so far."""
    r = rec[what]
    if not isinstance(r, dict):
        raise _Bad(f"the {what} is not an object")
    want = receipt_record(session, genesis, head, tally, policy, "", b"")
    del want["key_id"], want["signature"]  # whoever signed it: check_receipt says
    for k, v in want.items():
        if r.get(k) != v:
            raise _Bad(f"the {rec['kind']} record's {what} says {k} = {r.get(k)!r}, the frames give {v!r}")
    return dict(r)


def check_receipt(r: dict[str, Any], check: ReceiptCheck | None, domain: str = "receipt") -> str:
    """'' when the receipt's (or checkpoint's) signature verifies; else why not (or that
    it was not checked)."""
    if check is None:
        return f"{domain} signature not checked (no key given)"
    try:
        ok = check(str(r["key_id"]), receipt_signed_bytes(r, domain), bytes.fromhex(r["signature"]))
    except _UNREADABLE as exc:
        return f"{domain} is malformed: {exc}"
    if ok is None:
        return f"{domain} is signed by key {r['key_id']}, which is not among the keys given"
    return "" if ok else f"{domain} signature does not verify with key {r['key_id']}"


def verify(lines: Sequence[bytes], receipt: dict[str, Any] | None = None, check: ReceiptCheck | None = None) -> Report:
    """Check an audit file's lines; ``receipt``: one the adapter kept, to hold the file to;
    ``check``: the trusted keys (None: signatures are not checked, and the report is never
    ``verified``).

    A last line without its newline is a frame the writer never finished (a crash): it is
    reported, not counted (the genesis, though, must be whole). The first bad record stops
    the check and is named.
    """
    rep = Report(signatures_checked=check is not None)
    if not lines:
        rep.error, rep.bad_line = "the file is empty (no genesis record)", 1
        return rep
    last = len(lines)
    head = genesis = b""
    policy = ""
    closing: dict[str, Any] | None = None
    n = 1
    try:
        for n, raw in enumerate(lines, 1):
            if not raw.endswith(b"\n"):
                if n == 1:
                    raise _Bad("the genesis record is incomplete (no line end): nothing in the file can be checked")
                if n == last:
                    rep.notes.append(f"line {n} is a frame the sidecar was writing when it stopped (ignored)")
                    break
                raise _Bad("a record without its line end inside the file")
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise _Bad(f"not a JSON record ({type(exc).__name__}: {str(exc)[:200]})") from None
            if not isinstance(rec, dict):
                raise _Bad(f"not a JSON object but {type(rec).__name__}")
            try:
                if n == 1:
                    rep.session_id, genesis, policy, _key = _genesis(rec)
                    head = genesis
                elif closing is not None or rep.ended:
                    raise _Bad(f"a record after the {'close' if closing is not None else 'final checkpoint'} record")
                elif rec.get("kind") in ("close", "checkpoint"):
                    kind = rec["kind"]
                    if rec.get("session") != rep.session_id:
                        raise _Bad(f"{kind} record of session {rec.get('session')!r}")
                    what = "receipt" if kind == "close" else "checkpoint"
                    statement = _statement(rec, what, rep.session_id, genesis, head, rep.tally, policy)
                    why = check_receipt(statement, check, what)
                    if why and check is not None:
                        raise _Bad(f"{kind} record: {why}")
                    if not why:
                        rep.signed_frames = rep.frames
                    if kind == "close":
                        closing, rep.closed = statement, True
                    elif "ended" in rec:
                        rep.ended = str(rec["ended"]) or "?"
                else:
                    head, decision, ts = _frame(rec, rep.session_id, rep.frames, head)
                    rep.tally = rep.tally.add(decision, ts)
                    rep.frames += 1
            except _UNREADABLE as exc:
                raise _Bad(f"a field is missing or malformed ({type(exc).__name__}: {str(exc)[:200]})") from None
    except _Bad as exc:
        rep.error, rep.bad_line = str(exc), n
        rep.chain_hash = head.hex()
        return rep
    rep.chain_hash = head.hex()
    if check is None:
        rep.notes.append("signatures not checked (no key given)")
    if receipt is not None:
        mine = {"session_id": rep.session_id, "genesis_hash": genesis.hex(), "chain_hash": rep.chain_hash, "steps": rep.frames}
        for k, v in mine.items():
            if receipt.get(k) != v:
                rep.error = f"the receipt given says {k} = {receipt.get(k)!r}, the file gives {v!r}"
                rep.bad_line = len(lines)
                return rep
        why = check_receipt(receipt, check)
        if why and check is not None:
            rep.error, rep.bad_line = f"the receipt given: {why}", len(lines)
            return rep
    return rep
