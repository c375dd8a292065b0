"""Shared-memory logits ring, layout version 2 (normative text: proto/fse/v1/RING.md).

The engine owns the ring: :class:`RingWriter` creates, maps, writes and unlinks it. The
sidecar never maps an engine's memory. :class:`RingReader` keeps a read-only descriptor
and copies each row it judges out with ``pread`` into a buffer of its own, between two
reads of the slot's seqlock counter. Why a copy and not a view: reading a mapping whose
file its owner truncated raises SIGBUS and kills the reading process, and with it every
other engine's session; ``pread`` returns a short read instead, which refuses one step of
one session. The copy also cannot change while it is judged, so one seqlock check after
the copy is the whole torn-frame test (``fse-sidecar bench ring`` measures what it costs
against a view of a mapping).

A reader identifies a ring by the segment (device and inode of its descriptor), never by
its name: a name the engine re-creates is another ring.
"""

from __future__ import annotations

import _posixshmem  # the shm_open behind multiprocessing.shared_memory (POSIX only)
import contextlib
import functools
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import cast

import numpy as np

from .core.compact import MIN_K, BatchedRow, CompactBatch, CompactRow
from .errors import FseError, RingError, RingLayoutError, RowError, TornFrameError, shown

# A row of a batch step (RingReader.rows): a COMPACT row, a FULL row to read when it is
# judged, or the error that refuses it.
BatchRow = CompactRow | BatchedRow | Callable[[], "np.ndarray | CompactRow"] | FseError

# COMPACT rows of one k in a frame from which they are validated and drawn as one batch
# (CompactBatch, core.batch_draw); fewer go one by one. Measured with bench batch.
VECTORISE_ROWS = 4

MAGIC = b"FSERING\x00"
LAYOUT_VERSION = 2
HEADER_SIZE = 256
SLOT_HEAD = 16  # u64 seq, u32 n_rows, u32 reserved
ALIGN = 64

KIND_FULL = 1
KIND_COMPACT = 2
KIND_NAMES = {KIND_FULL: "FULL", KIND_COMPACT: "COMPACT"}
MOMENTS = ("log_sum_exp", "entropy", "varentropy", "mean", "variance", "l2_norm", "max", "reserved")
COMPACT_HEAD = 8 * len(MOMENTS)  # f64 moments, then k f32 logits, then k u32 token ids

FLAG_LANE = 1  # slots carry a fast-lane request record and verdict area
LANE_REQUEST = 64
LANE_VERDICT_HEAD = 16
_VERDICT_COUNTS = struct.Struct("<II")  # n_verdicts, service_us
REQUEST_ECHO = 1  # answer with an empty StepResponse, judge nothing (the lane's own cost)
REQUEST_PING = 2  # ring back only (the doorbells' cost)
LANE_GOODBYE_BYTES = 1024  # at most this much UTF-8 reason on the lane socket before a hang-up

# dtype code -> (numpy dtype of a stored FULL-row element, name)
DTYPES: dict[int, tuple[np.dtype, str]] = {
    1: (np.dtype("<f4"), "f32"),
    2: (np.dtype("<f2"), "f16"),
    3: (np.dtype("<u2"), "bf16"),  # stored as raw 16-bit words, widened on read
}
DTYPE_CODES = {name: code for code, (_, name) in DTYPES.items()}
RING_NAME = re.compile(r"/?[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # never "." or "..": shm_open would open /dev/shm's directory

# magic ver hdr slots rows vocab dtype topk flags | slot_stride heap_off heap_size lane_off | vcap pid | ring_id
_HEADER = struct.Struct("<8sIIIIIIIIQQQQII16s")
DESCRIPTOR = np.dtype(
    [
        ("session_tag", "<u8"),
        ("step", "<u8"),
        ("kind", "<u4"),
        ("count", "<u4"),
        ("offset", "<u8"),
        ("size", "<u8"),
        ("reserved", "<u8"),
    ]
)
_DESC = struct.Struct("<QQIIQQQ")
_REQUEST = struct.Struct("<QQII")  # frame_seq, deadline (CLOCK_MONOTONIC ns), n_rows, flags
assert DESCRIPTOR.itemsize == _DESC.size == 48


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def compact_size(k: int) -> int:
    """Bytes of a COMPACT row's payload holding ``k`` entries."""
    return COMPACT_HEAD + 8 * k


@dataclass(frozen=True, slots=True)
class RingLayout:
    slot_count: int
    row_capacity: int
    vocab_size: int
    dtype_code: int
    topk_capacity: int = 0  # the largest k of a COMPACT row; 0: FULL rows only
    lane: bool = False
    verdict_capacity: int = 0  # bytes per row of the lane's verdict area
    heap_size: int = 0  # 0: room for row_capacity of the largest row

    def __post_init__(self) -> None:
        if self.dtype_code not in DTYPES:
            raise RingLayoutError(f"ring dtype code {self.dtype_code} is not one of {sorted(DTYPES)}")
        for name in ("slot_count", "row_capacity", "vocab_size"):
            if getattr(self, name) < 1:
                raise RingLayoutError(f"ring {name} must be >= 1, got {getattr(self, name)}")
        if self.topk_capacity < 0 or self.topk_capacity > self.vocab_size:
            raise RingLayoutError(f"ring topk_capacity must be in [0, vocab_size], got {self.topk_capacity}")
        if self.lane != (self.verdict_capacity > 0) or self.verdict_capacity % 8:
            raise RingLayoutError("a lane ring needs a verdict_capacity that is a positive multiple of 8 (and only a lane ring)")
        if self.heap_size == 0:
            object.__setattr__(self, "heap_size", self.row_capacity * _align(self.max_row_size))
        if self.heap_size % ALIGN:
            raise RingLayoutError(f"ring heap_size must be a multiple of {ALIGN}, got {self.heap_size}")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype_code][0].itemsize

    @property
    def full_size(self) -> int:
        return self.vocab_size * self.itemsize

    @property
    def max_row_size(self) -> int:
        return max(self.full_size, compact_size(self.topk_capacity) if self.topk_capacity else 0)

    @property
    def heap_offset(self) -> int:
        return _align(SLOT_HEAD + DESCRIPTOR.itemsize * self.row_capacity)

    @property
    def lane_offset(self) -> int:
        return _align(self.heap_offset + self.heap_size) if self.lane else 0

    @property
    def slot_stride(self) -> int:
        if not self.lane:
            return _align(self.heap_offset + self.heap_size)
        return _align(self.lane_offset + LANE_REQUEST + LANE_VERDICT_HEAD + self.row_capacity * self.verdict_capacity)

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + self.slot_count * self.slot_stride

    def slot_offset(self, slot: int) -> int:
        return HEADER_SIZE + slot * self.slot_stride


class RingWriter:
    """Engine side: creates the ring, writes frames, unlinks it on close."""

    def __init__(self, name: str, layout: RingLayout, mode: int = 0o600) -> None:
        if mode & ~0o660 or not mode & 0o400:
            raise RingLayoutError(f"ring mode {mode:#o} must give the owner read and write, and no one else more than 0o660")
        self.layout = layout
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_size)
        except FileExistsError:
            raise RingError(f"shared memory {name!r} already exists") from None
        if mode != 0o600:  # a sidecar running as another user reads it through a shared group
            os.fchmod(shm._fd, mode)  # type: ignore[attr-defined]
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
        self.ring_id = os.urandom(16)
        buf = shm.buf
        assert buf is not None  # a fresh mapping
        buf[:HEADER_SIZE] = bytes(HEADER_SIZE)
        _HEADER.pack_into(
            buf,
            0,
            MAGIC,
            LAYOUT_VERSION,
            HEADER_SIZE,
            layout.slot_count,
            layout.row_capacity,
            layout.vocab_size,
            layout.dtype_code,
            layout.topk_capacity,
            FLAG_LANE if layout.lane else 0,
            layout.slot_stride,
            layout.heap_offset,
            layout.heap_size,
            layout.lane_offset,
            layout.verdict_capacity,
            os.getpid(),
            self.ring_id,
        )
        s = layout.slot_stride
        self._seq = np.ndarray((layout.slot_count,), dtype="<u8", buffer=buf, offset=HEADER_SIZE, strides=(s,))
        self._n_rows = np.ndarray((layout.slot_count,), dtype="<u4", buffer=buf, offset=HEADER_SIZE + 8, strides=(s,))
        self._desc = np.ndarray(
            (layout.slot_count, layout.row_capacity),
            dtype=DESCRIPTOR,
            buffer=buf,
            offset=HEADER_SIZE + SLOT_HEAD,
            strides=(s, DESCRIPTOR.itemsize),
        )
        self._heap = np.ndarray(
            (layout.slot_count, layout.heap_size),
            dtype=np.uint8,
            buffer=buf,
            offset=HEADER_SIZE + layout.heap_offset,
            strides=(s, 1),
        )
        self._free = list(range(layout.slot_count - 1, -1, -1))

    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        slots: int = 4,
        rows: int = 1,
        vocab_size: int,
        dtype: str = "f32",
        topk: int = 0,
        verdict_capacity: int = 0,
        mode: int = 0o600,
    ) -> RingWriter:
        """A new ring; ``topk`` > 0 makes room for COMPACT rows, ``verdict_capacity`` > 0 for the fast lane.
        ``mode``: the segment's permissions; 0o600 (this user only) unless the sidecar runs as
        another user in a group the engine shares (then chgrp it and use 0o640, 0o660 for the
        fast lane, whose verdicts the sidecar writes)."""
        if dtype not in DTYPE_CODES:
            raise RingLayoutError(f"ring dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
        if name is None:
            name = f"fse-ring-{os.getpid()}-{os.urandom(4).hex()}"
        lay = RingLayout(slots, rows, vocab_size, DTYPE_CODES[dtype], topk, verdict_capacity > 0, verdict_capacity)
        return cls(name, lay, mode)

    def acquire(self) -> int:
        """A slot with no frame in flight; release it once its verdicts are back."""
        if not self._free:
            raise RingError(f"all {self.layout.slot_count} ring slots are in flight")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.layout.slot_count or slot in self._free:
            raise RingError(f"slot {slot} is not in flight")
        self._free.append(slot)

    @contextlib.contextmanager
    def frame(self, slot: int) -> Iterator[FrameWriter]:
        """Write one frame into ``slot``; the seqlock is odd for the duration.

        Yields a :class:`FrameWriter`; after the block, ``.seq`` holds the even value to
        publish. If the block raises, the slot is left odd (torn), which readers detect.
        """
        seq = int(self._seq[slot])
        if seq % 2:
            seq += 1  # a previous writer died mid-frame; step past it
        self._seq[slot] = seq + 1
        fw = FrameWriter(self, slot)
        yield fw
        self._n_rows[slot] = fw.n_rows
        self._seq[slot] = seq + 2
        fw.seq = seq + 2

    def begin_raw(self, slot: int) -> None:
        """Make the slot's counter odd without finishing (tests use this to tear a frame)."""
        self._seq[slot] = int(self._seq[slot]) | 1

    # -- the fast lane (layout flag LANE) ------------------------------------------------------
    def _lane(self, slot: int) -> memoryview:
        lay = self.layout
        if not lay.lane:
            raise RingError("this ring has no fast-lane area (create it with verdict_capacity > 0)")
        assert self._shm is not None and self._shm.buf is not None
        start = lay.slot_offset(slot) + lay.lane_offset
        return self._shm.buf[start : start + LANE_REQUEST + LANE_VERDICT_HEAD + lay.row_capacity * lay.verdict_capacity]

    def submit(self, slot: int, frame_seq: int, n_rows: int, deadline_ns: int, flags: int = 0) -> None:
        """Write the slot's request record: the sidecar judges frame ``frame_seq`` when rung
        (``flags``: REQUEST_ECHO / REQUEST_PING, the benchmark's floors)."""
        _REQUEST.pack_into(self._lane(slot), 0, frame_seq, deadline_ns, n_rows, flags)

    def verdicts(self, slot: int, frame_seq: int) -> tuple[list[bytes], int] | None:
        """The answers the sidecar wrote for ``frame_seq`` and the microseconds it says it
        spent on them, or None when they are not (all) there yet or were torn while read
        (the verdict area's own seqlock)."""
        lane = self._lane(slot)
        head = LANE_REQUEST
        if int.from_bytes(lane[head : head + 8], "little") != frame_seq:
            return None
        n, service_us = _VERDICT_COUNTS.unpack_from(lane, head + 8)
        cap = self.layout.verdict_capacity
        out = []
        for r in range(min(n, self.layout.row_capacity)):
            base = head + LANE_VERDICT_HEAD + r * cap
            size = int.from_bytes(lane[base : base + 4], "little")
            if size > cap - 4:
                return None
            out.append(bytes(lane[base + 4 : base + 4 + size]))
        if int.from_bytes(lane[head : head + 8], "little") != frame_seq:
            return None
        return out, service_us

    def close(self) -> None:
        shm = getattr(self, "_shm", None)
        if shm is None:
            return
        del self._seq, self._n_rows, self._desc, self._heap
        self._shm = None  # (a lane view still held by a caller would keep the mapping; none is kept)
        shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameWriter:
    """Rows of one frame, each placed at the next 64-byte boundary of the slot's heap."""

    def __init__(self, ring: RingWriter, slot: int) -> None:
        self._ring = ring
        self.slot = slot
        self.n_rows = 0
        self.seq = -1
        self._used = 0

    def _place(self, session_tag: int, step: int, kind: int, count: int, size: int) -> tuple[int, np.ndarray]:
        ring, lay = self._ring, self._ring.layout
        if self.n_rows >= lay.row_capacity:
            raise RingError(f"frame already holds {lay.row_capacity} rows (the ring's row capacity)")
        off = _align(self._used)
        if off + size > lay.heap_size:
            raise RingError(
                f"a {size}-byte row does not fit the slot's heap ({lay.heap_size - off} of {lay.heap_size} bytes left)"
            )
        r = self.n_rows
        ring._desc[self.slot, r] = (session_tag, step, kind, count, off, size, 0)
        self._used = off + size
        self.n_rows = r + 1
        return r, ring._heap[self.slot, off : off + size]

    def write_row(self, session_tag: int, step: int, logits: np.ndarray) -> int:
        """One FULL row (any strides, converted to the ring dtype); returns its row index."""
        lay = self._ring.layout
        x = np.asarray(logits)
        if x.shape != (lay.vocab_size,):
            raise RowError(f"logits row has shape {x.shape}, the ring holds rows of {lay.vocab_size}")
        r, dst_bytes = self._place(session_tag, step, KIND_FULL, lay.vocab_size, lay.full_size)
        dst = dst_bytes.view(DTYPES[lay.dtype_code][0])
        if lay.dtype_code == 3:  # bf16: keep the top 16 bits of f32 (round to nearest even)
            u = x.astype(np.float32).view(np.uint32)
            dst[...] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            np.copyto(dst, x, casting="same_kind")
        return r

    def write_compact(self, session_tag: int, step: int, moments: np.ndarray, top_logits: np.ndarray, top_ids: np.ndarray) -> int:
        """One COMPACT row: the full-vocabulary ``moments`` (in :data:`MOMENTS` order) and the
        top-k logits, highest first, with their token ids; returns its row index."""
        lay = self._ring.layout
        m = np.asarray(moments, dtype="<f8")
        vals = np.asarray(top_logits, dtype="<f4")
        ids = np.asarray(top_ids, dtype="<u4")
        k = vals.shape[0]
        if m.shape != (len(MOMENTS),) or vals.shape != (k,) or ids.shape != (k,):
            raise RowError(f"a COMPACT row needs {len(MOMENTS)} moments and k logits with k ids")
        if not MIN_K <= k <= lay.topk_capacity:
            raise RowError(f"a COMPACT row holds {MIN_K}..{lay.topk_capacity} entries (the ring's topk_capacity), got {k}")
        r, dst = self._place(session_tag, step, KIND_COMPACT, k, compact_size(k))
        dst[:COMPACT_HEAD] = m.view(np.uint8)
        dst[COMPACT_HEAD : COMPACT_HEAD + 4 * k] = vals.view(np.uint8)
        dst[COMPACT_HEAD + 4 * k :] = ids.view(np.uint8)
        return r


class RingReader:
    """Sidecar side: a read-only descriptor on an engine's ring; rows are copied out with pread.

    :meth:`row` returns a view of this reader's own buffer, valid until its next call.
    """

    def __init__(self, name: str) -> None:
        if not RING_NAME.fullmatch(name):
            raise RingLayoutError(f"ring name {shown(name)} must match {RING_NAME.pattern}")
        # Not multiprocessing's SharedMemory: on Python < 3.13 it registers the segment with
        # the resource tracker (which unlinks it when this process exits, SIGKILL included)
        # and unlinks it itself when mmap fails. The sidecar never owns a ring.
        shm_name = name if name.startswith("/") else "/" + name
        try:
            fd = _posixshmem.shm_open(shm_name, os.O_RDONLY, 0)
        except FileNotFoundError:
            raise RingError(f"no shared-memory ring named {name!r} (is the engine's ring in the same /dev/shm?)") from None
        except OSError as exc:
            raise RingError(f"cannot open shared-memory ring {name!r}: {exc.strerror}") from None
        self._fd: int | None = fd
        self.name = name
        try:
            st = os.fstat(fd)
            self.identity = (st.st_dev, st.st_ino)
            header = bytearray(HEADER_SIZE)
            if st.st_size < HEADER_SIZE or self._pread(memoryview(header), 0) < HEADER_SIZE:
                raise RingLayoutError(f"ring {name!r} holds {st.st_size} bytes, less than the {HEADER_SIZE}-byte ring header")
            self.layout = self._parse_header(header, st.st_size)
        except BaseException:
            self.close()
            raise
        lay = self.layout
        self._head = bytearray(SLOT_HEAD + DESCRIPTOR.itemsize * lay.row_capacity)
        self._seq_now = bytearray(8)
        self._raw = np.empty(lay.max_row_size, dtype=np.uint8)
        self._raw_view = self._raw.data
        self._wide = np.empty(lay.vocab_size, dtype=np.uint32)  # f16/bf16 widened to f32 bits

    @staticmethod
    def _parse_header(buf: bytearray, size: int) -> RingLayout:
        (magic, ver, hdr, slots, rows, vocab, dtype, topk, flags, stride, heap_off, heap_size, lane_off, vcap, _pid, _id) = (
            _HEADER.unpack_from(buf, 0)
        )
        if magic != MAGIC:  # someone else's segment: say nothing of what it holds
            raise RingLayoutError(f"the segment is not an fse ring (no {MAGIC!r} magic)")
        if ver != LAYOUT_VERSION:
            raise RingLayoutError(f"ring layout version {ver} is not supported (this sidecar reads {LAYOUT_VERSION})")
        if hdr != HEADER_SIZE:
            raise RingLayoutError(f"ring header size {hdr}, expected {HEADER_SIZE}")
        if flags & ~FLAG_LANE:
            raise RingLayoutError(f"ring flags {flags:#x} hold bits this sidecar does not know")
        lay = RingLayout(slots, rows, vocab, dtype, topk, bool(flags & FLAG_LANE), vcap, heap_size)
        got = (stride, heap_off, lane_off)
        want = (lay.slot_stride, lay.heap_offset, lay.lane_offset)
        if got != want:
            raise RingLayoutError(f"ring slot stride/heap offset/lane offset {got} disagree with the layout {want}")
        if size < lay.total_size:
            raise RingLayoutError(f"segment of {size} bytes is smaller than the layout's {lay.total_size}")
        return lay

    def _pread(self, buf: memoryview, offset: int) -> int:
        assert self._fd is not None, "reader is closed"
        try:
            return os.preadv(self._fd, [buf], offset)
        except OSError as exc:
            raise RingError(f"ring {self.name}: read failed: {exc.strerror}") from None

    def _read_exact(self, buf: memoryview, offset: int) -> None:
        want = buf.nbytes
        got = self._pread(buf, offset)
        if got != want:
            # The engine truncated or replaced its ring under an open session.
            raise RingError(f"ring {self.name} was truncated: {got} of {want} bytes at offset {offset} could be read")

    def _check_seq(self, slot: int, seq: int, now: int) -> None:
        if now != seq:
            state = "being written (odd seqlock)" if now % 2 else "replaced by a newer frame"
            raise TornFrameError(f"ring {self.name} slot {slot}: frame {seq} is torn: the slot is {state} (seq={now})")

    def _check_ref(self, slot: int, row: int, seq: int) -> None:
        lay = self.layout
        if not 0 <= slot < lay.slot_count:
            raise RowError(f"slot {slot} is out of range: ring {self.name} has {lay.slot_count} slots")
        if not 0 <= row < lay.row_capacity:
            raise RowError(f"row {row} is out of range: ring {self.name} holds {lay.row_capacity} rows per frame")
        if seq % 2 or seq == 0:
            raise RowError(f"published seq {seq} must be even and non-zero")

    def _descriptor(
        self, head: memoryview, slot: int, row: int, n: int, session_tag: int, step: int
    ) -> tuple[int, int, int, int]:
        """(kind, count, offset, size) of a row whose tag and bounds hold; RowError otherwise."""
        lay = self.layout
        if row >= n:
            raise RowError(f"row {row} is out of range: slot {slot} holds {n} rows")
        tag, tstep, kind, count, off, size, _ = _DESC.unpack_from(head, SLOT_HEAD + DESCRIPTOR.itemsize * row)
        if tag != session_tag or tstep != step:
            raise RowError(
                f"slot {slot} row {row} is tagged (session_tag={tag}, step={tstep}), "
                f"the request is for (session_tag={session_tag}, step={step})"
            )
        if kind == KIND_FULL:
            ok = count == lay.vocab_size and size == lay.full_size
        elif kind == KIND_COMPACT:
            ok = MIN_K <= count <= lay.topk_capacity and size == compact_size(count)
        else:
            raise RowError(f"slot {slot} row {row}: row kind {kind} is not implemented by this sidecar")
        if not ok or off + size > lay.heap_size:
            raise RowError(
                f"slot {slot} row {row}: a {KIND_NAMES[kind]} row of {count} entries, {size} bytes at heap offset {off}, "
                "breaks the layout"
            )
        return kind, count, off, size

    def _compact(self, data: memoryview, k: int) -> CompactRow:
        raw = np.frombuffer(data, dtype=np.uint8)
        moments = raw[:COMPACT_HEAD].view("<f8")
        vals = raw[COMPACT_HEAD : COMPACT_HEAD + 4 * k].view("<f4")
        ids = raw[COMPACT_HEAD + 4 * k : COMPACT_HEAD + 8 * k].view("<u4")
        return CompactRow.from_top(self.layout.vocab_size, moments, vals, ids)

    def _widened(self, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
        """A FULL payload as float32: f32 as it is, f16/bf16 widened into ``out`` (uint32)."""
        code = self.layout.dtype_code
        if code == 1:
            return raw.view(np.float32)
        if code == 2:
            np.copyto(out.view(np.float32), raw.view(np.float16))
        else:
            np.copyto(out, raw.view(np.uint16))
            np.left_shift(out, 16, out=out)
        return out.view(np.float32)

    def row(self, slot: int, row: int, seq: int, session_tag: int, step: int) -> np.ndarray | CompactRow:
        """A copy of the row, taken whole under the published ``seq``: a FULL row's logits as
        float32 (a view of this reader's buffer, valid until the next call) or a validated
        :class:`CompactRow`.

        Raises TornFrameError if the frame was not ``seq`` before or after the copy.
        """
        self._check_ref(slot, row, seq)
        lay = self.layout
        base = lay.slot_offset(slot)
        head = memoryview(self._head)[: SLOT_HEAD + DESCRIPTOR.itemsize * (row + 1)]
        self._read_exact(head, base)
        now, n = struct.unpack_from("<QI", head)
        self._check_seq(slot, seq, now)  # not being written, not replaced
        kind, count, off, size = self._descriptor(head, slot, row, n, session_tag, step)
        data = self._raw_view[:size]
        self._read_exact(data, base + lay.heap_offset + off)
        self._read_exact(memoryview(self._seq_now), base)
        self._check_seq(slot, seq, int.from_bytes(self._seq_now, "little"))  # whole, or refused
        if kind == KIND_COMPACT:
            return self._compact(data, count)
        return self._widened(self._raw[: lay.full_size], self._wide)

    def rows(self, slot: int, seq: int, wanted: Sequence[tuple[int, int, int]]) -> list[BatchRow]:
        """Many rows of one frame (a batch step): ``wanted`` holds (row, session_tag, step)
        per row. One read of the slot's descriptors and of every COMPACT payload, one check
        of the seqlock after them. A row that breaks a rule is that row's error, in its
        place; a torn or truncated frame is every row's.

        A FULL row comes back as a function that reads it when called (:meth:`row`: into
        this reader's one buffer, under its own seqlock check): judged right after it is
        read, a row is still in the caches, where reading a batch of 64 rows of 128k ids
        first would stream 32 MB through them before the first row is judged. The COMPACT
        rows of one k are validated together (:class:`CompactBatch`) and come back as
        :class:`BatchedRow` references into it, so that their first proposals can be drawn
        for all of them at once (:mod:`sidecar.core.batch_draw`)."""
        lay = self.layout
        try:
            if not wanted:
                return []
            rows, tags, steps = (list(c) for c in zip(*wanted, strict=True))
            last = max(rows)
            if min(rows) < 0 or last >= lay.row_capacity:
                for row in rows:  # the first bad reference's own error
                    self._check_ref(slot, row, seq)
            self._check_ref(slot, last, seq)  # the slot and seq (every row is in range)
            base = lay.slot_offset(slot)
            head = memoryview(bytearray(SLOT_HEAD + DESCRIPTOR.itemsize * (last + 1)))
            self._read_exact(head, base)
            now, n = struct.unpack_from("<QI", head)
            self._check_seq(slot, seq, now)
        except FseError as exc:
            return [exc] * len(wanted)
        out: list[BatchRow | None] = [None] * len(wanted)
        compact: dict[int, list[tuple[int, int]]] = {}  # k -> (place in out, heap offset) of its rows
        try:
            # Every descriptor checked at once for the common case (a COMPACT row that keeps
            # every rule); any other row (FULL, or one that breaks a rule) by _descriptor.
            desc = np.frombuffer(head, dtype=DESCRIPTOR, count=last + 1, offset=SLOT_HEAD)[rows]
            count, size, off = desc["count"].astype(np.uint64), desc["size"], desc["offset"]
            heap = np.uint64(lay.heap_size)
            ok = (
                (np.asarray(rows) < n)
                & (desc["session_tag"] == np.array(tags, dtype=np.uint64))
                & (desc["step"] == np.array(steps, dtype=np.uint64))
                & (desc["kind"] == KIND_COMPACT)
                & (count >= MIN_K)
                & (count <= lay.topk_capacity)
                & (size == COMPACT_HEAD + 8 * count)
                & (size <= heap)
                & (off <= heap - np.minimum(size, heap))
            )
            good = np.flatnonzero(ok)
            ks = count[good]
            for k in np.unique(ks).tolist():  # one group per k (a frame usually has one)
                of_k = good[ks == k]
                compact[k] = list(zip(of_k.tolist(), off[of_k].tolist(), strict=True))
            for place in np.flatnonzero(~ok).tolist():
                row, tag, step = wanted[place]
                try:
                    kind, k, o, _ = self._descriptor(head, slot, row, n, tag, step)
                except RowError as exc:
                    out[place] = exc
                    continue
                if kind != KIND_COMPACT:
                    out[place] = functools.partial(self.row, slot, row, seq, tag, step)
                else:  # pragma: no cover - the two checks must agree
                    raise AssertionError(f"slot {slot} row {row}: a COMPACT descriptor the batch check refused")
            payloads = {k: self._compact_payloads(base, places, compact_size(k)) for k, places in compact.items()}
            self._read_exact(memoryview(self._seq_now), base)
            self._check_seq(slot, seq, int.from_bytes(self._seq_now, "little"))
        except FseError as exc:
            return [exc] * len(wanted)
        for k, places in compact.items():
            buf = payloads[k]
            if len(places) < VECTORISE_ROWS:  # too few to pay for the batch's passes
                for j, (place, _) in enumerate(places):
                    try:
                        out[place] = self._compact(memoryview(buf[j]), k)
                    except FseError as exc:
                        out[place] = exc
                continue
            # One validation pass for the rows of one k; each row then refers to the batch.
            moments, logits = buf[:, :COMPACT_HEAD].view("<f8"), buf[:, COMPACT_HEAD : COMPACT_HEAD + 4 * k].view("<f4")
            try:
                batch = CompactBatch.from_top(lay.vocab_size, moments, logits, buf[:, COMPACT_HEAD + 4 * k :].view("<u4"))
            except RowError as exc:
                for place, _ in places:
                    out[place] = exc
                continue
            for j, (place, _) in enumerate(places):
                out[place] = batch.errors[j] or BatchedRow(batch, j)
        return cast(list[BatchRow], out)

    def _compact_payloads(self, base: int, places: list[tuple[int, int]], size: int) -> np.ndarray:
        """The payloads of COMPACT rows of one size, one row each: the span that holds them
        in one read when they lie close together (a batched engine writes them one after
        the other), else one read a row."""
        heap = base + self.layout.heap_offset
        offs = np.array([off for _, off in places], dtype=np.int64)
        lo, hi = int(offs.min()), int(offs.max()) + size
        if hi - lo <= 2 * size * len(places):
            span = np.empty(hi - lo, dtype=np.uint8)
            self._read_exact(span.data, heap + lo)
            step = int(offs[1] - offs[0]) if len(offs) > 1 else size
            if step >= size and (offs == lo + step * np.arange(len(offs))).all():  # evenly spaced, in order: a view
                return np.lib.stride_tricks.as_strided(span, (len(offs), size), (step, 1), writeable=False)
            return span[(offs - lo)[:, None] + np.arange(size)]  # a gather: a copy of each row
        buf = np.empty((len(places), size), dtype=np.uint8)
        for j, off in enumerate(offs.tolist()):
            self._read_exact(memoryview(buf[j]), heap + off)
        return buf

    # -- the fast lane ------------------------------------------------------------------------
    def open_lane(self) -> None:
        """A read-write descriptor on the same segment, for writing verdicts (never mapped)."""
        if not self.layout.lane:
            raise RingLayoutError(f"ring {self.name} has no fast-lane area (its layout has no LANE flag)")
        shm_name = self.name if self.name.startswith("/") else "/" + self.name
        try:
            fd = _posixshmem.shm_open(shm_name, os.O_RDWR, 0)
        except OSError as exc:
            raise RingError(f"cannot open ring {self.name} for the fast lane: {exc.strerror}") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.identity:
            os.close(fd)
            raise RingError(f"ring {self.name} was replaced since the session opened; open a new session")
        self._wfd: int | None = fd

    def request(self, slot: int) -> tuple[int, int, int, int]:
        """(frame_seq, deadline_ns, n_rows, flags) of the slot's request record."""
        buf = bytearray(_REQUEST.size)
        self._read_exact(memoryview(buf), self.layout.slot_offset(slot) + self.layout.lane_offset)
        frame_seq, deadline, n_rows, flags = _REQUEST.unpack(buf)
        return frame_seq, deadline, n_rows, flags

    def frame_tag(self, slot: int, frame_seq: int) -> int | None:
        """The session tag of the slot's first row while the slot holds the whole frame
        ``frame_seq``; None while it holds another or one being written (whose it is cannot
        be told then)."""
        buf = bytearray(SLOT_HEAD + DESCRIPTOR.itemsize)
        self._read_exact(memoryview(buf), self.layout.slot_offset(slot))
        if int.from_bytes(buf[:8], "little") != frame_seq:
            return None
        return int(_DESC.unpack_from(buf, SLOT_HEAD)[0])

    def write_verdicts(self, slot: int, frame_seq: int, answers: list[bytes], service_us: int = 0) -> None:
        """Publish ``answers`` (serialized StepResponses) for ``frame_seq`` under the verdict
        area's seqlock: odd while writing, then ``frame_seq`` itself. ``service_us``: the
        sidecar's own time on them, for the engine's measurements only (not signed)."""
        lay = self.layout
        fd = getattr(self, "_wfd", None)
        assert fd is not None, "open_lane() first"
        head = lay.slot_offset(slot) + lay.lane_offset + LANE_REQUEST
        for a in answers:
            if len(a) > lay.verdict_capacity - 4:
                raise RingError(f"an answer of {len(a)} bytes exceeds the ring's verdict capacity ({lay.verdict_capacity - 4})")
        last = len(answers[-1]) if answers else 0
        end = head + LANE_VERDICT_HEAD + max(len(answers) - 1, 0) * lay.verdict_capacity + 4 + last
        try:
            # pwrite past the end would grow back a segment its owner shrank: the sidecar never
            # resizes a ring. (A shrink between this check and the writes grows it by at most
            # this area; the engine that shrinks its own ring mid-step fails its own step.)
            size = os.fstat(fd).st_size
            if size < end:
                raise RingError(f"ring {self.name} is {size} bytes, truncated under the sidecar: no verdict can go in it")
            os.pwrite(fd, struct.pack("<Q", frame_seq - 1), head)
            for r, a in enumerate(answers):  # each row's size and bytes only: no padding to the capacity
                os.pwrite(fd, struct.pack("<I", len(a)) + a, head + LANE_VERDICT_HEAD + r * lay.verdict_capacity)
            os.pwrite(fd, _VERDICT_COUNTS.pack(len(answers), min(service_us, 0xFFFFFFFF)), head + 8)
            os.pwrite(fd, struct.pack("<Q", frame_seq), head)
        except OSError as exc:
            raise RingError(f"ring {self.name}: cannot write verdicts: {exc.strerror}") from None

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)  # the engine unlinks the ring; this only lets go of it
        wfd, self._wfd = getattr(self, "_wfd", None), None
        if wfd is not None:
            os.close(wfd)


def mapped_view(name: str) -> tuple[mmap.mmap, RingLayout]:
    """A read-only mapping of a ring and its layout: what the reader did before layout 2,
    kept for ``fse-sidecar bench ring`` to measure the copy against."""
    fd = _posixshmem.shm_open(name if name.startswith("/") else "/" + name, os.O_RDONLY, 0)
    try:
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return m, RingReader._parse_header(bytearray(m[:HEADER_SIZE]), size)
