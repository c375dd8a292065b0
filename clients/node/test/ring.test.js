// The ring writer's seqlock (proto/fse/v1/RING.md "Seqlock protocol"), observed write by write.
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const fse = require("../fse");

test("a frame is written under the seqlock: seq odd before anything else of the slot, even after", (t) => {
  const ring = fse.RingWriter.create(`fse-node-seqlock-${process.pid}`, { slots: 2, vocabSize: 8 });
  t.after(() => ring.close());
  const slot = 1;
  const base = fse.HEADER_SIZE + slot * ring.layout.slotStride;
  const writes = []; // [offset, first 8 bytes as u64] of every write to the slot
  const real = fs.writeSync;
  fs.writeSync = (fd, buf, off, len, pos) => {
    if (fd === ring.fd && pos >= base && pos < base + ring.layout.slotStride) {
      writes.push([pos - base, len >= 8 ? buf.readBigUInt64LE(off) : null]);
    }
    return real(fd, buf, off, len, pos);
  };
  let seqs;
  try {
    seqs = [1, 2, 3].map((step) => ring.writeFrame(slot, 7n, step, new Array(8).fill(0.5)));
  } finally {
    fs.writeSync = real;
  }
  assert.deepEqual(seqs, [2n, 4n, 6n]);
  // per frame: the seq made odd first, then payload, descriptor and n_rows, then the even seq
  for (let f = 0; f < 3; f++) {
    const frame = writes.slice(f * 5, f * 5 + 5);
    assert.deepEqual(frame[0], [0, seqs[f] - 1n], `frame ${f}: the first write is the odd seq`);
    assert.ok(frame.slice(1, 4).every(([o]) => o !== 0), `frame ${f}: nothing else touches the seq`);
    assert.deepEqual(frame[4], [0, seqs[f]], `frame ${f}: the last write is the even seq`);
  }
  assert.equal(writes.length, 15);
});
