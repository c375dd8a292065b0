"""Ed25519 verdict signatures over a canonical encoding (never the protobuf bytes).

Keys live in PEM files made by ``fse-sidecar keygen``: the private key (PKCS#8, mode
0600) stays with the sidecar, the public key goes to the adapters out of band. There is
no default key, and key material is never logged; only its ``key_id`` (the first 8 bytes
of SHA-256 over the raw public key, hex) appears in verdicts and logs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import canonical as cb
from ._pb.fse.v1 import guard_pb2 as pb
from .errors import SigningKeyError

PRIVATE_NAME = "fse_signing.key"
PUBLIC_NAME = "fse_signing.pub"
KEYGEN_HINT = "make a key pair with: fse-sidecar keygen --out DIR (then set signing_key_file: DIR/fse_signing.key)"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def verdict_bytes(v: pb.Verdict) -> bytes:
    """Canonical encoding of Verdict fields 1-11 (see proto/fse/v1/VERDICT.md)."""
    m = v.metrics
    parts = [
        b"fse.v1.verdict",
        cb.string(v.session_id),
        cb.u64(v.step),
        cb.u32(v.decision),
        cb.i64(v.token_id),
        cb.u32(v.sampler),
        cb.u32(len(v.reasons)),
    ]
    for r in v.reasons:
        parts += [cb.string(r.code), cb.f64(r.value), cb.f64(r.threshold), cb.u32(r.sampler), cb.string(r.detail)]
    parts += [
        cb.f64(m.entropy_nats),
        cb.f64(m.neg_logprob_nats),
        cb.u64(m.rank),
        cb.f64(m.margin),
        cb.f64(m.selected_prob),
        cb.f64(m.max_prob),
        cb.f64(m.logit_variance),
        cb.f64(m.l2_norm),
        cb.f64(m.varentropy),
        cb.f64(m.running_ppl),
        cb.u32(v.band),
        cb.blob(v.prev_chain_hash),
        cb.blob(v.chain_hash),
        cb.string(v.key_id),
    ]
    return b"".join(parts)


class Signer:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None) -> Signer:
        if path is None:
            raise SigningKeyError(f"no signing key configured (signing_key_file); {KEYGEN_HINT}")
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read signing key {p}: {exc.strerror}; {KEYGEN_HINT}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SigningKeyError(f"{p} is not an unencrypted PEM private key; {KEYGEN_HINT}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{p} holds a {type(key).__name__}, an Ed25519 key is required; {KEYGEN_HINT}")
        return cls(key)

    def sign(self, v: pb.Verdict) -> None:
        """Set ``v.key_id`` and ``v.signature`` in place."""
        v.key_id = self.key_id
        v.signature = self._private.sign(verdict_bytes(v))


class Verifier:
    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        self.key_id = key_id(public)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Verifier:
        p = Path(path)
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except OSError as exc:
            raise SigningKeyError(f"cannot read public key {p}: {exc.strerror}") from None
        except (ValueError, TypeError):
            raise SigningKeyError(f"{p} is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"{p} holds a {type(key).__name__}, an Ed25519 public key is required")
        return cls(key)

    def verify(self, v: pb.Verdict) -> bool:
        try:
            self._public.verify(v.signature, verdict_bytes(v))
        except InvalidSignature:
            return False
        return True


def generate_keypair(out_dir: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path]:
    """Write a fresh key pair; the private key is created with mode 0600."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / PRIVATE_NAME, d / PUBLIC_NAME
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise SigningKeyError(f"{priv_path} or {pub_path} already exists; pass --force to replace them")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(priv_path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    os.chmod(priv_path, 0o600)
    pub_path.write_bytes(pub)
    return priv_path, pub_path
