#!/usr/bin/env node
// A guarded session from Node.js: the example engine developers copy.
//
//   node example.js --target unix:/tmp/fse-sidecar.sock --key fse_signing.pub [--steps 16]
//
// It registers a synthetic vocabulary, opens a session with a shared-memory ring, and for
// each step writes a logits row into the ring, asks for the verdict over the Steps stream
// and forces the verdict's token only after checkVerdict() accepts it. Then it shows that
// a tampered verdict is refused, closes the session and checks the signed receipt.
// It prints one JSON object; any failure exits non-zero (fail closed: no token).
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const fse = require("./fse");

const PROTO = path.join(__dirname, "..", "..", "proto", "fse", "v1", "guard.proto");
const STEP_TIMEOUT_MS = 2000;

function args(argv) {
  const out = { steps: 16 };
  for (let i = 2; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  if (!out.target || !out.key) throw new Error("usage: node example.js --target unix:/path.sock --key PUBLIC_KEY_FILE [--steps N]");
  out.steps = Number(out.steps);
  return out;
}

const unary = (client, method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 10_000 }, (err, resp) => (err ? reject(err) : resolve(resp))),
  );

// The Steps stream as request/response pairs, each with its own deadline.
class Steps {
  constructor(client) {
    this.call = client.Steps();
    this.waiting = [];
    this.call.on("data", (m) => this.waiting.shift()?.resolve(m.response));
    this.call.on("error", (e) => this.fail(e));
    this.call.on("end", () => this.fail(new Error("the sidecar closed the stream")));
  }
  fail(err) {
    for (const w of this.waiting.splice(0)) w.reject(err);
  }
  ask(request) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no verdict within ${STEP_TIMEOUT_MS} ms`)), STEP_TIMEOUT_MS);
      this.waiting.push({
        resolve: (r) => (clearTimeout(timer), resolve(r)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
      this.call.write({ request });
    });
  }
  end() {
    this.call.end();
  }
}

// A row peaked at `top`: greedy decoding must pick it.
function peakedRow(vocabSize, top, rng) {
  const row = new Float32Array(vocabSize);
  for (let i = 0; i < vocabSize; i++) row[i] = (rng() - 0.5) * 2;
  row[top] = 12;
  return row;
}

async function main() {
  const opt = args(process.argv);
  const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: String, enums: Number, defaults: true, oneofs: true });
  const { GuardService } = grpc.loadPackageDefinition(def).fse.v1;
  const client = new GuardService(opt.target, grpc.credentials.createInsecure());
  const trusted = new fse.TrustedKeys([fse.loadKey(opt.key)]);

  const vocab = Array.from({ length: 64 }, (_, i) => Buffer.from(` w${i}`));
  const reg = await unary(client, "RegisterVocabulary", { tokens: vocab });
  if (reg.vocab_digest !== fse.vocabDigest(vocab)) throw new Error("the sidecar registered another vocabulary");

  const ring = fse.RingWriter.create(`fse-node-${process.pid}-${crypto.randomBytes(4).toString("hex")}`, { slots: 2, vocabSize: vocab.length });
  const out = { steps: 0, tokens: [], decisions: [], forged: null, receipt: null };
  try {
    const sessionId = `node-${crypto.randomBytes(6).toString("hex")}`;
    const sampling = { temperature: 0 }; // greedy; the rest unset: their documented defaults
    const opened = await unary(client, "OpenSession", {
      session_id: sessionId, vocab_digest: reg.vocab_digest, sampling, ring_name: ring.name, model_id: "node-example",
    });
    if (!trusted.byId.has(opened.key_id)) throw new Error(`the sidecar signs with key ${opened.key_id}, not a trusted one`);
    const g = fse.genesis({
      session_id: sessionId, opening_nonce: opened.opening_nonce, sampling_bytes: fse.samplingBytes(sampling),
      policy_digest: opened.policy_digest, vocab_digest: reg.vocab_digest, model_id: "node-example", key_id: opened.key_id,
    });
    if (!g.equals(opened.genesis_hash)) throw new Error("the genesis does not bind what was asked for");

    const steps = new Steps(client);
    let prev = g;
    let last = null;
    let seed = 7;
    const rng = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
    for (let step = 0; step < opt.steps; step++) {
      const slot = step % 2;
      const top = (step * 7 + 3) % vocab.length;
      const seq = ring.writeFrame(slot, opened.session_tag, step, peakedRow(vocab.length, top, rng));
      const resp = await steps.ask({
        session_id: sessionId, session_secret: opened.session_secret, step, ring: { slot, row: 0, seq: seq.toString() },
      });
      const expect = { session_id: sessionId, step, prev_chain_hash: prev, policy_digest: opened.policy_digest, vocab_size: vocab.length };
      const v = fse.checkVerdict(resp, expect, trusted); // throws unless the token may be forced
      out.tokens.push(Number(v.token_id)); // "force" it: this engine emits exactly this token
      out.decisions.push(v.decision);
      prev = Buffer.from(v.chain_hash);
      last = { resp, expect };
      out.steps += 1;
    }
    steps.end();

    // A verdict changed on its way (one bit of its token) is refused, never forced.
    const forged = structuredClone(last.resp);
    forged.verdict.token_id = String(Number(forged.verdict.token_id) ^ 1);
    try {
      fse.checkVerdict(forged, last.expect, trusted);
      throw new Error("a tampered verdict was accepted");
    } catch (err) {
      if (!(err instanceof fse.VerdictRejected)) throw err;
      out.forged = err.check;
    }

    const closed = await unary(client, "CloseSession", { session_id: sessionId, session_secret: opened.session_secret });
    const r = closed.receipt;
    if (!trusted.verify(r.key_id, fse.receiptBytes(r), r.signature)) throw new Error("the receipt's signature does not verify");
    if (r.session_id !== sessionId || !Buffer.from(r.genesis_hash).equals(g) || !Buffer.from(r.chain_hash).equals(prev) || Number(r.steps) !== out.steps) {
      throw new Error("the receipt does not match the verdicts this engine verified");
    }
    out.receipt = "verified";
  } finally {
    ring.close();
    client.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`fse example: ${err.stack || err}\n`);
  process.exit(1);
});
