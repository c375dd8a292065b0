// A reference engine client for the fse.v1 protocol, written from proto/fse/v1
// (PROTOCOL.md, VERDICT.md, RING.md) and checked against proto/fse/v1/vectors.json.
//
// What an engine needs: register its vocabulary, open a session with a shared-memory
// ring, write each step's logits row into the ring, ask for a verdict over the Steps
// stream, and force the verdict's token only after checkVerdict() accepts it.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");

// ---------------------------------------------------------------------------------------
// Canonical encoding (VERDICT.md "Encoding"): little-endian fixed width, one NaN, and
// u32-length-prefixed strings and blobs. 64-bit integers are BigInt-safe.

function u32(v) {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(Number(v));
  return b;
}

function u64(v) {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
}

function i64(v) {
  const b = Buffer.alloc(8);
  b.writeBigInt64LE(BigInt(v));
  return b;
}

const CANONICAL_NAN = Buffer.from("000000000000f87f", "hex");

function f64(v) {
  if (Number.isNaN(v)) return Buffer.from(CANONICAL_NAN);
  const b = Buffer.alloc(8);
  b.writeDoubleLE(v);
  return b;
}

function blob(bytes) {
  const b = Buffer.from(bytes);
  return Buffer.concat([u32(b.length), b]);
}

function str(s) {
  return blob(Buffer.from(s, "utf8"));
}

const sha256 = (...parts) => crypto.createHash("sha256").update(Buffer.concat(parts)).digest();

// PROTOCOL.md "Vocabulary digest": count, then each token's length and bytes.
function vocabDigest(tokens) {
  const h = crypto.createHash("sha256").update(u32(tokens.length));
  for (const t of tokens) h.update(u32(t.length)).update(t);
  return h.digest("hex");
}

// VERDICT.md "Genesis": the effective sampling parameters (unset top_p and
// repetition_penalty are 1, an unset repetition_window is 64).
function samplingBytes(p) {
  const or = (v, d) => (v === undefined || v === null ? d : v);
  return Buffer.concat([
    f64(or(p.temperature, 0)),
    u32(or(p.top_k, 0)),
    f64(or(p.top_p, 1)),
    f64(or(p.min_p, 0)),
    f64(or(p.repetition_penalty, 1)),
    u32(or(p.repetition_window, 64)),
    u64(or(p.seed, 0)),
  ]);
}

function genesis(o) {
  return sha256(
    Buffer.from("fse.v1.genesis"),
    str(o.session_id),
    blob(o.opening_nonce),
    blob(o.sampling_bytes),
    str(o.policy_digest),
    str(o.vocab_digest),
    str(o.model_id),
    str(o.key_id),
  );
}

function reasonBytes(r) {
  return Buffer.concat([
    str(r.code),
    f64(r.value),
    f64(r.threshold),
    u32(r.sampler),
    str(r.detail),
    u32(r.action),
    i64(r.token_id),
    u64(r.span_start),
    u64(r.span_end),
  ]);
}

const reasonsBytes = (reasons) => Buffer.concat([u32(reasons.length), ...reasons.map(reasonBytes)]);

const proposalsBytes = (proposals) =>
  Buffer.concat([u32(proposals.length), ...proposals.map((p) => Buffer.concat([i64(p.token_id), u32(p.sampler), u32(p.reasons)]))]);

// VERDICT.md "Audit frame and chain".
function frameBytes(v) {
  return Buffer.concat([
    Buffer.from("fse.v1.frame"),
    str(v.session_id),
    u64(v.step),
    i64(v.token_id),
    u32(v.decision),
    u32(v.sampler),
    proposalsBytes(v.proposals),
    sha256(reasonsBytes(v.reasons)),
  ]);
}

const chainNext = (prev, frame) => sha256(prev, frame);

const ZERO_METRICS = {
  entropy_nats: 0, neg_logprob_nats: 0, rank: 0, margin: 0, selected_prob: 0, max_prob: 0,
  logit_variance: 0, l2_norm: 0, varentropy: 0, running_ppl: 0,
};
const ZERO_STREAM = { band: 0, pending: 0, risk: 0, window_neg_logprob_nats: 0, window_entropy_nats: 0, window_ppl: 0, e_value: 0 };

// VERDICT.md "Signed bytes of a Verdict". An absent metrics or stream message encodes as zeros.
function verdictBytes(v) {
  const m = v.metrics || ZERO_METRICS;
  const s = v.stream || ZERO_STREAM;
  return Buffer.concat([
    Buffer.from("fse.v1.verdict"),
    str(v.session_id),
    u64(v.step),
    u32(v.decision),
    i64(v.token_id),
    u32(v.sampler),
    u32(v.reasons.length),
    ...v.reasons.map(reasonBytes),
    f64(m.entropy_nats), f64(m.neg_logprob_nats), u64(m.rank), f64(m.margin), f64(m.selected_prob),
    f64(m.max_prob), f64(m.logit_variance), f64(m.l2_norm), f64(m.varentropy), f64(m.running_ppl),
    u32(v.band),
    blob(v.prev_chain_hash),
    blob(v.chain_hash),
    str(v.key_id),
    str(v.policy_digest),
    u32(s.band), u32(s.pending), f64(s.risk), f64(s.window_neg_logprob_nats), f64(s.window_entropy_nats),
    f64(s.window_ppl), f64(s.e_value),
    proposalsBytes(v.proposals),
  ]);
}

// VERDICT.md "Receipt".
function receiptBytes(r) {
  return Buffer.concat([
    Buffer.from("fse.v1.receipt"),
    str(r.session_id),
    blob(r.genesis_hash),
    blob(r.chain_hash),
    u64(r.steps), u64(r.accepted), u64(r.healed), u64(r.aborted),
    u64(r.first_timestamp_ns), u64(r.last_timestamp_ns),
    str(r.policy_digest),
    str(r.key_id),
  ]);
}

// ---------------------------------------------------------------------------------------
// Keys (VERDICT.md "Keys"): an Ed25519 public key, or a shared HMAC-SHA256 secret.

class Ed25519Key {
  constructor(publicKey) {
    this.publicKey = publicKey; // a node:crypto KeyObject
    const raw = Buffer.from(publicKey.export({ format: "jwk" }).x, "base64url");
    this.keyId = sha256(raw).subarray(0, 8).toString("hex");
  }
  static fromRaw(raw) {
    return new Ed25519Key(crypto.createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: Buffer.from(raw).toString("base64url") }, format: "jwk" }));
  }
  verify(data, signature) {
    return crypto.verify(null, data, this.publicKey, Buffer.from(signature));
  }
}

class HmacKey {
  constructor(secret) {
    if (secret.length < 32) throw new Error(`an HMAC secret needs at least 32 bytes, got ${secret.length}`);
    this.secret = Buffer.from(secret);
    this.keyId = sha256(Buffer.from("fse.v1.hmac-key-id"), this.secret).subarray(0, 8).toString("hex");
  }
  verify(data, signature) {
    const want = crypto.createHmac("sha256", this.secret).update(data).digest();
    const got = Buffer.from(signature);
    return got.length === want.length && crypto.timingSafeEqual(got, want);
  }
}

const HMAC_HEADER = "FSE-HMAC-SHA256 ";

// A key file as `fse-sidecar keygen` writes it: a PEM Ed25519 public key or an HMAC secret.
function loadKey(file) {
  const text = fs.readFileSync(file, "utf8");
  if (text.startsWith(HMAC_HEADER)) return new HmacKey(Buffer.from(text.slice(HMAC_HEADER.length).trim(), "hex"));
  return new Ed25519Key(crypto.createPublicKey(text));
}

class TrustedKeys {
  constructor(keys) {
    this.byId = new Map(keys.map((k) => [k.keyId, k]));
  }
  verify(keyId, data, signature) {
    const k = this.byId.get(keyId);
    return k !== undefined && k.verify(data, signature);
  }
}

// ---------------------------------------------------------------------------------------
// The adapter's checks (VERDICT.md "What an adapter checks"), in the documented order.

const DECISION = { ACCEPT: 1, HEALED: 2, ABORT: 3 };

class VerdictRejected extends Error {
  constructor(message, check) {
    super(message);
    this.name = "VerdictRejected";
    this.check = check;
  }
}

class GuardAbort extends Error {
  constructor(message, reasons) {
    super(message);
    this.name = "GuardAbort";
    this.reasons = reasons;
  }
}

class StepRefused extends Error {
  constructor(message, code) {
    super(message);
    this.name = "StepRefused";
    this.code = code;
  }
}

// `resp`: a decoded StepResponse (bytes as Buffers, 64-bit integers as strings or numbers,
// enums as numbers). `expect`: {session_id, step, prev_chain_hash, policy_digest, vocab_size}.
// Returns the verdict whose token_id may be forced, or throws.
function checkVerdict(resp, expect, trusted) {
  const step = expect.step;
  if (resp.error) throw new StepRefused(`step ${step} refused: code ${resp.error.code}: ${resp.error.message}`, resp.error.code);
  const v = resp.verdict;
  if (!v) throw new VerdictRejected(`step ${step}: the answer holds neither a verdict nor an error`, "signature");
  if (!trusted.byId.has(v.key_id)) throw new VerdictRejected(`step ${step}: key ${v.key_id} is not trusted`, "key");
  if (!trusted.verify(v.key_id, verdictBytes(v), v.signature)) throw new VerdictRejected(`step ${step}: bad signature`, "signature");
  if (v.session_id !== expect.session_id) throw new VerdictRejected(`step ${step}: verdict for session ${v.session_id}`, "session");
  if (BigInt(v.step) !== BigInt(step)) throw new VerdictRejected(`verdict for step ${v.step}, expected ${step}`, "step");
  if (v.policy_digest !== expect.policy_digest) throw new VerdictRejected(`step ${step}: another policy`, "policy");
  if (!Buffer.from(v.prev_chain_hash).equals(expect.prev_chain_hash)) throw new VerdictRejected(`step ${step}: does not link`, "link");
  if (!chainNext(expect.prev_chain_hash, frameBytes(v)).equals(Buffer.from(v.chain_hash))) {
    throw new VerdictRejected(`step ${step}: chain hash is not of its frame`, "chain");
  }
  if (v.decision === DECISION.ABORT) throw new GuardAbort(`step ${step}: ABORT (${v.reasons.map((r) => r.code).join(", ")})`, v.reasons);
  if (v.decision !== DECISION.ACCEPT && v.decision !== DECISION.HEALED) throw new VerdictRejected(`step ${step}: decision ${v.decision}`, "decision");
  const token = Number(v.token_id);
  if (token < 0 || (expect.vocab_size && token >= expect.vocab_size)) throw new VerdictRejected(`step ${step}: token ${token} outside the vocabulary`, "token");
  return v;
}

// ---------------------------------------------------------------------------------------
// The ring (RING.md), written with positioned writes on /dev/shm/<name>: no mapping needed.

const MAGIC = Buffer.from("FSERING\0", "latin1");
const HEADER_SIZE = 256;
const SLOT_HEAD = 16;
const DESCRIPTOR = 48;
const align = (n) => Math.ceil(n / 64) * 64;
const DTYPE_CODE = { f32: 1, f16: 2, bf16: 3 };

function ringLayout({ slots, rows = 1, vocabSize, dtype = "f32", verdictCapacity = 0 }) {
  const itemsize = dtype === "f32" ? 4 : 2;
  const fullSize = vocabSize * itemsize;
  const heapOffset = align(SLOT_HEAD + DESCRIPTOR * rows);
  const heapSize = rows * align(Math.max(fullSize, 64)); // topk_capacity 0: COMPACT size is 64
  const laneOffset = verdictCapacity ? align(heapOffset + heapSize) : 0;
  const slotStride = verdictCapacity ? align(laneOffset + 64 + 16 + rows * verdictCapacity) : align(heapOffset + heapSize);
  return { slots, rows, vocabSize, dtype, itemsize, fullSize, heapOffset, heapSize, laneOffset, verdictCapacity, slotStride, totalSize: HEADER_SIZE + slots * slotStride };
}

class RingWriter {
  constructor(name, layout) {
    if (!/^[A-Za-z0-9._-]{1,200}$/.test(name)) throw new Error(`ring name ${name} must match [A-Za-z0-9._-]{1,200}`);
    this.name = name;
    this.layout = layout;
    this.file = path.join("/dev/shm", name);
    // 0600: only this user (and the sidecar, when it runs as the same user) can read it.
    this.fd = fs.openSync(this.file, "wx+", 0o600);
    fs.ftruncateSync(this.fd, layout.totalSize);
    this.seq = new Array(layout.slots).fill(0n);
    const h = Buffer.alloc(HEADER_SIZE);
    MAGIC.copy(h, 0);
    h.writeUInt32LE(2, 8); // layout version
    h.writeUInt32LE(HEADER_SIZE, 12);
    h.writeUInt32LE(layout.slots, 16);
    h.writeUInt32LE(layout.rows, 20);
    h.writeUInt32LE(layout.vocabSize, 24);
    h.writeUInt32LE(DTYPE_CODE[layout.dtype], 28);
    h.writeUInt32LE(0, 32); // topk_capacity
    h.writeUInt32LE(layout.verdictCapacity ? 1 : 0, 36); // flags: LANE
    h.writeBigUInt64LE(BigInt(layout.slotStride), 40);
    h.writeBigUInt64LE(BigInt(layout.heapOffset), 48);
    h.writeBigUInt64LE(BigInt(layout.heapSize), 56);
    h.writeBigUInt64LE(BigInt(layout.laneOffset), 64);
    h.writeUInt32LE(layout.verdictCapacity, 72);
    h.writeUInt32LE(process.pid, 76); // informational
    crypto.randomBytes(16).copy(h, 80); // ring_id, informational
    fs.writeSync(this.fd, h, 0, HEADER_SIZE, 0);
  }

  static create(name, options) {
    return new RingWriter(name, ringLayout(options));
  }

  // One frame of one FULL f32 row in `slot` under the seqlock; returns the even seq to publish.
  writeFrame(slot, sessionTag, step, logits) {
    const lay = this.layout;
    if (logits.length !== lay.vocabSize) throw new Error(`a row of ${logits.length} logits, the ring holds ${lay.vocabSize}`);
    const base = HEADER_SIZE + slot * lay.slotStride;
    let seq = this.seq[slot];
    if (seq % 2n) seq += 1n;
    fs.writeSync(this.fd, u64(seq + 1n), 0, 8, base); // odd: being written
    const payload = Buffer.from(Float32Array.from(logits).buffer);
    fs.writeSync(this.fd, payload, 0, payload.length, base + lay.heapOffset);
    const d = Buffer.concat([u64(sessionTag), u64(step), u32(1), u32(lay.vocabSize), u64(0), u64(lay.fullSize), u64(0)]);
    fs.writeSync(this.fd, d, 0, DESCRIPTOR, base + SLOT_HEAD);
    fs.writeSync(this.fd, u32(1), 0, 4, base + 8); // n_rows
    this.seq[slot] = seq + 2n;
    fs.writeSync(this.fd, u64(seq + 2n), 0, 8, base); // even: whole
    return seq + 2n;
  }

  close() {
    if (this.fd !== null) {
      fs.closeSync(this.fd);
      fs.rmSync(this.file, { force: true });
      this.fd = null;
    }
  }
}

module.exports = {
  u32, u64, i64, f64, blob, str,
  vocabDigest, samplingBytes, genesis,
  reasonBytes, reasonsBytes, proposalsBytes, frameBytes, chainNext, verdictBytes, receiptBytes,
  Ed25519Key, HmacKey, TrustedKeys, loadKey,
  checkVerdict, VerdictRejected, GuardAbort, StepRefused,
  ringLayout, RingWriter, HEADER_SIZE,
};
