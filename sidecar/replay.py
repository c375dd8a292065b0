"""``fse-sidecar replay DIR [--config FILE]``: judge a recording again and compare ledgers.

Every recorded session is re-opened with what it was opened with (nonce, key id, model,
sampling, history) and its recorded policy, or with the policy of the same name in
``--config`` (how to try a new policy on yesterday's traffic), and every recorded row is
judged and committed again by the same pure core the sidecar runs. The replayed frames
are compared with the recorded ledger field by field (timestamps aside): identical, or
the first step that differs, with what each side decided and why. A session stops
being compared at its first difference: the rows after it followed the recorded path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Policy, load_config
from .core import ledger
from .core.chain import Opening
from .core.policy import compile_policy
from .core.sampling import SamplingParams
from .core.session import Session
from .errors import FseError, RecordingError
from .record import read_rows, read_vocab, vocab_file

# what a frame decides; the rest (timestamp, key id) says when and who signed
_VOLATILE = ("timestamp_ns", "key_id")


def _decision(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in _VOLATILE}


def _summary(rec: dict[str, Any]) -> str:
    trips = [f"{t['code']} {t['value']} vs {t['threshold']} ({t['action']})" for p in rec["proposals"] for t in p["trips"]]
    trips += [f"{t['code']} ({t['action']})" for t in rec["step_trips"]]
    return f"{rec['decision']} token {rec['token_id']}" + (f" [{'; '.join(trips)}]" if trips else " [no trips]")


@dataclass
class SessionReplay:
    session_id: str
    steps: int
    first_difference: str = ""
    ledger_sha256: str = ""


def replay_session(d: Path, policy_override: Policy | None) -> SessionReplay:
    meta = json.loads((d / "open.json").read_text())
    policy = policy_override if policy_override is not None else Policy.model_validate_json(meta["policy_json"])
    compiled = compile_policy(meta["policy"], policy)
    params = SamplingParams(**meta["sampling"])
    tokens = read_vocab(vocab_file(d.parent, meta["vocab_digest"]))
    opening = Opening(
        meta["session_id"],
        bytes.fromhex(meta["opening_nonce"]),
        params.canonical_bytes(),
        compiled.digest,
        meta["vocab_digest"],
        meta["model_id"],
        meta["key_id"],
    )
    s = Session(
        session_id=meta["session_id"],
        tag=1,
        params=params,
        policy=compiled,
        tokens=tokens,
        history=list(meta["history"]),
        prompt=meta.get("prompt"),  # recordings before the loop guard read the prompt: the history
        opening=opening,
    )
    recorded = (
        [json.loads(line) for line in (d / "ledger.jsonl").read_bytes().splitlines()] if (d / "ledger.jsonl").exists() else []
    )
    rows = read_rows(d / "rows.bin", len(tokens))
    out = SessionReplay(meta["session_id"], 0)
    h = hashlib.sha256()
    frames = {rec["step"]: rec for rec in recorded}
    for step in sorted(set(frames) | set(rows)):
        if step not in rows or step not in frames:
            what = "row" if step not in rows else "frame"
            out.first_difference = f"step {step}: the recording holds no {what} for it (an incomplete recording)"
            break
        rec = frames[step]
        o = s.judge(rows[step], step)
        mine = ledger.frame_record(s.session_id, step, o, s.chain_hash, s.next_chain_hash(step, o), 0, "")
        s.commit(step, o)
        out.steps += 1
        a, b = _decision(rec), _decision(mine)
        if policy_override is not None:  # another policy: another genesis, so the chain differs throughout
            for k in ("prev_chain_hash", "chain_hash"):
                a.pop(k)
                b.pop(k)
        if a != b:
            out.first_difference = f"step {step}: recorded {_summary(rec)}; replayed {_summary(mine)}"
            break
        h.update(ledger.encode(b))
    out.ledger_sha256 = h.hexdigest()
    return out


def run_replay(args: argparse.Namespace) -> int:
    root: Path = args.dir
    if not root.is_dir():
        raise FseError(f"{root} is not a recording directory (made by serve --record)")
    override: dict[str, Policy] | None = None
    if args.config is not None:
        override = load_config(args.config).policies
    sessions = sorted(p for p in root.iterdir() if (p / "open.json").exists())
    if not sessions:
        raise FseError(f"{root} holds no recorded session")
    differ = malformed = 0
    total = 0
    for d in sessions:
        try:
            pol = None
            if override is not None:
                name = json.loads((d / "open.json").read_text())["policy"]
                if name not in override:
                    raise FseError(f"--config {args.config} has no policy {name!r} (session {d.name} ran under it)")
                pol = override[name]
            r = replay_session(d, pol)
        except RecordingError as exc:
            malformed += 1
            print(f"{d.name}: MALFORMED recording: {exc}")
            continue
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError, struct.error) as exc:
            malformed += 1  # a hostile or damaged open.json or ledger: named, never a traceback
            print(f"{d.name}: MALFORMED recording: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        total += r.steps
        if r.first_difference:
            differ += 1
            print(f"{r.session_id}: DIFFERS at {r.first_difference}")
        else:
            print(f"{r.session_id}: {r.steps} steps, ledger identical (sha256 {r.ledger_sha256[:16]}...)")
    bad = f", {malformed} malformed" if malformed else ""
    print(f"replayed {len(sessions)} sessions, {total} steps: {differ} differ{bad}")
    return 2 if malformed else 1 if differ else 0
