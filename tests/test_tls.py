"""mTLS on TCP (issue 8, item 7): certificates made here, a real sidecar process."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine_adapters.client import ClientTls, GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.config import parse_config
from sidecar.core.sampling import SamplingParams
from sidecar.errors import ConfigError, GuardUnavailable, StepRefused

VOCAB = [f"t{i}".encode() for i in range(100)]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])  # "": no common name (SPIFFE)


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, san: list | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    c, k = d / f"{name}.crt", d / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return c, k


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fse test CA", ca_key, "fse test CA", ca_key, True)
    out = {"ca": d / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, issuer, ikey, san in (
        ("server", "fse test CA", ca_key, [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
        ("client", "fse test CA", ca_key, None),
        ("stranger", "someone else's CA", other_key, None),
        ("client_twin", "fse test CA", ca_key, None),  # the common name "client" again, its own key
        ("spiffe_a", "fse test CA", ca_key, [x509.UniformResourceIdentifier("spiffe://fse.test/ns/a/sa/engine")]),
        ("spiffe_b", "fse test CA", ca_key, [x509.UniformResourceIdentifier("spiffe://fse.test/ns/b/sa/engine")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = {"client_twin": "client", "spiffe_a": "", "spiffe_b": ""}.get(name, name)
        out[f"{name}_crt"], out[f"{name}_key"] = _write(d, name, _cert(subject, key, issuer, ikey, False, san), key)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tls_sidecar(tmp_path, keys, pki, request):
    port = _free_port()
    cfg = tmp_path / "sidecar.yaml"
    tls = {"cert_file": str(pki["server_crt"]), "key_file": str(pki["server_key"]), "client_ca_file": str(pki["ca"])}
    extra = getattr(request, "param", {})
    cfg.write_text(
        yaml.safe_dump({"listen": f"tcp://127.0.0.1:{port}", "signing_key_file": str(keys.private), "tls": tls, **extra})
    )
    log = (tmp_path / "sidecar.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sidecar.log").read_text()
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_a_client_with_a_certificate_from_the_trusted_ca_gets_verified_verdicts(tls_sidecar, keys, pki) -> None:
    c = GuardClient(tls_sidecar, keys.public, tls=ClientTls(pki["ca"], pki["client_crt"], pki["client_key"]))
    c.wait_ready()
    s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
    x = np.zeros(100, np.float32)
    x[42] = 9.0
    assert s.step(x).token_id == 42
    c.close()


@pytest.mark.parametrize("who", ["plaintext", "no-client-cert", "other-ca"])
def test_clients_without_a_trusted_certificate_are_refused(tls_sidecar, keys, pki, who: str) -> None:
    if who == "plaintext":
        channel = grpc.insecure_channel(tls_sidecar)
    elif who == "no-client-cert":
        channel = grpc.secure_channel(tls_sidecar, grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes()))
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki["ca"].read_bytes(),
            private_key=pki["stranger_key"].read_bytes(),
            certificate_chain=pki["stranger_crt"].read_bytes(),
        )
        channel = grpc.secure_channel(tls_sidecar, creds)
    stub = pb_grpc.GuardServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterVocabulary(pb.RegisterVocabularyRequest(tokens=VOCAB), timeout=3)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if who == "plaintext":  # and through the client API: no verdict, a clear error
        with pytest.raises(GuardUnavailable):
            GuardClient(tls_sidecar, keys.public, rpc_timeout=3).register_vocabulary(VOCAB)


def test_a_non_loopback_listener_without_tls_is_refused_unless_explicitly_allowed(tmp_path) -> None:
    with pytest.raises(ConfigError, match="non-loopback address serves prompts and verdicts in clear"):
        parse_config({"listen": "tcp://0.0.0.0:50051"})
    with pytest.raises(ConfigError, match="non-loopback"):
        parse_config({"listen": "tcp://10.1.2.3:50051"})
    assert parse_config({"listen": "tcp://0.0.0.0:50051", "allow_insecure_tcp": True}).allow_insecure_tcp
    assert parse_config({"listen": "tcp://127.0.0.1:50051"}).tls is None  # loopback stays simple
    assert parse_config({"listen": "tcp://[::1]:50051"}).tls is None
    with pytest.raises(ConfigError, match="tls applies to tcp"):
        parse_config({"listen": "unix:///tmp/x.sock", "tls": {"cert_file": "a", "key_file": "b", "client_ca_file": "c"}})


@pytest.mark.parametrize("tls_sidecar", [{"max_sessions_per_client": 1}], indirect=True)
def test_the_session_quota_is_per_certificate_not_per_common_name_or_connection(tls_sidecar, keys, pki) -> None:
    def client(name: str) -> GuardClient:
        c = GuardClient(tls_sidecar, keys.public, tls=ClientTls(pki["ca"], pki[f"{name}_crt"], pki[f"{name}_key"]))
        c.wait_ready()
        return c

    names = ["client", "client_twin", "spiffe_a", "spiffe_b"]
    clients = [client(n) for n in names]
    digest = clients[0].register_vocabulary(VOCAB)
    # one session each: same-CN and CN-less certificates are separate clients
    sessions = [c.open_session(digest, SamplingParams()) for c in clients]
    for name in names:  # a second one from the same certificate, over a new connection, is over the quota
        again = client(name)
        with pytest.raises(StepRefused, match=r"max_sessions_per_client \(1\)"):
            again.open_session(digest, SamplingParams())
        again.close()
    for s in sessions:
        s.close()
    for c in clients:
        c.close()


@pytest.mark.parametrize("tls_sidecar", [{"reload_identities": ["spiffe://fse.test/ns/a/sa/engine"]}], indirect=True)
def test_reload_policy_is_allowed_to_the_named_certificate_identities_only(tls_sidecar, keys, pki) -> None:
    def client(name: str) -> GuardClient:
        c = GuardClient(tls_sidecar, keys.public, tls=ClientTls(pki["ca"], pki[f"{name}_crt"], pki[f"{name}_key"]))
        c.wait_ready()
        return c

    allowed, other = client("spiffe_a"), client("client")
    assert set(allowed.reload_policy()) == {"default"}
    with pytest.raises(StepRefused, match=r"allowed to reload_identities only; this client is client") as e:
        other.reload_policy()
    assert e.value.code == "PERMISSION_DENIED"
    other.register_vocabulary(VOCAB)  # everything else it may still do
    allowed.close()
    other.close()
