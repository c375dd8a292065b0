from __future__ import annotations

import multiprocessing as mp
from multiprocessing import shared_memory

import numpy as np
import pytest

from sidecar.errors import RingError, RingLayoutError, RowError, TornFrameError
from sidecar.ring import RingReader, RingWriter


@pytest.fixture
def ring():
    with RingWriter.create(slots=3, rows=4, vocab_size=1000) as w:
        yield w


def test_rows_round_trip_zero_copy(ring: RingWriter) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    slot = ring.acquire()
    with ring.frame(slot) as f:
        rows = [f.write_row(7 + i, 40 + i, x[i]) for i in range(3)]
    reader = RingReader(ring.name)
    try:
        for i, r in enumerate(rows):
            got = reader.row(slot, r, f.seq, 7 + i, 40 + i)
            np.testing.assert_array_equal(got, x[i])
            assert not got.flags.owndata  # a view into shared memory, not a copy
        reader.validate(slot, f.seq)
    finally:
        del got
        reader.close()


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_rows_are_widened_to_float32(dtype: str) -> None:
    x = (np.random.default_rng(1).standard_normal(1000) * 4).astype(np.float32)
    with RingWriter.create(slots=1, vocab_size=1000, dtype=dtype) as w:
        with w.frame(0) as f:
            f.write_row(1, 0, x)
        reader = RingReader(w.name)
        got = reader.row(0, 0, f.seq, 1, 0)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, x, rtol=1e-3 if dtype == "f16" else 8e-3, atol=1e-3)
        reader.close()


def test_strided_rows_like_llama_cpp_scores_are_accepted(ring: RingWriter) -> None:
    records = np.zeros(1000, dtype=[("id", np.intc), ("logit", np.single), ("p", np.single)])
    records["logit"] = np.arange(1000, dtype=np.float32)
    with ring.frame(0) as f:
        f.write_row(1, 0, records["logit"])  # stride 12 bytes, as llama-cpp-python passes it
    reader = RingReader(ring.name)
    np.testing.assert_array_equal(reader.row(0, 0, f.seq, 1, 0), np.arange(1000, dtype=np.float32))
    reader.close()


def test_frame_left_half_written_is_detected_as_torn(ring: RingWriter) -> None:
    with ring.frame(0) as f:
        f.write_row(1, 0, np.zeros(1000, np.float32))
    published = f.seq
    ring.begin_raw(0)  # a writer starts the next frame and dies between the seqlock bumps
    reader = RingReader(ring.name)
    with pytest.raises(TornFrameError, match="being written"):
        reader.row(0, 0, published, 1, 0)
    reader.close()


def test_frame_replaced_while_being_read_is_detected(ring: RingWriter) -> None:
    with ring.frame(0) as f:
        f.write_row(1, 0, np.ones(1000, np.float32))
    reader = RingReader(ring.name)
    view = reader.row(0, 0, f.seq, 1, 0)
    with ring.frame(0) as f2:  # the writer reuses the slot under the reader
        f2.write_row(1, 1, np.zeros(1000, np.float32))
    with pytest.raises(TornFrameError, match="replaced by a newer frame"):
        reader.validate(0, f.seq)
    del view
    reader.close()


def test_writer_that_raises_mid_frame_leaves_it_torn(ring: RingWriter) -> None:
    with ring.frame(1) as f:
        f.write_row(1, 0, np.zeros(1000, np.float32))
    with pytest.raises(RowError):
        with ring.frame(1) as g:
            g.write_row(1, 1, np.zeros(999, np.float32))  # wrong size: raises inside the frame
    reader = RingReader(ring.name)
    with pytest.raises(TornFrameError):
        reader.row(1, 0, f.seq, 1, 0)
    reader.close()
    with ring.frame(1) as h:  # a later writer steps past the torn frame
        h.write_row(1, 2, np.zeros(1000, np.float32))
    assert h.seq % 2 == 0 and h.seq > f.seq


def test_row_tag_must_match_the_request(ring: RingWriter) -> None:
    with ring.frame(0) as f:
        f.write_row(5, 9, np.zeros(1000, np.float32))
    reader = RingReader(ring.name)
    with pytest.raises(RowError, match=r"tagged \(session_tag=5, step=9\)"):
        reader.row(0, 0, f.seq, 5, 10)
    with pytest.raises(RowError, match="row 1 is out of range"):
        reader.row(0, 1, f.seq, 5, 9)
    with pytest.raises(RowError, match="slot 7 is out of range"):
        reader.row(7, 0, f.seq, 5, 9)
    reader.close()


def test_foreign_segment_is_refused_with_its_reason() -> None:
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        shm.buf[:8] = b"NOTARING"
        with pytest.raises(RingLayoutError, match="not an fse ring") as err:
            RingReader(shm.name)
        assert "NOTARING" not in str(err.value)  # nothing of someone else's segment is disclosed
    finally:
        shm.close()
        shm.unlink()
    with pytest.raises(RingError, match="no shared-memory ring named"):
        RingReader("fse-does-not-exist")
    with pytest.raises(RingLayoutError, match="must match"):
        RingReader("../etc/passwd")


def test_slots_are_handed_out_until_released(ring: RingWriter) -> None:
    got = {ring.acquire() for _ in range(3)}
    assert got == {0, 1, 2}
    with pytest.raises(RingError, match="in flight"):
        ring.acquire()
    ring.release(1)
    assert ring.acquire() == 1


def _write_in_child(name: str, q: mp.Queue[int]) -> None:
    w = RingWriter.create(name, slots=1, vocab_size=1000)
    with w.frame(0) as f:
        f.write_row(3, 0, np.arange(1000, dtype=np.float32))
    q.put(f.seq)
    q.get()  # wait until the parent has read, then unlink on close
    w.close()


def test_another_process_writes_and_this_one_reads() -> None:
    ctx = mp.get_context("spawn")
    q: mp.Queue[int] = ctx.Queue()
    name = "fse-test-xproc"
    p = ctx.Process(target=_write_in_child, args=(name, q))
    p.start()
    try:
        seq = q.get(timeout=30)
        reader = RingReader(name)
        np.testing.assert_array_equal(reader.row(0, 0, seq, 3, 0), np.arange(1000, dtype=np.float32))
        reader.close()
    finally:
        q.put(0)
        p.join(30)
    with pytest.raises(RingError):
        RingReader(name)  # the owner unlinked it
