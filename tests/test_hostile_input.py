"""Hostile input (issue 15): property-based fuzzing of every message the server accepts,
of the ring's header and frames, of the policy file and of the configuration.

The messages go to a real sidecar process over its socket, as raw bytes: random bytes,
and well-formed messages of every field the proto declares filled with edge values (empty,
huge, NaN, negative, unknown enum values, invalid UTF-8 in ids). Each must be answered
with a refusal that names a status (never UNKNOWN or INTERNAL) or with a valid answer;
none may open a session it should not, judge a step without the session's secret, crash
the sidecar, or hold up a canary session that steps (and verifies) after every example.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_adapters.client import GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.config import SidecarConfig, load_config
from sidecar.core.compact import moments_and_top
from sidecar.core.policy import compile_policies
from sidecar.core.session import SESSION_ID
from sidecar.errors import FseError
from sidecar.launch import LocalSidecar, start_local_sidecar
from sidecar.ring import RingReader, RingWriter
from tests.faults import GREEDY, VOCAB, V, row

SERVICE = pb.DESCRIPTOR.services_by_name["GuardService"]
# A refusal must say what kind of wrong it was: these would mean "the server broke".
BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
# What each fuzz test attacks (docs/reliability.md; {param}: the call it is run on).
FUZZ_TARGETS = {
    "test_random_bytes_to_any_call_are_refused_cleanly": "gRPC {param}: random bytes",
    "test_well_formed_messages_with_hostile_fields_are_refused_or_answered_cleanly": "gRPC {param}: hostile fields",
    "test_a_ring_with_any_bytes_changed_is_read_right_or_refused": "ring: header, counters, descriptors, payloads",
    "test_any_policy_section_compiles_or_is_refused_with_a_config_error": "policy file",
    "test_any_configuration_document_loads_or_is_refused_with_a_config_error": "configuration (any YAML document)",
    "test_any_text_as_the_configuration_file_loads_or_is_refused_with_a_config_error": "configuration file (any text)",
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- a strategy for any message of the proto ---------------------------------------------------

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),  # NaN and infinities included
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_STRING: st.one_of(
        st.text(max_size=24), st.sampled_from(["", "a" * 300, "x\ny", "\x00", "../../etc/passwd", "é" * 40])
    ),
    FieldDescriptor.TYPE_BYTES: st.one_of(st.binary(max_size=64), st.just(b"\xff" * 4096)),
}


def _value(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(f.message_type, depth + 1)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 40)  # known values and unknown ones
    return _SCALARS[f.type]


@st.composite
def _message(draw: st.DrawFn, d: Descriptor, depth: int) -> Any:
    cls = _CLASSES[d.full_name]
    m = cls()
    if depth > 3:
        return m
    chosen_oneof = {o.name: draw(st.sampled_from([None, *o.fields])) for o in d.oneofs}
    for f in d.fields:
        if f.containing_oneof is not None and chosen_oneof[f.containing_oneof.name] is not f:
            continue
        if f.is_repeated:
            for v in draw(st.lists(_value(f, depth), max_size=4)):
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(m, f.name).add().CopyFrom(v)
                else:
                    getattr(m, f.name).append(v)
        elif draw(st.booleans()) or f.containing_oneof is not None:
            v = draw(_value(f, depth))
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(m, f.name).CopyFrom(v)
            else:
                setattr(m, f.name, v)
    return m


def messages(d: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    return _message(d, depth)


_CLASSES = {d.full_name: getattr(pb, d.name) for d in pb.DESCRIPTOR.message_types_by_name.values()}
for _d in list(pb.DESCRIPTOR.message_types_by_name.values()):
    for _n in _d.nested_types:
        _CLASSES[_n.full_name] = getattr(getattr(pb, _d.name), _n.name)

# -- the sidecar under attack, and its canary ----------------------------------------------------


class Target:
    def __init__(self, sc: LocalSidecar, public_key: Path) -> None:
        self.sc = sc
        self.channel = grpc.insecure_channel(sc.target)
        self.client = GuardClient(sc.target, public_key, step_timeout=2.0)
        self.client.wait_ready()
        self.digest = self.client.register_vocabulary(VOCAB)
        self.canary = self.client.open_session(self.digest, GREEDY)
        self.canary_steps = 0

    def call(self, method: str, raw: bytes | list[bytes]) -> list[bytes] | grpc.StatusCode:
        """The raw answers of ``method`` to ``raw`` (a list: a stream), or the status code."""
        path = _OTHER_CALLS.get(method, f"/{SERVICE.full_name}/{method}")
        try:
            if isinstance(raw, list):
                return list(self.channel.stream_stream(path)(iter(raw), timeout=5))
            return [self.channel.unary_unary(path)(raw, timeout=5)]
        except grpc.RpcError as exc:
            code = exc.code()
            # grpcio's own health and reflection services answer a message they cannot parse
            # with UNKNOWN and the parse error (the sidecar's calls parse it themselves)
            parse_error = method in _OTHER_CALLS and "Error parsing message" in (exc.details() or "")
            assert code not in BROKEN or parse_error, f"{method}: {code.name}: {exc.details()}"
            assert exc.details(), f"{method}: {code.name} without a reason"
            return code

    def canary_still_steps(self) -> None:
        """The canary's next step verifies, within its deadline, and the sidecar lives."""
        i = self.canary_steps
        assert self.canary.step(row(i % V)).token_id == i % V
        self.canary_steps += 1
        assert self.sc.proc.poll() is None, "the sidecar died"


@pytest.fixture(scope="module")
def target(tmp_path_factory, keys) -> Iterator[Target]:
    d = tmp_path_factory.mktemp("hostile")
    sc = start_local_sidecar(d, {"log_level": "error", "max_sessions": 64}, (keys.private, keys.public))
    sc.wait_started()
    t = Target(sc, keys.public)
    yield t
    t.client.close()
    sc.stop()


_UNARY = [m.name for m in SERVICE.methods if not m.client_streaming]
_STREAMING = [m.name for m in SERVICE.methods if m.client_streaming]
# The other services the socket serves (grpcio's own health and reflection), for random bytes.
_OTHER_CALLS = {
    "Health.Check": "/grpc.health.v1.Health/Check",
    "ServerReflectionInfo": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}


@pytest.mark.parametrize("method", [*_UNARY, *_STREAMING, *_OTHER_CALLS])
@FUZZ
@given(data=st.data())
def test_random_bytes_to_any_call_are_refused_cleanly(target: Target, method: str, data: st.DataObject) -> None:
    streaming = method in _STREAMING or method == "ServerReflectionInfo"
    raw = data.draw(st.lists(st.binary(max_size=200), min_size=1, max_size=3) if streaming else st.binary(max_size=200))
    out = target.call(method, raw)
    if isinstance(out, list):
        _no_step_judged_without_its_secret(method, out)
    target.canary_still_steps()


@pytest.mark.parametrize("method", _UNARY + _STREAMING)
@FUZZ
@given(data=st.data())
def test_well_formed_messages_with_hostile_fields_are_refused_or_answered_cleanly(
    target: Target, method: str, data: st.DataObject
) -> None:
    m = SERVICE.methods_by_name[method]
    if m.client_streaming:
        reqs = data.draw(st.lists(messages(m.input_type), min_size=1, max_size=3))
        raw: bytes | list[bytes] = [r.SerializeToString() for r in reqs]
    else:
        req = data.draw(messages(m.input_type))
        if method == "OpenSession" and data.draw(st.booleans()):
            req.vocab_digest = target.digest  # get past the first check, to the ones after it
        raw = req.SerializeToString()
    out = target.call(method, raw)
    if isinstance(out, list):
        _no_step_judged_without_its_secret(method, out)
        if method == "OpenSession":
            _opened_only_what_it_should(target, pb.OpenSessionRequest.FromString(raw), out[0])  # type: ignore[arg-type]
    target.canary_still_steps()


def _no_step_judged_without_its_secret(method: str, answers: list[bytes]) -> None:
    """No fuzzed step carries a session's secret: none may come back with a verdict."""
    if method in ("Step", "StepBatch", "Steps"):
        for a in answers:
            if method == "Step":
                assert not pb.StepResponse.FromString(a).HasField("verdict")
            elif method == "StepBatch":
                assert all(not r.HasField("verdict") for r in pb.StepBatchResponse.FromString(a).responses)
            else:
                r = pb.StepsResponse.FromString(a)
                assert not r.response.HasField("verdict") and all(not x.HasField("verdict") for x in r.batch.responses)


def _opened_only_what_it_should(target: Target, req: pb.OpenSessionRequest, raw: bytes) -> None:
    """An OpenSession that succeeded asked for a registered vocabulary, a well-formed id
    (or none: the sidecar names it), sane sampling, no ring or lane; close it again."""
    r = pb.OpenSessionResponse.FromString(raw)
    assert req.vocab_digest == target.digest
    assert SESSION_ID.fullmatch(r.session_id) and (not req.session_id or r.session_id == req.session_id)
    assert not req.ring_name and not req.fast_lane
    s = req.sampling
    assert all(math.isfinite(x) for x in (s.temperature, s.top_p, s.min_p, s.repetition_penalty))
    assert all(0 <= t < V for t in req.prompt_token_ids)
    closed = target.call(
        "CloseSession", pb.CloseSessionRequest(session_id=r.session_id, session_secret=r.session_secret).SerializeToString()
    )
    assert isinstance(closed, list)


# -- the ring ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6),
    step=st.integers(0, 3),
)
def test_a_ring_with_any_bytes_changed_is_read_right_or_refused(edits: list[tuple[int, bytes]], step: int) -> None:
    """Header, slot counters, descriptors and payload bytes, changed anyhow after a frame
    was written: the reader returns the row written, or raises an FseError."""
    with RingWriter.create(slots=2, rows=2, vocab_size=64, topk=8) as w:
        x = np.arange(64, dtype=np.float32)
        with w.frame(1) as f:
            f.write_row(7, step, x)
            f.write_compact(8, step, *moments_and_top(x, 8))
        buf = w._shm.buf
        assert buf is not None
        for at, data in edits:
            off = at % len(buf)  # offsets are drawn up to 4095, the ring is smaller: every edit lands
            end = min(off + len(data), len(buf))
            buf[off:end] = data[: end - off]
        try:
            r = RingReader(w.name)
        except FseError:
            return
        try:
            for row_i, tag in ((0, 7), (1, 8)):
                try:
                    got = r.row(1, row_i, f.seq, tag, step)
                except FseError:
                    continue
                if isinstance(got, np.ndarray):
                    assert got.shape == (64,)
        finally:
            r.close()


# -- the policy file and the configuration ----------------------------------------------------

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["(", "[a-", "a{99999}", "\\", "(?P<x>a)", ".*", "literal", "regex", "block", "halt", "flag"]),
)
_json = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=20
)
_RULE_KEYS = ["id", "kind", "patterns", "action", "case_insensitive", "whole_word", "normalize"]
_POLICY_KEYS = ["guards", "rules", "redo", "gate", "loop_guard", "drift"]


@st.composite
def policies(draw: st.DrawFn) -> Any:
    """Policy sections shaped like real ones (known keys, rule lists) with hostile values."""
    rules = draw(
        st.lists(st.dictionaries(st.sampled_from(_RULE_KEYS), _json | st.lists(_leaf, max_size=3), max_size=7), max_size=4)
    )
    pol = draw(st.dictionaries(st.sampled_from(_POLICY_KEYS), _json, max_size=3))
    if draw(st.booleans()):
        pol["rules"] = rules
    return {draw(st.text(min_size=1, max_size=8)): pol}


def _load(tmp_path: Path, text: str) -> None:
    p = tmp_path / f"{uuid.uuid4().hex}.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        compile_policies(load_config(p).policies)  # what serve and a reload do with the file
    except FseError as exc:  # ConfigError: a reason, naming the file or the rule
        assert str(exc)
    finally:
        os.unlink(p)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pols=policies())
def test_any_policy_section_compiles_or_is_refused_with_a_config_error(tmp_path: Path, pols: Any) -> None:
    _load(tmp_path, yaml.safe_dump({"policies": pols}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_json, st.dictionaries(st.sampled_from(sorted(SidecarConfig.model_fields)), _json)))
def test_any_configuration_document_loads_or_is_refused_with_a_config_error(tmp_path: Path, doc: Any) -> None:
    _load(tmp_path, yaml.safe_dump(doc))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_any_text_as_the_configuration_file_loads_or_is_refused_with_a_config_error(tmp_path: Path, text: str) -> None:
    _load(tmp_path, text)
