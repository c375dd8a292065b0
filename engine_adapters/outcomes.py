"""How a guarded request ended, passed from vLLM's engine process to its API server process.

vLLM's logits-processor interface can end a request only by forcing the end-of-sequence
token, which vLLM reports as ``finish_reason: "stop"``. The processor (in the engine core
process) therefore records every request the guard ended (an ABORT verdict, or a guard
that could not answer) on this board before it returns the forced row, so before vLLM
even samples that token; the API server's middleware (:mod:`engine_adapters.vllm_api`)
takes the record when the request's last chunk passes and tells the client what
happened (DESIGN §10).

The board is a directory (``FSE_OUTCOMES_DIR``, made by ``fse-vllm serve``): one small
file per ended request, named by the request key the middleware gave it, written
atomically (a temporary name, then rename), so a reader sees all of a record or none.

It also lists the rings the engine made (``rings/``): vLLM ends its worker processes with
SIGKILL, so a worker cannot unlink its own ring; ``fse-vllm serve`` unlinks the listed
rings when the server exits (:meth:`OutcomeBoard.release_rings`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV = "FSE_OUTCOMES_DIR"
KEY = re.compile(r"[0-9a-f]{32}")
RING = re.compile(r"fse-ring-[0-9]+-[0-9a-f]{8}")  # sidecar.ring.RingWriter.create's names
SHM = Path("/dev/shm")  # uuid4().hex: what the middleware puts in vllm_xargs.fse_request
FINISHES = ("content_filter", "guard_error")


@dataclass(frozen=True)
class Outcome:
    """``finish``: "content_filter" (the guard's ABORT) or "guard_error" (no valid verdict:
    the sidecar down, a deadline, a verdict that did not verify). ``detail``: why, for the
    logs (never shown to a client by default). ``tokens``: tokens verified before the end."""

    finish: str
    detail: str
    tokens: int

    def __post_init__(self) -> None:
        if self.finish not in FINISHES:
            raise ValueError(f"finish must be one of {FINISHES}, got {self.finish!r}")


class OutcomeBoard:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    @classmethod
    def from_env(cls) -> OutcomeBoard | None:
        d = os.environ.get(ENV)
        return cls(d) if d else None

    def _path(self, key: str) -> Path:
        if not KEY.fullmatch(key):  # a key names a file: nothing but 32 hex digits
            raise ValueError(f"an outcome key is 32 lowercase hex digits, got {key!r}")
        return self.dir / key

    def record(self, key: str, outcome: Outcome) -> None:
        path = self._path(key)
        tmp = self.dir / f".{key}.{os.getpid()}"
        tmp.write_text(json.dumps({"finish": outcome.finish, "detail": outcome.detail, "tokens": outcome.tokens}))
        os.replace(tmp, path)

    def take(self, key: str) -> Outcome | None:
        """The request's outcome, removed from the board; None when the guard did not end it."""
        path = self._path(key)
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        d = json.loads(raw)
        return Outcome(str(d["finish"]), str(d["detail"]), int(d["tokens"]))

    def discard(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self._path(key).unlink()

    def adopt_ring(self, name: str) -> None:
        """List a ring this board's server unlinks at exit."""
        if not RING.fullmatch(name):
            raise ValueError(f"not a ring name: {name!r}")
        (self.dir / "rings").mkdir(exist_ok=True)
        (self.dir / "rings" / name).touch()

    def release_rings(self) -> list[str]:
        """Unlink every listed ring (their engines are gone); the names unlinked."""
        done = []
        for entry in sorted((self.dir / "rings").glob("fse-ring-*")):
            if RING.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    (SHM / entry.name).unlink()
                    done.append(entry.name)
            entry.unlink(missing_ok=True)
        return done
