"""Errors that name the fix: a sidecar socket that is missing, stale, not a socket or closed
to this user; a key the engine does not trust; a demo whose sidecar child dies at once."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_adapters.client import GuardClient, unreachable_because
from sidecar.errors import GuardUnavailable, VerdictRejected

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user may enter (pytest's tmp_path is the owner's alone)."""
    d = Path(tempfile.mkdtemp(prefix="fse-diag-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_a_missing_socket_says_to_start_the_sidecar_or_point_the_engine_at_its_socket(tmp_path, keys) -> None:
    c = GuardClient(f"unix:{tmp_path / 'fse.sock'}", keys.public)
    with pytest.raises(GuardUnavailable) as err:
        c.wait_ready(timeout=0.3)
    msg = str(err.value)
    assert f"no socket at {tmp_path / 'fse.sock'}" in msg and "fse-sidecar serve" in msg and "FSE_SIDECAR" in msg
    assert "_InactiveRpcError" not in msg and "debug_error_string" not in msg
    c.close()


def test_a_stale_socket_and_a_plain_file_are_told_apart(tmp_path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: a sidecar that was killed
    assert "a stale socket" in unreachable_because(f"unix:{stale}")
    plain = tmp_path / "plain"
    plain.write_text("")
    assert "is not a Unix socket" in unreachable_because(f"unix://{plain}")
    assert "is the sidecar running and listening there" in unreachable_because("127.0.0.1:9")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_socket_closed_to_the_engine_s_user_names_unix_socket_group_and_mode(shared_dir) -> None:
    path = shared_dir / "fse.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    path.chmod(0o600)  # the sidecar's default: its own user only
    try:
        os.seteuid(65534)  # connect() checks the effective user: an engine running as nobody
        try:
            why = unreachable_because(f"unix:{path}")
        finally:
            os.seteuid(0)
    finally:
        listener.close()
    assert "permission denied" in why and "unix_socket_group" in why and "unix_socket_mode: 0o660" in why


def test_a_key_the_engine_does_not_trust_says_which_key_to_give_it(start_sidecar, keys, other_keys) -> None:
    sc = start_sidecar(signing=other_keys)
    c = GuardClient(sc.target, keys.public)
    with pytest.raises(VerdictRejected) as err:
        c.check_usable(timeout=5)
    assert "the sidecar signs with key" in str(err.value) and "--public-key or FSE_PUBLIC_KEY" in str(err.value)
    c.close()


def test_a_demo_whose_sidecar_exits_at_once_says_why_within_seconds(tmp_path) -> None:
    """A configuration that parses but cannot run (a regex the matcher refuses): the sidecar
    child's own error, at once, instead of 30 s of waiting and a transport error."""
    bad = tmp_path / "bad.yaml"
    bad.write_text('policies: {default: {rules: [{id: x, patterns: ["("], kind: regex, action: halt}]}}\n')
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert "the sidecar exited with status 2 before it served" in r.stderr
    assert "not a regular expression this matcher supports" in r.stderr
    assert time.monotonic() - t0 < 20  # the child's exit is seen as it happens (it waited 30 s)
    unparsable = tmp_path / "typo.yaml"
    unparsable.write_text("policies: {default: {guardz: {}}}\n")
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--config", str(unparsable)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and f"{unparsable}: policies.default.guardz: Extra inputs are not permitted" in r.stderr


@pytest.mark.slow
def test_an_engine_pointed_at_a_missing_socket_says_so_before_it_serves_and_answers_503(tmp_path, keys) -> None:
    import json
    import urllib.error
    import urllib.request

    from sidecar.launch import free_port

    port, log = free_port(), tmp_path / "engine.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_adapters.llama_server", "--listen", f"127.0.0.1:{port}", "--log-format", "json",
         "--sidecar", f"unix:{tmp_path / 'nope.sock'}", "--public-key", str(keys.public)],
        cwd=ROOT, stderr=log.open("wb"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
                raise AssertionError("healthz answered 200 without a sidecar")
            except urllib.error.HTTPError as err:
                status, body = err.code, json.loads(err.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert status == 503 and f"no socket at {tmp_path / 'nope.sock'}" in body["error"]["message"]
        events = [json.loads(line).get("event") for line in log.read_text().splitlines() if line.startswith("{")]
        assert events.index("sidecar_unusable") < events.index("started")  # said before "serving"
    finally:
        proc.terminate()
        proc.wait(30)
