"""What a Kubernetes pod needs of the sidecar: a TCP port for the kubelet's gRPC health
probes, and a configuration file reloaded when its ConfigMap changes."""

from __future__ import annotations

import socket
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_adapters.client import GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.core.sampling import SamplingParams
from sidecar.launch import SidecarExited

from .conftest import free_port

VOCAB = [f"t{i}".encode() for i in range(100)]


def test_the_health_port_answers_over_tcp_and_serves_nothing_else(start_sidecar) -> None:
    port = free_port()
    start_sidecar(health_listen=f"127.0.0.1:{port}")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "fse.v1.GuardService"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5, wait_for_ready=True)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:  # the guard itself is only on the Unix socket
            pb_grpc.GuardServiceStub(ch).RegisterVocabulary(pb.RegisterVocabularyRequest(tokens=VOCAB), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_health_port_that_cannot_be_bound_stops_the_sidecar_with_a_clear_error(start_sidecar) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SidecarExited, match=f"cannot serve the health port on 127.0.0.1:{port}"):
            sc = start_sidecar(health_listen=f"127.0.0.1:{port}")
            sc.proc.wait(15)
            raise RuntimeError(sc.log_text())


def test_a_changed_configuration_file_is_reloaded_without_a_signal(start_sidecar, keys) -> None:
    sc = start_sidecar(watch_config_s=0.2)
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)

    def policy_now() -> str:
        s = c.open_session(digest, SamplingParams())
        s.close()
        return s.policy_digest

    before = policy_now()
    cfg = yaml.safe_load(sc.config.read_text())
    cfg["policies"] = {"default": {"guards": {"neg_logprob": {"enabled": True, "threshold": 5.0}}}}
    tmp = sc.config.with_suffix(".new")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(sc.config)  # swapped in whole, as a ConfigMap update does
    deadline = time.monotonic() + 30
    while (after := policy_now()) == before:
        assert time.monotonic() < deadline, sc.log_text()
        time.sleep(0.2)
    sc.config.write_text("policies: {default: {guards: {rank: {threshold: -1}}}}\nlisten: nope\n")  # refused whole
    deadline = time.monotonic() + 30
    while "reload refused" not in sc.log_text():
        assert time.monotonic() < deadline, sc.log_text()
        time.sleep(0.2)
    assert policy_now() == after  # the policies in force stay
    c.close()


RULES = {"rules": [{"id": "no-paris", "kind": "literal", "patterns": ["Paris"], "action": "block"}]}


def test_the_watch_never_loads_a_file_caught_half_written(start_sidecar, keys) -> None:
    # issue 28 item 8: a writer that rewrites the file in place shows a valid prefix (the
    # policy without its rules) for a moment; sessions opened on it would keep it for life.
    sc = start_sidecar(watch_config_s=1.0, policies={"default": RULES})
    cfg = yaml.safe_load(sc.config.read_text())
    cfg["policies"]["default"]["guards"] = {"neg_logprob": {"enabled": True, "threshold": 9.0}}
    # the policies last, their rules at the very end: the prefix is the file without its rules
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k != "policies"}) + yaml.safe_dump({"policies": cfg["policies"]})
    cut = text.index("rules:")
    for _ in range(2):
        with open(sc.config, "w") as f:  # in place, not replaced: half of it for 0.9 s
            f.write(text[:cut])
            f.flush()
            time.sleep(0.9)
            f.write(text[cut:])
        time.sleep(3.5)
    from sidecar.config import parse_config
    from sidecar.core.policy import compile_policies

    full = compile_policies(parse_config(cfg).policies)["default"].digest
    prefix = compile_policies(parse_config(yaml.safe_load(text[:cut])).policies)["default"].digest
    reloads = [line for line in sc.log_text().splitlines() if "policies reloaded" in line]
    assert reloads and all(f"default={full[:12]}" in line for line in reloads), reloads  # never the prefix's
    assert not any(prefix[:12] in line for line in reloads)
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
    s.close()
    assert s.policy_digest == full


def test_a_reload_that_removes_rules_or_policies_says_so() -> None:
    from sidecar.config import parse_config
    from sidecar.core.policy import compile_policies
    from sidecar.reload import removed_rules

    old = compile_policies(parse_config({"policies": {"default": RULES, "strict": RULES}}).policies)
    new = compile_policies(parse_config({"policies": {"default": {}}}).policies)
    want = ["rules ['no-paris'] from policy 'default'", "policy 'strict' (new sessions naming it are refused)"]
    assert removed_rules(old, new) == want
    assert removed_rules(new, old) == []
