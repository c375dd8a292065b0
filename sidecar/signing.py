"""Verdict signatures over a canonical encoding (never the protobuf bytes).

Two schemes (DESIGN §2), chosen by the key file the sidecar is given:

- **Ed25519** (default): ``fse-sidecar keygen`` writes a PEM private key (PKCS#8, mode
  0600) for the sidecar and a PEM public key for the adapters. An adapter holding only
  the public key cannot forge verdicts.
- **HMAC-SHA256**: ``fse-sidecar keygen --algorithm hmac-sha256`` writes one secret
  (mode 0600) that both sides hold. Measured here per verdict, canonical encoding
  included: signing ~4 µs against ~23 µs, checking ~4 µs against ~67 µs for Ed25519. For
  deployments where the engine is as trusted as the sidecar.

There is no default key, and key material is never logged; only a ``key_id`` (8 bytes of
SHA-256, hex: over the raw public key, or over a domain tag and the secret) appears in
verdicts and logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._pb.fse.v1 import guard_pb2 as pb
from .core import canonical as cb
from .core.chain import ProposalLike, ReasonLike, Tally, proposals_bytes, reason_bytes, receipt_bytes
from .errors import SigningKeyError

ALGORITHMS = ("ed25519", "hmac-sha256")
PRIVATE_NAME = "fse_signing.key"
PUBLIC_NAME = "fse_signing.pub"
HMAC_NAME = "fse_hmac.key"
HMAC_HEADER = b"FSE-HMAC-SHA256 "
KEYGEN_HINT = "make a key pair with: fse-sidecar keygen --out DIR (then set signing_key_file: DIR/fse_signing.key)"


# u32 band after the ten metrics; rank is the u64 between neg_logprob and margin.
_METRICS = struct.Struct("<ddQdddddddI")
# StreamState: u32 band | u32 pending | f64 risk, window -log p, window entropy, window PPL, e-value
_STREAM = struct.Struct("<IIddddd")


_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<QIqII")  # u64 step | u32 decision | i64 token_id | u32 sampler | u32 reasons


# The verdict's TokenMetrics / StreamState float fields, in the order verdict_fields_bytes takes them.
VERDICT_METRIC_FIELDS = (
    "entropy_nats",
    "neg_logprob_nats",
    "margin",
    "selected_prob",
    "max_prob",
    "logit_variance",
    "l2_norm",
    "varentropy",
    "running_ppl",
)
VERDICT_STREAM_FIELDS = ("risk", "window_neg_logprob_nats", "window_entropy_nats", "window_ppl", "e_value")


def verdict_bytes(v: pb.Verdict) -> bytes:
    """Canonical encoding of Verdict fields 1-11, 13, 14 and 15 (see proto/fse/v1/VERDICT.md):
    :func:`verdict_fields_bytes` of the message's fields (the engine's check)."""
    m, st = v.metrics, v.stream
    return verdict_fields_bytes(
        v.session_id,
        v.step,
        v.decision,
        v.token_id,
        v.sampler,
        v.reasons,
        [getattr(m, name) for name in VERDICT_METRIC_FIELDS],
        m.rank,
        v.band,
        v.prev_chain_hash,
        v.chain_hash,
        v.key_id,
        v.policy_digest,
        st.band,
        st.pending,
        [getattr(st, name) for name in VERDICT_STREAM_FIELDS],
        v.proposals,
    )


def verdict_fields_bytes(
    session_id: str,
    step: int,
    decision: int,
    token_id: int,
    sampler: int,
    reasons: Sequence[ReasonLike],
    metrics: Sequence[float],
    rank: int,
    band: int,
    prev_chain_hash: bytes,
    chain_hash: bytes,
    key_id: str,
    policy_digest: str,
    stream_band: int,
    stream_pending: int,
    stream: Sequence[float],
    proposals: Sequence[ProposalLike],
) -> bytes:
    """The canonical verdict bytes from the fields' values: what the sidecar signs as it
    builds a verdict (no message read back) and what :func:`verdict_bytes` reads out of
    one. ``metrics``: entropy, -log p, margin, selected prob, max prob, logit variance,
    L2 norm, varentropy, running PPL; ``stream``: risk, window -log p, window entropy,
    window PPL, e-value. Written flat, one pack per fixed run."""
    floats = [*metrics, *stream]
    total = sum(floats)
    if total != total:  # a NaN somewhere (or inf - inf): write every NaN as the one canonical NaN
        floats = [cb.canonical_float(x) for x in floats]
    entropy, nlp, margin, prob, max_prob, var, l2, varent, ppl, risk, w_nlp, w_ent, w_ppl, e_value = floats
    sid, kid, policy = session_id.encode(), key_id.encode(), policy_digest.encode()
    parts = [b"fse.v1.verdict", _U32.pack(len(sid)), sid, _HEAD.pack(step, decision, token_id, sampler, len(reasons))]
    if reasons:
        parts += [reason_bytes(r) for r in reasons]
    parts += [
        _METRICS.pack(entropy, nlp, rank, margin, prob, max_prob, var, l2, varent, ppl, band),
        _U32.pack(len(prev_chain_hash)),
        prev_chain_hash,
        _U32.pack(len(chain_hash)),
        chain_hash,
        _U32.pack(len(kid)),
        kid,
        _U32.pack(len(policy)),
        policy,
        _STREAM.pack(stream_band, stream_pending, risk, w_nlp, w_ent, w_ppl, e_value),
        proposals_bytes(proposals),
    ]
    return b"".join(parts)


SEAL_DIGEST_BYTES = 32
_NO_VERDICT = bytes(SEAL_DIGEST_BYTES)  # a seal's entry for a row answered with an error


def verdict_digest(v: pb.Verdict) -> bytes:
    """SHA-256 of a verdict's signed bytes: what a batch seal holds for its row."""
    return hashlib.sha256(verdict_bytes(v)).digest()


def seal_digests(digests: Sequence[bytes | None]) -> bytes:
    """Each row's :func:`verdict_digest` in order, 32 zero bytes for a row answered with
    an error (None) (VERDICT.md "Batch seal")."""
    return b"".join([_NO_VERDICT if d is None else d for d in digests])


def sealed_digest(seal: pb.BatchSeal, row: int) -> bytes:
    """The seal's digest for response row ``row``."""
    return seal.digests[row * SEAL_DIGEST_BYTES : (row + 1) * SEAL_DIGEST_BYTES]


def seal_bytes(key_id: str, rows: int, digests: bytes) -> bytes:
    """ "fse.v1.seal" | str key_id | u32 rows | blob digests: what a batch seal signs."""
    return b"".join([b"fse.v1.seal", cb.string(key_id), cb.u32(rows), cb.blob(digests)])


def receipt_signed_bytes(r: pb.Receipt) -> bytes:
    """Canonical encoding of Receipt fields 1-11 (VERDICT.md, "Receipt")."""
    tally = Tally(r.accepted, r.healed, r.aborted, r.first_timestamp_ns, r.last_timestamp_ns)
    if tally.steps != r.steps:
        raise ValueError(f"receipt steps {r.steps} is not accepted + healed + aborted ({tally.steps})")
    return receipt_bytes(r.session_id, r.genesis_hash, r.chain_hash, tally, r.policy_digest, r.key_id)


class Signer(ABC):
    """Sidecar side: sets ``key_id`` and ``signature`` on a verdict."""

    algorithm: str
    key_id: str

    @abstractmethod
    def _tag(self, data: bytes) -> bytes: ...

    def sign(self, v: pb.Verdict) -> None:
        v.key_id = self.key_id
        v.signature = self._tag(verdict_bytes(v))

    def seal(self, verdicts: Sequence[pb.Verdict | None]) -> pb.BatchSeal:
        """One signature for a batch's verdicts (None: a row answered with an error). Each
        verdict gets this key's id and keeps an empty signature: the seal's digest for its
        row stands for it, so a batch costs one signature instead of one a row."""
        for v in verdicts:
            if v is not None:
                v.key_id = self.key_id
        return self.seal_rows([None if v is None else verdict_digest(v) for v in verdicts])

    def seal_rows(self, digests: Sequence[bytes | None]) -> pb.BatchSeal:
        """The seal over each row's :func:`verdict_digest`, already computed (None: a row
        answered with an error), of verdicts that carry this key's id."""
        joined = seal_digests(digests)
        return pb.BatchSeal(
            key_id=self.key_id, digests=joined, signature=self._tag(seal_bytes(self.key_id, len(digests), joined))
        )

    def sign_receipt(self, r: pb.Receipt) -> None:
        r.key_id = self.key_id
        r.signature = self._tag(receipt_signed_bytes(r))

    def sign_bytes(self, data: bytes) -> bytes:
        return self._tag(data)

    @staticmethod
    def from_file(path: str | os.PathLike[str] | None) -> Signer:
        """The signer for a key file: an Ed25519 PEM private key or an HMAC secret."""
        if path is None:
            raise SigningKeyError(f"no signing key configured (signing_key_file); {KEYGEN_HINT}")
        p, data = _read(path, "signing key")
        signer: Signer
        if data.startswith(HMAC_HEADER):
            signer = HmacSigner(_hmac_secret(p, data))
        else:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                why = f"{p} is neither an unencrypted PEM private key nor an fse HMAC key; {KEYGEN_HINT}"
                raise SigningKeyError(why) from None
            if not isinstance(key, Ed25519PrivateKey):
                raise SigningKeyError(f"{p} holds a {type(key).__name__}, an Ed25519 key is required; {KEYGEN_HINT}")
            signer = Ed25519Signer(key)
        mode = p.stat().st_mode & 0o777
        if mode & 0o007:  # a Kubernetes Secret's defaultMode 0644 included: refuse, do not sign with it
            raise SigningKeyError(
                f"signing key {p} is readable by every user (mode {mode:#o}): chmod o-rwx {p} "
                "(a Kubernetes Secret: defaultMode: 0440 or 0400)"
            )
        return signer


class Verifier(ABC):
    """Adapter side: checks a verdict's signature."""

    algorithm: str
    key_id: str

    @abstractmethod
    def _check(self, data: bytes, signature: bytes) -> bool: ...

    def verify(self, v: pb.Verdict) -> bool:
        return self._check(verdict_bytes(v), v.signature)

    def verify_receipt(self, r: pb.Receipt) -> bool:
        try:
            return self._check(receipt_signed_bytes(r), r.signature)
        except ValueError:
            return False

    def verify_bytes(self, data: bytes, signature: bytes) -> bool:
        return self._check(data, signature)

    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> Verifier:
        """The verifier for a key file: an Ed25519 PEM public key or an HMAC secret."""
        p, data = _read(path, "verification key")
        if data.startswith(HMAC_HEADER):
            return HmacVerifier(_hmac_secret(p, data))
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise SigningKeyError(f"{p} is neither a PEM public key nor an fse HMAC key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"{p} holds a {type(key).__name__}, an Ed25519 public key is required")
        return Ed25519Verifier(key)


class TrustedKeys:
    """The keys an adapter trusts, by key id: the sidecar's signing key can be rotated
    (sign with B while adapters trust A and B, then drop A) without dropping sessions."""

    def __init__(self, verifiers: Sequence[Verifier]) -> None:
        if not verifiers:
            raise SigningKeyError("no verification key given")
        self.by_id = {v.key_id: v for v in verifiers}

    @classmethod
    def load(cls, keys: Verifier | str | os.PathLike[str] | Sequence[Verifier | str | os.PathLike[str]]) -> TrustedKeys:
        items = [keys] if isinstance(keys, (Verifier, str, os.PathLike)) else list(keys)
        return cls([k if isinstance(k, Verifier) else Verifier.from_file(k) for k in items])

    @property
    def key_ids(self) -> list[str]:
        return sorted(self.by_id)

    def trusts(self, key_id: str) -> bool:
        return key_id in self.by_id

    def verify(self, v: pb.Verdict) -> bool:
        """The verdict's signature checks out under the trusted key it names."""
        k = self.by_id.get(v.key_id)
        return k is not None and k.verify(v)

    def verify_receipt(self, r: pb.Receipt) -> bool:
        k = self.by_id.get(r.key_id)
        return k is not None and k.verify_receipt(r)

    def verify_seal(self, seal: pb.BatchSeal, rows: int) -> bool:
        """The seal of a batch answered with ``rows`` responses verifies under the trusted
        key it names (then each row's verdict is checked against its digest)."""
        k = self.by_id.get(seal.key_id)
        if k is None or len(seal.digests) != rows * SEAL_DIGEST_BYTES:
            return False
        return k.verify_bytes(seal_bytes(seal.key_id, rows, seal.digests), seal.signature)

    def check(self, key_id: str, data: bytes, signature: bytes) -> bool | None:
        """For ledger.verify: None when no trusted key has that id."""
        k = self.by_id.get(key_id)
        return None if k is None else k.verify_bytes(data, signature)


def ed25519_key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Ed25519Signer(Signer):
    algorithm = "ed25519"

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key_id = ed25519_key_id(private.public_key())

    def _tag(self, data: bytes) -> bytes:
        return self._private.sign(data)


class Ed25519Verifier(Verifier):
    algorithm = "ed25519"

    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        self.key_id = ed25519_key_id(public)

    def _check(self, data: bytes, signature: bytes) -> bool:
        try:
            self._public.verify(signature, data)
        except InvalidSignature:
            return False
        return True


def _hmac_key_id(secret: bytes) -> str:
    if len(secret) < 32:
        raise SigningKeyError(f"an HMAC secret needs at least 32 bytes, got {len(secret)}")
    return hashlib.sha256(b"fse.v1.hmac-key-id" + secret).hexdigest()[:16]


class HmacSigner(Signer):
    """The sidecar's half of a shared HMAC-SHA256 secret."""

    algorithm = "hmac-sha256"

    def __init__(self, secret: bytes) -> None:
        self.key_id = _hmac_key_id(secret)
        self._secret = secret

    def _tag(self, data: bytes) -> bytes:
        return hmac.digest(self._secret, data, "sha256")


class HmacVerifier(Verifier):
    """The adapter's half of a shared HMAC-SHA256 secret."""

    algorithm = "hmac-sha256"

    def __init__(self, secret: bytes) -> None:
        self.key_id = _hmac_key_id(secret)
        self._secret = secret

    def _check(self, data: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._secret, data, "sha256"), signature)


def _read(path: str | os.PathLike[str], what: str) -> tuple[Path, bytes]:
    p = Path(path)
    try:
        return p, p.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read {what} {p}: {exc.strerror}; {KEYGEN_HINT}") from None


def _hmac_secret(p: Path, data: bytes) -> bytes:
    try:
        return bytes.fromhex(data[len(HMAC_HEADER) :].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SigningKeyError(f"{p}: an fse HMAC key is 'FSE-HMAC-SHA256 <hex secret>'") from None


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret into a new 0600 file beside ``path``, then rename it over ``path``:
    the key never sits in a file with another mode (an old key file's 0644, say), and a
    crash leaves the old key or the new one, never half of either."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_keypair(out_dir: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path]:
    """Write a fresh Ed25519 key pair; the private key is created with mode 0600."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / PRIVATE_NAME, d / PUBLIC_NAME
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise SigningKeyError(f"{priv_path} or {pub_path} already exists; pass --force to replace them")
    key = Ed25519PrivateKey.generate()
    _write_private(
        priv_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv_path, pub_path


def generate_hmac_key(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write a fresh 32-byte HMAC secret (mode 0600), for both the sidecar and the adapters."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / HMAC_NAME
    if not overwrite and path.exists():
        raise SigningKeyError(f"{path} already exists; pass --force to replace it")
    _write_private(path, HMAC_HEADER + secrets.token_hex(32).encode("ascii") + b"\n")
    return path
