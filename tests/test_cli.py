from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main


def fse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["serve", "demo", "bench", "keygen", "audit", "replay", "ring-size"])
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert command in capsys.readouterr().out


def test_keygen_writes_keys_and_refuses_to_overwrite(tmp_path) -> None:
    r = fse("keygen", "--out", str(tmp_path))
    assert r.returncode == 0 and "key id:" in r.stdout
    assert stat.S_IMODE((tmp_path / "fse_signing.key").stat().st_mode) == 0o600
    again = fse("keygen", "--out", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    h = fse("keygen", "--out", str(tmp_path), "--algorithm", "hmac-sha256")
    assert h.returncode == 0 and (tmp_path / "fse_hmac.key").read_text().startswith("FSE-HMAC-SHA256 ")


def test_unknown_command_is_a_usage_error() -> None:
    r = fse("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_keygen_force_replaces_the_key_file_instead_of_writing_into_it(tmp_path) -> None:
    """An old key file with a loose mode is not reused: the new key is born 0600 in a new file."""
    import os

    assert fse("keygen", "--out", str(tmp_path)).returncode == 0
    key = tmp_path / "fse_signing.key"
    os.chmod(key, 0o644)
    before = key.stat().st_ino
    r = fse("keygen", "--out", str(tmp_path), "--force")
    assert r.returncode == 0
    assert key.stat().st_ino != before and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_ring_size_is_the_size_of_the_segment_the_engine_creates(capsys) -> None:
    from sidecar.ring import RingWriter

    assert main(["ring-size", "--vocab", "49152", "--slots", "2", "--lane-capacity", "8192", "--rings", "3"]) == 0
    out = capsys.readouterr().out
    ring = RingWriter.create(slots=2, rows=1, vocab_size=49152, dtype="f32", verdict_capacity=8192)
    try:
        size = ring.layout.total_size
        assert f"{size} bytes each, {3 * size} bytes in all" in out
        assert Path(f"/dev/shm/{ring.name}").stat().st_size >= size
    finally:
        ring.close()


def test_ring_size_refuses_an_impossible_layout(capsys) -> None:
    assert main(["ring-size", "--vocab", "0"]) != 0
    assert "vocab_size must be >= 1" in capsys.readouterr().err
    assert main(["ring-size", "--vocab", "10", "--rings", "0"]) != 0
    assert "--rings must be >= 1" in capsys.readouterr().err
