"""``serve --record DIR``: keep what the sidecar saw, so that ``replay`` can judge it again.

Per session opening, a directory ``DIR/<session>.<nonce>/`` holding:

- ``open.json``: the opening (id, nonce, key id, model id, vocabulary digest, the
  effective sampling parameters, the repetition history it starts from, the policy's
  name and its full canonical JSON);
- ``rows.bin``: every logits row judged, in step order: ``u64 step | u32 n | n bytes``
  of zlib-compressed little-endian f32; a COMPACT row sets the top bit of ``n`` and its
  bytes are :func:`compact_bytes`;
- ``ledger.jsonl``: the frame each step committed (the audit record, core/ledger.py).

Vocabularies go once each to ``DIR/vocab-<digest>.bin`` (``u32 count``, then ``u32
length | bytes`` per token). Compression runs in a writer thread (zlib releases the GIL),
fed through a bounded queue: a recorder that cannot keep up slows the steps down rather
than dropping a row, since a recording with a hole could not be replayed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .core import ledger
from .core.compact import CompactRow
from .core.session import Session
from .errors import FseError, RecordingError

log = logging.getLogger("fse.record")
_ROW = struct.Struct("<QI")
_COMPACT_FLAG = 1 << 31  # in a row's size: the payload is a COMPACT row (compact_bytes)


def vocab_file(root: Path, digest: str) -> Path:
    return root / f"vocab-{digest}.bin"


def _private(path: Path, data: bytes, append: bool = False) -> None:
    """Write (or append) ``data`` to a file only its owner can read: a recording holds
    prompts and the model's logits, whatever the umask says."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a file made before, under another mode
        os.write(fd, data)
    finally:
        os.close(fd)


def write_vocab(path: Path, tokens: tuple[bytes, ...]) -> None:
    parts = [struct.pack("<I", len(tokens))]
    parts += [struct.pack("<I", len(t)) + t for t in tokens]
    tmp = path.with_suffix(".tmp")
    _private(tmp, b"".join(parts))
    tmp.replace(path)


def read_vocab(path: Path) -> list[bytes]:
    """The recorded vocabulary; RecordingError naming what is wrong with a malformed file."""
    data = path.read_bytes()
    try:
        (n,) = struct.unpack_from("<I", data, 0)
        if n > len(data) // 4:
            raise RecordingError(f"{path.name}: claims {n} tokens in {len(data)} bytes")
        out: list[bytes] = []
        off = 4
        for _ in range(n):
            (size,) = struct.unpack_from("<I", data, off)
            if off + 4 + size > len(data):
                raise RecordingError(f"{path.name}: token {len(out)} runs past the end of the file")
            out.append(data[off + 4 : off + 4 + size])
            off += 4 + size
    except struct.error:
        raise RecordingError(f"{path.name}: cut short") from None
    return out


class Recorder:
    """Writes recordings from one thread; the step path only copies a row and enqueues it."""

    def __init__(self, root: Path, depth: int = 256) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise FseError(f"--record {root}: {exc.strerror}") from None
        self._dirs: dict[str, Path] = {}
        self._q: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="fse-record", daemon=True)
        self._thread.start()
        self.failed = ""

    def open(self, s: Session, vocab_digest: str, vocab: tuple[bytes, ...]) -> None:
        assert s.opening is not None
        d = self.root / f"{s.session_id}.{s.opening.opening_nonce.hex()[:16]}"
        self._dirs[s.session_id] = d
        p = s.params
        meta = {
            "session_id": s.session_id,
            "opening_nonce": s.opening.opening_nonce.hex(),
            "key_id": s.opening.key_id,
            "model_id": s.opening.model_id,
            "vocab_digest": vocab_digest,
            "sampling": ledger.sampling_record(p),
            "history": list(s.history),
            "prompt": np.asarray(s.prompt).tolist() if s.prompt is not None else None,
            "policy": s.policy.name,
            "policy_json": s.policy.source_json,
            "policy_digest": s.policy.digest,
        }
        self._q.put(("open", (d, meta, vocab_file(self.root, vocab_digest), vocab)))

    def row(self, session_id: str, step: int, row: np.ndarray | CompactRow) -> None:
        d = self._dirs.get(session_id)
        if d is None:
            return
        if isinstance(row, CompactRow):  # already a copy of its own
            self._q.put(("row", (d, step, row)))
        else:  # the row is the reader's buffer: copy it before the next step reuses it
            self._q.put(("row", (d, step, np.array(row, dtype="<f4", copy=True))))

    def frame(self, session_id: str, record: dict[str, Any]) -> None:
        d = self._dirs.get(session_id)
        if d is not None:
            self._q.put(("frame", (d, record)))

    def close(self, session_id: str) -> None:
        self._dirs.pop(session_id, None)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            kind, args = item
            try:
                if kind == "open":
                    d, meta, vpath, vocab = args
                    d.mkdir(exist_ok=True, mode=0o700)
                    _private(d / "open.json", (json.dumps(meta, sort_keys=True, indent=1) + "\n").encode())
                    if not vpath.exists():
                        write_vocab(vpath, vocab)
                elif kind == "row":
                    d, step, row = args
                    flag, raw = (_COMPACT_FLAG, compact_bytes(row)) if isinstance(row, CompactRow) else (0, row.tobytes())
                    packed = zlib.compress(raw, 1)
                    _private(d / "rows.bin", _ROW.pack(step, len(packed) | flag) + packed, append=True)
                else:
                    d, record = args
                    _private(d / "ledger.jsonl", ledger.encode(record), append=True)
            except OSError as exc:  # the recording is incomplete; serving goes on, the log says so
                if not self.failed:
                    self.failed = f"{exc.filename}: {exc.strerror}"
                    log.error("recording stopped being complete: %s", self.failed)

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(30)


def compact_bytes(row: CompactRow) -> bytes:
    """``u32 vocab | u32 k | 8 x f64 moments | k x f32 logits, highest first | k x u32 ids``."""
    order = np.lexsort((row.ids, -row.logits))
    moments = np.array([*row.moments, 0.0], dtype="<f8")
    head = struct.pack("<II", row.vocab_size, row.k)
    return head + moments.tobytes() + row.logits[order].astype("<f4").tobytes() + row.ids[order].astype("<u4").tobytes()


def _inflate(packed: bytes, limit: int, where: str) -> bytes:
    """Decompress at most ``limit`` bytes: a row never inflates past its vocabulary's size
    (a hostile 1.2 MB entry would otherwise become 1.2 GB)."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(packed, limit)
    except zlib.error as exc:
        raise RecordingError(f"{where}: not zlib data ({exc})") from None
    if d.unconsumed_tail or not d.eof:
        raise RecordingError(f"{where}: inflates past {limit} bytes (the most a row of this vocabulary takes) or is cut short")
    return raw


def read_rows(path: Path, vocab_size: int) -> dict[int, np.ndarray | CompactRow]:
    """The recorded rows by step; RecordingError naming the first malformed one."""
    data = path.read_bytes() if path.exists() else b""
    out: dict[int, np.ndarray | CompactRow] = {}
    off = 0
    full = 4 * vocab_size
    while off < len(data):
        if off + _ROW.size > len(data):
            raise RecordingError(f"{path.name}: a row header cut short at byte {off}")
        step, n = _ROW.unpack_from(data, off)
        off += _ROW.size
        size = n & ~_COMPACT_FLAG
        where = f"{path.name}: the row of step {step}"
        if off + size > len(data):
            raise RecordingError(f"{where} runs past the end of the file")
        if n & _COMPACT_FLAG:
            raw = _inflate(data[off : off + size], 72 + 8 * vocab_size, where)
            if len(raw) < 72:
                raise RecordingError(f"{where}: a COMPACT row of {len(raw)} bytes")
            vocab, k = struct.unpack_from("<II", raw)
            if vocab != vocab_size or len(raw) != 72 + 8 * k:
                raise RecordingError(f"{where}: a COMPACT row of vocabulary {vocab}, k {k} in {len(raw)} bytes")
            body = np.frombuffer(raw, dtype=np.uint8, offset=8)
            out[step] = CompactRow.from_top(
                vocab, body[:64].view("<f8"), body[64 : 64 + 4 * k].view("<f4"), body[64 + 4 * k : 64 + 8 * k].view("<u4")
            )
        else:
            raw = _inflate(data[off : off + size], full, where)
            if len(raw) != full:
                raise RecordingError(f"{where}: {len(raw)} bytes, a row of this vocabulary is {full}")
            out[step] = np.frombuffer(raw, dtype="<f4")
        off += size
    return out
