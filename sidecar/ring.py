"""Shared-memory logits ring (layout: proto/fse/v1/RING.md).

The engine owns the ring (:class:`RingWriter` creates and unlinks it); the sidecar
attaches read-only (:class:`RingReader`) and reads rows in place: no copy of the logits
crosses the process boundary. Each slot carries a seqlock counter: the writer makes it
odd before writing and even (+2) after, and publishes the even value in its StepRequest.
A reader that finds any other value, before or after using the row, raises
:class:`TornFrameError`: a torn or replaced frame is an error, never a guess.
"""

from __future__ import annotations

import _posixshmem  # the shm_open behind multiprocessing.shared_memory (POSIX only)
import contextlib
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from .errors import RingError, RingLayoutError, RowError, TornFrameError

MAGIC = b"FSERING\x00"
LAYOUT_VERSION = 1
HEADER_SIZE = 128
SLOT_HEADER = 16  # u64 seq, u32 kind, u32 n_rows
TAG_SIZE = 16  # u64 session_tag, u64 step
ALIGN = 64
KIND_FULL = 1
KIND_COMPACT = 2  # reserved in layout v1

# dtype code -> (numpy dtype of the stored element, name)
DTYPES: dict[int, tuple[np.dtype, str]] = {
    1: (np.dtype("<f4"), "f32"),
    2: (np.dtype("<f2"), "f16"),
    3: (np.dtype("<u2"), "bf16"),  # stored as raw 16-bit words, widened on read
}
DTYPE_CODES = {name: code for code, (_, name) in DTYPES.items()}
RING_NAME = re.compile(r"/?[A-Za-z0-9._-]{1,200}")
_HEADER = struct.Struct("<8sIIIIIIQQI")  # magic ver hdr slots rows vocab dtype stride rows_off pid


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True, slots=True)
class RingLayout:
    slot_count: int
    row_capacity: int
    vocab_size: int
    dtype_code: int

    def __post_init__(self) -> None:
        if self.dtype_code not in DTYPES:
            raise RingLayoutError(f"ring dtype code {self.dtype_code} is not one of {sorted(DTYPES)}")
        for name in ("slot_count", "row_capacity", "vocab_size"):
            if getattr(self, name) < 1:
                raise RingLayoutError(f"ring {name} must be >= 1, got {getattr(self, name)}")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype_code][0].itemsize

    @property
    def row_stride(self) -> int:
        return _align(self.vocab_size * self.itemsize)

    @property
    def rows_offset(self) -> int:
        return _align(SLOT_HEADER + TAG_SIZE * self.row_capacity)

    @property
    def slot_stride(self) -> int:
        return _align(self.rows_offset + self.row_capacity * self.row_stride)

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + self.slot_count * self.slot_stride


def _slot_views(buf: memoryview, lay: RingLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(seq[slots], n_rows[slots], tags[slots, rows, 2], rows[slots, rows, vocab]) views of ``buf``."""
    s = lay.slot_stride
    seq = np.ndarray((lay.slot_count,), dtype="<u8", buffer=buf, offset=HEADER_SIZE, strides=(s,))
    n_rows = np.ndarray((lay.slot_count,), dtype="<u4", buffer=buf, offset=HEADER_SIZE + 12, strides=(s,))
    tags = np.ndarray(
        (lay.slot_count, lay.row_capacity, 2),
        dtype="<u8",
        buffer=buf,
        offset=HEADER_SIZE + SLOT_HEADER,
        strides=(s, TAG_SIZE, 8),
    )
    rows = np.ndarray(
        (lay.slot_count, lay.row_capacity, lay.vocab_size),
        dtype=DTYPES[lay.dtype_code][0],
        buffer=buf,
        offset=HEADER_SIZE + lay.rows_offset,
        strides=(s, lay.row_stride, lay.itemsize),
    )
    return seq, n_rows, tags, rows


class RingWriter:
    """Engine side: creates the ring, writes frames, unlinks it on close."""

    def __init__(self, name: str, layout: RingLayout) -> None:
        self.layout = layout
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_size)
        except FileExistsError:
            raise RingError(f"shared memory {name!r} already exists") from None
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
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
            layout.slot_stride,
            layout.rows_offset,
            os.getpid(),
        )
        self._seq, self._n_rows, self._tags, self._rows = _slot_views(buf, layout)
        self._kind = np.ndarray(
            (layout.slot_count,), dtype="<u4", buffer=buf, offset=HEADER_SIZE + 8, strides=(layout.slot_stride,)
        )
        self._free = list(range(layout.slot_count - 1, -1, -1))

    @classmethod
    def create(cls, name: str | None = None, *, slots: int = 4, rows: int = 1, vocab_size: int, dtype: str = "f32") -> RingWriter:
        if dtype not in DTYPE_CODES:
            raise RingLayoutError(f"ring dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
        if name is None:
            name = f"fse-ring-{os.getpid()}-{os.urandom(4).hex()}"
        return cls(name, RingLayout(slots, rows, vocab_size, DTYPE_CODES[dtype]))

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
        """Write one FULL frame into ``slot``; the seqlock is odd for the duration.

        Yields a :class:`FrameWriter`; after the block, ``.seq`` holds the even value to
        publish. If the block raises, the slot is left odd (torn), which readers detect.
        """
        seq = int(self._seq[slot])
        if seq % 2:
            seq += 1  # a previous writer died mid-frame; step past it
        self._seq[slot] = seq + 1
        fw = FrameWriter(self, slot)
        yield fw
        self._kind[slot] = KIND_FULL
        self._n_rows[slot] = fw.n_rows
        self._seq[slot] = seq + 2
        fw.seq = seq + 2

    def begin_raw(self, slot: int) -> None:
        """Make the slot's counter odd without finishing (tests use this to tear a frame)."""
        self._seq[slot] = int(self._seq[slot]) | 1

    def close(self) -> None:
        shm = getattr(self, "_shm", None)
        if shm is None:
            return
        del self._seq, self._n_rows, self._tags, self._rows, self._kind
        self._shm = None
        shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameWriter:
    def __init__(self, ring: RingWriter, slot: int) -> None:
        self._ring = ring
        self.slot = slot
        self.n_rows = 0
        self.seq = -1

    def write_row(self, session_tag: int, step: int, logits: np.ndarray) -> int:
        """Copy one logits row (any strides, converted to the ring dtype); returns its row index."""
        lay = self._ring.layout
        if self.n_rows >= lay.row_capacity:
            raise RingError(f"frame already holds {lay.row_capacity} rows (the ring's row capacity)")
        x = np.asarray(logits)
        if x.shape != (lay.vocab_size,):
            raise RowError(f"logits row has shape {x.shape}, the ring holds rows of {lay.vocab_size}")
        r = self.n_rows
        dst = self._ring._rows[self.slot, r]
        if lay.dtype_code == 3:  # bf16: keep the top 16 bits of f32 (round to nearest even)
            u = x.astype(np.float32).view(np.uint32)
            dst[...] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            np.copyto(dst, x, casting="same_kind")
        self._ring._tags[self.slot, r] = (session_tag, step)
        self.n_rows = r + 1
        return r


class RingReader:
    """Sidecar side: attaches to an existing ring by name and reads rows in place."""

    def __init__(self, name: str) -> None:
        if not RING_NAME.fullmatch(name):
            raise RingLayoutError(f"ring name {name!r} must match {RING_NAME.pattern}")
        # Not multiprocessing's SharedMemory: on Python < 3.13 it registers the segment with
        # the resource tracker (which unlinks it when this process exits, SIGKILL included),
        # unlinks it itself when mmap fails, and raises a bare ValueError on an empty one.
        # The sidecar never owns a ring: open it read-only, check the size, map it read-only.
        shm_name = name if name.startswith("/") else "/" + name
        try:
            fd = _posixshmem.shm_open(shm_name, os.O_RDONLY, 0)
        except FileNotFoundError:
            raise RingError(f"no shared-memory ring named {name!r} (is the engine's ring in the same /dev/shm?)") from None
        except OSError as exc:
            raise RingError(f"cannot open shared-memory ring {name!r}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise RingLayoutError(f"ring {name!r} holds {size} bytes, less than the {HEADER_SIZE}-byte ring header")
            try:
                self._map: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except OSError as exc:
                raise RingError(f"cannot map shared-memory ring {name!r}: {exc.strerror}") from None
        finally:
            os.close(fd)  # the mapping keeps the segment; the engine unlinks it
        self.name = name
        buf = memoryview(self._map)
        try:
            self.layout, _owner = self._parse_header(buf, size)
        except RingLayoutError:
            buf.release()
            self.close()
            raise
        self._seq, self._n_rows, self._tags, self._rows = _slot_views(buf, self.layout)

    @staticmethod
    def _parse_header(buf: memoryview, size: int) -> tuple[RingLayout, int]:
        if size < HEADER_SIZE:
            raise RingLayoutError(f"segment of {size} bytes is smaller than the {HEADER_SIZE}-byte ring header")
        magic, ver, hdr, slots, rows, vocab, dtype, stride, rows_off, pid = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC:  # someone else's segment: say nothing of what it holds
            raise RingLayoutError(f"the segment is not an fse ring (no {MAGIC!r} magic)")
        if ver != LAYOUT_VERSION:
            raise RingLayoutError(f"ring layout version {ver} is not supported (this sidecar reads {LAYOUT_VERSION})")
        if hdr != HEADER_SIZE:
            raise RingLayoutError(f"ring header size {hdr}, expected {HEADER_SIZE}")
        lay = RingLayout(slots, rows, vocab, dtype)
        if stride != lay.slot_stride or rows_off != lay.rows_offset:
            raise RingLayoutError(
                f"ring slot stride/rows offset {stride}/{rows_off} disagree with the layout ({lay.slot_stride}/{lay.rows_offset})"
            )
        if size < lay.total_size:
            raise RingLayoutError(f"segment of {size} bytes is smaller than the layout's {lay.total_size}")
        return lay, pid

    def row(self, slot: int, row: int, seq: int, session_tag: int, step: int) -> np.ndarray:
        """The row's logits as float32 (a zero-copy view for f32 rings).

        Raises TornFrameError if the frame is not the published ``seq``; call
        :meth:`validate` after using a zero-copy view, before trusting what was computed.
        """
        lay = self.layout
        if not 0 <= slot < lay.slot_count:
            raise RowError(f"slot {slot} is out of range: ring {self.name} has {lay.slot_count} slots")
        if seq % 2 or seq == 0:
            raise RowError(f"published seq {seq} must be even and non-zero")
        self.validate(slot, seq)
        n = int(self._n_rows[slot])
        if not 0 <= row < min(n, lay.row_capacity):
            raise RowError(f"row {row} is out of range: slot {slot} holds {n} rows")
        tag, tstep = (int(t) for t in self._tags[slot, row])
        if tag != session_tag or tstep != step:
            raise RowError(
                f"slot {slot} row {row} is tagged (session_tag={tag}, step={tstep}), "
                f"the request is for (session_tag={session_tag}, step={step})"
            )
        x = self._rows[slot, row]
        if lay.dtype_code == 1:
            out = x
        elif lay.dtype_code == 2:
            out = x.astype(np.float32)
        else:
            out = (x.astype(np.uint32) << 16).view(np.float32)
        if lay.dtype_code != 1:
            self.validate(slot, seq)  # the copy is ours now; make sure it was whole
        return out

    def validate(self, slot: int, seq: int) -> None:
        now = int(self._seq[slot])
        if now != seq:
            state = "being written (odd seqlock)" if now % 2 else "replaced by a newer frame"
            raise TornFrameError(f"ring {self.name} slot {slot}: frame {seq} is torn: the slot is {state} (seq={now})")

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is None:
            return
        for view in ("_seq", "_n_rows", "_tags", "_rows"):
            self.__dict__.pop(view, None)
        self._map = None
        with contextlib.suppress(BufferError):
            m.close()
