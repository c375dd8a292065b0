"""Bounds and permissions at the sidecar's edges (issue 28, items 7, 17, 18): what a client
or a deployment hands the sidecar is refused at the door, naming what is wrong."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine_adapters.client import GuardClient
from sidecar.config import parse_config
from sidecar.core.sampling import SamplingParams
from sidecar.errors import ConfigError, RingLayoutError, SigningKeyError, StepRefused
from sidecar.ring import RingReader
from sidecar.signing import Signer
from sidecar.wire import count_field_upto

VOCAB = [f"t{i}".encode() for i in range(100)]


@pytest.mark.parametrize("mode", [0o666, 0o606, 0o604, 0o601])
def test_a_socket_mode_that_lets_every_user_connect_is_refused(mode: int) -> None:
    with pytest.raises(ConfigError, match=r"unix_socket_mode.*lets every user of the machine connect"):
        parse_config({"unix_socket_mode": mode})
    assert parse_config({"unix_socket_mode": 0o660}).unix_socket_mode == 0o660
    # as people write it in YAML: PyYAML reads 0o660 as a string, 0660 as octal
    assert (
        parse_config({"unix_socket_mode": "0o660"}).unix_socket_mode
        == parse_config({"unix_socket_mode": "0660"}).unix_socket_mode
        == 0o660
    )


@pytest.mark.parametrize(("mode", "ok"), [(0o644, False), (0o604, False), (0o600, True), (0o440, True), (0o400, True)])
def test_a_signing_key_readable_by_every_user_is_refused(keys, tmp_path, mode: int, ok: bool) -> None:
    key = tmp_path / "fse_signing.key"
    shutil.copy(keys.private, key)
    os.chmod(key, mode)
    if ok:
        assert Signer.from_file(key).key_id
    else:
        with pytest.raises(SigningKeyError, match=rf"readable by every user \(mode {mode:#o}\): chmod o-rwx"):
            Signer.from_file(key)


@pytest.mark.parametrize("name", [".", "..", "/.", "/..", ".hidden"])
def test_ring_names_that_are_directories_or_hidden_are_refused_before_anything_is_opened(name: str) -> None:
    with pytest.raises(RingLayoutError, match="must match"):
        RingReader(name)


def test_a_repetition_window_past_the_configured_bound_is_refused(start_sidecar, keys) -> None:
    sc = start_sidecar(max_repetition_window=512)
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    digest = c.register_vocabulary(VOCAB)
    with pytest.raises(StepRefused, match=r"repetition_window 4294967295 exceeds max_repetition_window \(512\)") as e:
        c.open_session(digest, SamplingParams(repetition_window=2**32 - 1), prompt_token_ids=[1] * 1000)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT.name
    s = c.open_session(digest, SamplingParams(repetition_window=512))  # at the bound: opens
    s.close()
    c.close()


def _encoded_vocabulary(tokens: list[bytes]) -> bytes:
    from sidecar._pb.fse.v1 import guard_pb2 as pb

    return pb.RegisterVocabularyRequest(tokens=tokens).SerializeToString()


@given(st.lists(st.binary(max_size=300), max_size=60), st.integers(0, 80))
def test_the_token_count_read_off_the_wire_is_the_parsed_count_up_to_the_limit(tokens: list[bytes], limit: int) -> None:
    raw = _encoded_vocabulary(tokens)
    assert count_field_upto(raw, 1, limit) == min(len(tokens), limit + 1)


@given(st.binary(max_size=400))
def test_counting_tokens_of_random_bytes_never_raises(raw: bytes) -> None:
    assert 0 <= count_field_upto(raw, 1, 1 << 20) <= len(raw)


def test_a_vocabulary_with_more_tokens_than_allowed_is_refused_before_it_is_parsed(start_sidecar, keys, monkeypatch) -> None:
    # 10M one-byte tokens under max_vocab_bytes held the GIL ~1.4 s in the parse; the count
    # now comes off the wire first (the message says it was never parsed).
    sc = start_sidecar(max_vocab_size=1000)
    c = GuardClient(sc.target, keys.public)
    c.wait_ready()
    with pytest.raises(StepRefused, match=r"more than 1000 tokens exceeds max_vocab_size 1000; refused unparsed") as e:
        c.register_vocabulary([b"x"] * 2_000_000)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT.name
    assert c.register_vocabulary(VOCAB)  # the sidecar goes on
    c.close()
