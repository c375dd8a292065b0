from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

from sidecar.core.compact import BatchedRow, CompactRow, moments_and_top
from sidecar.errors import RingError, RingLayoutError, RowError, TornFrameError
from sidecar.ring import LANE_REQUEST, LANE_VERDICT_HEAD, VECTORISE_ROWS, RingLayout, RingReader, RingWriter


@pytest.fixture
def ring():
    with RingWriter.create(slots=3, rows=4, vocab_size=1000) as w:
        yield w


def test_rows_round_trip_as_copies_the_engine_cannot_change(ring: RingWriter) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    slot = ring.acquire()
    with ring.frame(slot) as f:
        rows = [f.write_row(7 + i, 40 + i, x[i]) for i in range(3)]
    reader = RingReader(ring.name)
    try:
        for i, r in enumerate(rows):
            got = reader.row(slot, r, f.seq, 7 + i, 40 + i)
            np.testing.assert_array_equal(got, x[i])
        with ring.frame(slot) as g:  # the engine rewrites the slot: the sidecar's copy stays
            g.write_row(7, 41, np.zeros(1000, np.float32))
        np.testing.assert_array_equal(got, x[2])
    finally:
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


def _tear_after_the_copy(reader: RingReader, monkeypatch, tear, reads: int = 2) -> None:
    """Run ``tear`` right after the reader's ``reads``-th read: by default after it copies a
    row's logits (head + descriptors, then the logits); 1: after a batch's head."""
    read = reader._read_exact
    calls = []

    def read_then_tear(buf, offset):
        read(buf, offset)
        calls.append(offset)
        if len(calls) == reads:  # the engine strikes now
            tear()

    monkeypatch.setattr(reader, "_read_exact", read_then_tear)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("how", ["replaced", "being written"])
def test_frame_rewritten_while_it_is_copied_is_refused(monkeypatch, dtype: str, how: str) -> None:
    with RingWriter.create(slots=1, vocab_size=1000, dtype=dtype) as w:
        with w.frame(0) as f:
            f.write_row(1, 0, np.ones(1000, np.float32))
        reader = RingReader(w.name)

        def tear() -> None:
            if how == "replaced":
                with w.frame(0) as g:
                    g.write_row(1, 0, np.zeros(1000, np.float32))
            else:
                w.begin_raw(0)

        _tear_after_the_copy(reader, monkeypatch, tear)
        want = "replaced by a newer frame" if how == "replaced" else "being written"
        with pytest.raises(TornFrameError, match=want):
            reader.row(0, 0, f.seq, 1, 0)
        reader.close()


def test_a_frame_published_before_it_was_whole_is_refused(ring: RingWriter, monkeypatch) -> None:
    """An engine that sends a step for a frame it is still writing: the slot's counter is
    odd when the copy starts and reaches the published value only after it."""
    frame = ring.frame(0)
    f = frame.__enter__()
    f.write_row(1, 0, np.ones(1000, np.float32))
    published = int(ring._seq[0]) + 1
    reader = RingReader(ring.name)
    _tear_after_the_copy(reader, monkeypatch, lambda: frame.__exit__(None, None, None))
    with pytest.raises(TornFrameError, match="being written"):
        reader.row(0, 0, published, 1, 0)
    if int(ring._seq[0]) % 2:
        frame.__exit__(None, None, None)  # refused before the copy: finish the frame now
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


@pytest.mark.parametrize("size", [0, 100, 300, 4096])
def test_a_ring_truncated_under_the_reader_is_refused_not_read_past_its_end(size: int) -> None:
    with RingWriter.create(slots=2, vocab_size=1000) as w:
        with w.frame(1) as f:
            f.write_row(1, 0, np.ones(1000, np.float32))
        reader = RingReader(w.name)
        os.truncate(f"/dev/shm/{w.name.lstrip('/')}", size)  # a mapping would SIGBUS here
        with pytest.raises(RingError, match="truncated"):
            reader.row(1, 0, f.seq, 1, 0)
        reader.close()


def test_a_compact_row_is_read_whole_beside_full_rows_and_an_unknown_kind_is_refused() -> None:
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    moments, vals, ids = moments_and_top(x, 8)
    with RingWriter.create(slots=1, rows=2, vocab_size=1000, topk=8) as w:
        with w.frame(0) as f:
            f.write_compact(1, 0, moments, vals, ids)
            f.write_row(1, 0, np.ones(1000, np.float32))
        reader = RingReader(w.name)
        c = reader.row(0, 0, f.seq, 1, 0)
        assert isinstance(c, CompactRow) and c.k == 8
        np.testing.assert_array_equal(c.ids, np.sort(ids))
        assert c.moments.log_sum_exp == moments[0]
        np.testing.assert_array_equal(reader.row(0, 1, f.seq, 1, 0), np.ones(1000, np.float32))  # mixed frame
        w._desc[0, 1]["kind"] = 7
        with pytest.raises(RowError, match="row kind 7 is not implemented"):
            reader.row(0, 1, f.seq, 1, 0)
        w._desc[0, 0]["count"] = 9  # a COMPACT count that disagrees with its size
        with pytest.raises(RowError, match="COMPACT row of 9 entries.*breaks the layout"):
            reader.row(0, 0, f.seq, 1, 0)
        reader.close()


def test_compact_entries_that_cannot_be_true_are_refused_from_the_ring() -> None:
    x = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    moments, vals, ids = moments_and_top(x, 8)
    with RingWriter.create(slots=1, vocab_size=1000, topk=8) as w:
        with w.frame(0) as f:
            f.write_compact(1, 0, moments, vals[::-1].copy(), ids[::-1].copy())  # lowest first
        reader = RingReader(w.name)
        with pytest.raises(RowError, match="highest first"):
            reader.row(0, 0, f.seq, 1, 0)
        reader.close()


def test_a_batch_of_rows_is_read_in_one_pass_with_each_rows_error_in_its_place() -> None:
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=1000).astype(np.float32) for _ in range(3)]
    with RingWriter.create(slots=2, rows=3, vocab_size=1000, topk=16, dtype="bf16") as w:
        with w.frame(1) as f:
            f.write_row(1, 5, xs[0])
            f.write_compact(2, 9, *moments_and_top(xs[1], 16))
            f.write_row(3, 0, xs[2])
        reader = RingReader(w.name)
        got = reader.rows(1, f.seq, [(0, 1, 5), (1, 2, 9), (2, 3, 1)])
        assert callable(got[0])  # a FULL row is read when it is judged
        full = got[0]()
        assert isinstance(full, np.ndarray) and np.allclose(full, xs[0], rtol=1e-2)
        assert isinstance(got[1], CompactRow) and got[1].k == 16  # one COMPACT row: validated on its own
        assert isinstance(got[2], RowError) and "tagged (session_tag=3, step=0)" in str(got[2])
        again = reader.rows(1, f.seq, [(0, 1, 5), (1, 2, 9)])
        w.begin_raw(1)  # the frame is being rewritten: every row not yet read is refused
        with pytest.raises(TornFrameError):
            again[0]()  # type: ignore[operator]
        assert isinstance(again[1], CompactRow)  # read and checked before the rewrite began
        torn = reader.rows(1, f.seq, [(0, 1, 5), (1, 2, 9)])
        assert all(isinstance(t, TornFrameError) for t in torn)
        reader.close()


@pytest.mark.parametrize(
    ("interleaved", "reverse"),
    [(False, False), (False, True), (True, False)],
    ids=["one read of their span, each row a view", "their span asked for in another order: a gather", "far apart: a read each"],
)
def test_the_compact_rows_of_a_frame_are_validated_as_one_batch_with_each_rows_error_in_its_place(
    interleaved: bool, reverse: bool
) -> None:
    rng = np.random.default_rng(3)
    n = VECTORISE_ROWS + 2
    shipped = [moments_and_top(rng.normal(size=1000).astype(np.float32), 16) for _ in range(n)]
    at = [2 * i if interleaved else i for i in range(n)]  # the COMPACT rows' places in the frame
    with RingWriter.create(slots=1, rows=2 * n, vocab_size=1000, topk=16) as w:
        with w.frame(0) as f:
            for i, (m, v, ids) in enumerate(shipped):
                f.write_compact(i + 1, 4, m, v[::-1].copy() if i == 2 else v, ids[::-1].copy() if i == 2 else ids)
                if interleaved:
                    f.write_row(99, 4, rng.normal(size=1000).astype(np.float32))
        reader = RingReader(w.name)
        order = list(reversed(range(n))) if reverse else list(range(n))
        asked = reader.rows(0, f.seq, [(at[i], i + 1, 4) for i in order])
        got = [asked[order.index(i)] for i in range(n)]
        assert isinstance(got[2], RowError) and "highest first" in str(got[2])  # that row alone
        for i, g in enumerate(got):
            if i == 2:
                continue
            assert isinstance(g, BatchedRow) and g.batch.k == 16 and len(g.batch) == n
            single = reader.row(0, at[i], f.seq, i + 1, 4)
            row = g()
            assert isinstance(single, CompactRow) and np.array_equal(row.ids, single.ids) and row.moments == single.moments
        reader.close()


def test_compact_rows_of_two_ks_in_one_frame_are_validated_as_one_batch_per_k() -> None:
    rng = np.random.default_rng(4)
    n = 2 * VECTORISE_ROWS
    ks = [16 if i % 2 else 8 for i in range(n)]  # interleaved, as an engine mixing samplers writes them
    shipped = [moments_and_top(rng.normal(size=1000).astype(np.float32), k) for k in ks]
    with RingWriter.create(slots=1, rows=n, vocab_size=1000, topk=16) as w:
        with w.frame(0) as f:
            for i, (m, v, ids) in enumerate(shipped):
                f.write_compact(i + 1, 4, m, v, ids)
        reader = RingReader(w.name)
        got = reader.rows(0, f.seq, [(i, i + 1, 4) for i in range(n)])
        for i, g in enumerate(got):
            assert isinstance(g, BatchedRow) and g.batch.k == ks[i] and len(g.batch) == n // 2
            single = reader.row(0, i, f.seq, i + 1, 4)
            assert isinstance(single, CompactRow) and np.array_equal(g().ids, single.ids) and g().moments == single.moments
        reader.close()


def test_a_row_descriptor_pointing_outside_the_heap_is_refused(ring: RingWriter) -> None:
    with ring.frame(0) as f:
        f.write_row(1, 0, np.ones(1000, np.float32))
    ring._desc[0, 0]["offset"] = ring.layout.heap_size - 64
    reader = RingReader(ring.name)
    with pytest.raises(RowError, match="breaks the layout"):
        reader.row(0, 0, f.seq, 1, 0)
    reader.close()


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [(8, 1, "layout version 1 is not supported"), (36, 6, "flags 0x6"), (40, 64, "disagree with the layout")],
)
def test_a_header_this_reader_does_not_implement_is_refused(offset: int, value: int, match: str) -> None:
    with RingWriter.create(slots=1, vocab_size=1000) as w:
        buf = w._shm.buf
        width = 8 if offset == 40 else 4
        buf[offset : offset + width] = value.to_bytes(width, "little")
        with pytest.raises(RingLayoutError, match=match):
            RingReader(w.name)


def test_a_re_created_name_is_another_ring() -> None:
    name = f"fse-test-reuse-{os.getpid()}"
    with RingWriter.create(name, slots=1, vocab_size=10) as first:
        a = RingReader(name)
        shared_memory.SharedMemory(name=name).unlink()  # the engine drops the name, keeps its mapping
        with RingWriter.create(name, slots=1, vocab_size=10):
            b = RingReader(name)
            assert a.identity != b.identity
            b.close()
        a.close()
        first._shm = None  # already unlinked


def test_lane_and_compact_room_are_laid_out_as_documented() -> None:
    lay = RingLayout(
        slot_count=2, row_capacity=3, vocab_size=1000, dtype_code=2, topk_capacity=600, lane=True, verdict_capacity=512
    )
    assert lay.heap_offset == 192  # align(16 + 3 * 48)
    assert lay.heap_size == 3 * 4864  # 3 x align(max(2000, 64 + 8 * 600))
    assert lay.lane_offset == 192 + 3 * 4864
    assert lay.slot_stride == 16448  # align(lane_offset + 64 + 16 + 3 * 512)
    with RingWriter.create(slots=2, rows=3, vocab_size=1000, dtype="f16", topk=600, verdict_capacity=512) as w:
        r = RingReader(w.name)
        assert r.layout == lay
        r.close()


def test_bench_ring_times_both_readers_on_the_same_rows() -> None:
    from sidecar.bench.ring import bench_ring

    rows = bench_ring(rounds=2, reps=1)
    assert [(r["vocab"], r["dtype"]) for r in rows] == [(49_152, "f32"), (49_152, "f16"), (128_256, "f32"), (128_256, "f16")]
    for r in rows:
        assert r["row_bytes"] == r["vocab"] * (4 if r["dtype"] == "f32" else 2)
        assert r["pread_us_p50"] > 0 and r["view_us_p50"] > 0 and r["row_stats_us_p50"] > 0


def test_a_ring_is_private_to_its_user_unless_a_group_mode_is_asked_for() -> None:
    with RingWriter.create(slots=1, vocab_size=8) as private:
        assert os.stat(f"/dev/shm/{private.name}").st_mode & 0o777 == 0o600
    with RingWriter.create(slots=1, vocab_size=8, verdict_capacity=64, mode=0o660) as shared:
        assert os.stat(f"/dev/shm/{shared.name}").st_mode & 0o777 == 0o660
    for bad in (0o644, 0o666, 0o200, 0o700):
        with pytest.raises(RingLayoutError, match="ring mode"):
            RingWriter.create(slots=1, vocab_size=8, mode=bad)


def _compact_rows(f, n: int, fill: float = 0.0) -> list[tuple[int, int, int]]:
    """``n`` COMPACT rows into frame ``f``: (row, session_tag, step) of each, as rows() takes them."""
    rng = np.random.default_rng(int(fill))
    return [
        (f.write_compact(i + 1, 4, *moments_and_top(rng.normal(size=1000).astype(np.float32) + fill, 16)), i + 1, 4)
        for i in range(n)
    ]


def _write_batch(w: RingWriter, slot: int, n: int, fill: float = 0.0) -> tuple[int, list[tuple[int, int, int]]]:
    with w.frame(slot) as f:
        wanted = _compact_rows(f, n, fill)
    return f.seq, wanted


def test_a_batch_frame_published_before_it_was_whole_is_refused_for_every_row(monkeypatch) -> None:
    """The seqlock checked before the copy (mutation audit): the head is read while the
    frame is still being written, and the frame is whole again by the check after it."""
    with RingWriter.create(slots=1, rows=4, vocab_size=1000, topk=16) as w:
        frame = w.frame(0)
        wanted = _compact_rows(frame.__enter__(), 4)
        published = int(w._seq[0]) + 1
        reader = RingReader(w.name)
        # the head and descriptors are read mid-frame; the writer finishes right after
        _tear_after_the_copy(reader, monkeypatch, lambda: frame.__exit__(None, None, None), reads=1)
        got = reader.rows(0, published, wanted)
        assert len(got) == 4 and all(isinstance(g, TornFrameError) and "being written" in str(g) for g in got), got
        reader.close()


def test_a_batch_frame_replaced_while_its_rows_are_copied_is_refused_for_every_row(monkeypatch) -> None:
    """The seqlock checked after the copy (mutation audit): a torn batch frame is never judged."""
    with RingWriter.create(slots=1, rows=4, vocab_size=1000, topk=16) as w:
        seq, wanted = _write_batch(w, 0, 4)
        reader = RingReader(w.name)
        # the head is read: the engine writes the next frame into the slot
        _tear_after_the_copy(reader, monkeypatch, lambda: _write_batch(w, 0, 4, fill=5.0), reads=1)
        got = reader.rows(0, seq, wanted)
        assert all(isinstance(g, TornFrameError) and "replaced by a newer frame" in str(g) for g in got), got
        reader.close()


def test_the_engine_takes_a_slots_answers_from_that_slots_verdict_area_only() -> None:
    """Mutation audit: answers written for the same frame seq into another slot's verdict
    area are never this slot's."""
    with RingWriter.create(slots=2, vocab_size=1000, verdict_capacity=256) as w:
        reader = RingReader(w.name)
        reader.open_lane()
        w.submit(0, 6, 1, 0)
        reader.write_verdicts(1, 6, [b"slot one's answer"])  # the other slot, the same seq
        assert w.verdicts(0, 6) is None
        reader.write_verdicts(0, 6, [b"slot zero's answer"])
        assert w.verdicts(0, 6) == ([b"slot zero's answer"], 0)
        reader.close()


class _RewrittenWhileCopied(bytearray):
    """A slot's lane area whose verdict seq changes (the sidecar starts another write) the
    moment an answer's bytes are copied out of it."""

    def __getitem__(self, key):  # type: ignore[override]
        got = super().__getitem__(key)
        if isinstance(key, slice) and key.start is not None and key.start >= LANE_REQUEST + LANE_VERDICT_HEAD + 4:
            self[LANE_REQUEST : LANE_REQUEST + 8] = (7).to_bytes(8, "little")  # odd: being rewritten
        return got


def test_the_engine_refuses_answers_whose_verdict_area_changed_while_they_were_copied(monkeypatch) -> None:
    """Mutation audit: the verdict area's seq is checked again after the copy."""
    with RingWriter.create(slots=1, vocab_size=1000, verdict_capacity=256) as w:
        reader = RingReader(w.name)
        reader.open_lane()
        w.submit(0, 6, 1, 0)
        reader.write_verdicts(0, 6, [b"an answer"])
        assert w.verdicts(0, 6) == ([b"an answer"], 0)
        racing = _RewrittenWhileCopied(w._lane(0))
        monkeypatch.setattr(w, "_lane", lambda slot: racing)
        assert w.verdicts(0, 6) is None
        reader.close()
