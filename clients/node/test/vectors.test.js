// The Node.js implementation against proto/fse/v1/vectors.json (run: npm test).
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const crypto = require("node:crypto");
const protobuf = require("protobufjs");
const fse = require("../fse");

const PROTO = path.join(__dirname, "..", "..", "..", "proto");
const V = JSON.parse(fs.readFileSync(path.join(PROTO, "fse", "v1", "vectors.json"), "utf8"));
const root = new protobuf.Root().loadSync(path.join(PROTO, "fse", "v1", "guard.proto"), { keepCase: true });
const AS = { longs: String, enums: Number, defaults: true, oneofs: true };
const decode = (type, hex) => {
  const T = root.lookupType(type);
  return T.toObject(T.decode(Buffer.from(hex, "hex")), AS);
};
const hex = (b) => Buffer.from(b).toString("hex");
const num = (x) => ({ NaN: NaN, Infinity: Infinity, "-Infinity": -Infinity })[x] ?? x;

test("primitives", () => {
  for (const c of V.primitives) {
    const enc = {
      u32: () => fse.u32(c.value),
      u64: () => fse.u64(c.value),
      i64: () => fse.i64(c.value),
      f64: () => fse.f64(c.value === "-0.0" ? -0 : Number(num(c.value))),
      str: () => fse.str(c.value),
      blob: () => fse.blob(Buffer.from(c.value_hex, "hex")),
    }[c.type];
    assert.equal(hex(enc()), c.hex, `${c.type} ${c.value}`);
  }
});

test("vocabulary digests", () => {
  for (const c of V.vocabulary_digests) {
    assert.equal(fse.vocabDigest(c.tokens_hex.map((t) => Buffer.from(t, "hex"))), c.digest);
  }
});

test("genesis", () => {
  for (const c of V.genesis) {
    const sb = fse.samplingBytes(c.sampling);
    assert.equal(hex(sb), c.sampling_bytes_hex);
    const g = fse.genesis({ ...c, opening_nonce: Buffer.from(c.opening_nonce_hex, "hex"), sampling_bytes: sb });
    assert.equal(hex(g), c.genesis_hex);
  }
});

test("frames and the chain", () => {
  for (const c of V.frames) {
    const reasons = c.reasons.map((r) => ({ ...r, value: num(r.value), threshold: num(r.threshold) }));
    reasons.forEach((r, i) => assert.equal(hex(fse.reasonBytes(r)), c.reasons[i].reason_bytes_hex));
    assert.equal(hex(fse.proposalsBytes(c.proposals)), c.proposals_bytes_hex);
    assert.equal(hex(fse.reasonsBytes(reasons)), c.reasons_bytes_hex);
    const frame = fse.frameBytes({ ...c, reasons });
    assert.equal(hex(frame), c.frame_bytes_hex);
    assert.equal(hex(fse.chainNext(Buffer.from(c.prev_chain_hash_hex, "hex"), frame)), c.chain_hash_hex);
  }
});

function trusted() {
  const k = V.keys;
  const seed = Buffer.from(k.ed25519.private_seed_hex, "hex");
  // The public key from the published test seed (PKCS#8 prefix for a raw Ed25519 seed).
  const priv = crypto.createPrivateKey({ key: Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), seed]), format: "der", type: "pkcs8" });
  const ed = new fse.Ed25519Key(crypto.createPublicKey(priv));
  assert.equal(hex(Buffer.from(ed.publicKey.export({ format: "jwk" }).x, "base64url")), k.ed25519.public_hex);
  const hm = new fse.HmacKey(Buffer.from(k.hmac_sha256.secret_hex, "hex"));
  assert.equal(ed.keyId, k.ed25519.key_id);
  assert.equal(hm.keyId, k.hmac_sha256.key_id);
  return new fse.TrustedKeys([ed, hm]);
}

test("verdicts: accepted, stopped or rejected by the named check", () => {
  const keys = trusted();
  for (const c of V.verdicts) {
    const resp = decode("fse.v1.StepResponse", c.step_response_hex);
    assert.equal(hex(fse.verdictBytes(resp.verdict)), c.signed_bytes_hex, c.name);
    const e = c.expect;
    const expect = { ...e, prev_chain_hash: Buffer.from(e.prev_chain_hash_hex, "hex") };
    if (c.outcome === "accept") {
      assert.equal(Number(fse.checkVerdict(resp, expect, keys).token_id), c.token_id, c.name);
    } else if (c.outcome === "abort") {
      assert.throws(() => fse.checkVerdict(resp, expect, keys), fse.GuardAbort, c.name);
    } else {
      assert.throws(() => fse.checkVerdict(resp, expect, keys), (err) => err instanceof fse.VerdictRejected && err.check === c.check, c.name);
    }
  }
});

test("receipts", () => {
  const keys = trusted();
  for (const c of V.receipts) {
    const r = decode("fse.v1.Receipt", c.receipt_hex);
    const bytes = fse.receiptBytes(r);
    assert.equal(hex(bytes), c.receipt_bytes_hex);
    assert.ok(keys.verify(r.key_id, bytes, r.signature));
    assert.ok(!keys.verify(r.key_id, fse.receiptBytes({ ...r, steps: "5", accepted: "3" }), r.signature));
  }
});

test("the ring writer writes the vector segment, byte for byte", () => {
  const lay = V.ring.layout;
  const fr = V.ring.frame;
  const ring = fse.RingWriter.create(`fse-node-vec-${process.pid}`, { slots: lay.slot_count, rows: lay.row_capacity, vocabSize: lay.vocab_size });
  try {
    assert.equal(ring.layout.slotStride, lay.slot_stride);
    assert.equal(ring.layout.totalSize, lay.total_size);
    const seq = ring.writeFrame(fr.slot, fr.session_tag, fr.step, fr.logits);
    assert.equal(Number(seq), fr.seq);
    const got = fs.readFileSync(ring.file);
    const [a, b] = V.ring.masked_header_bytes;
    got.fill(0, a, b);
    assert.equal(hex(got), V.ring.cases[0].segment_hex);
  } finally {
    ring.close();
  }
  const ll = V.ring.lane_layout;
  const lane = fse.ringLayout({ slots: 2, vocabSize: 8, verdictCapacity: ll.verdict_capacity });
  assert.deepEqual([lane.slotStride, lane.laneOffset, lane.totalSize], [ll.slot_stride, ll.lane_offset, ll.total_size]);
});
