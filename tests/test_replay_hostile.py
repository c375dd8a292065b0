"""Recordings against a hostile or damaged directory (issue 28, item 13): decompression is
bounded by the vocabulary, a malformed recording is named (exit 2) and never a traceback,
and what the recorder writes only its owner can read (it holds prompts and logits)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from engine_adapters.client import GuardClient
from sidecar.core.sampling import SamplingParams
from sidecar.launch import start_local_sidecar

V = 200
VOCAB = [f"t{i}".encode() for i in range(V)]


def _replay(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sidecar", "replay", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def recording(tmp_path_factory, keys) -> Path:
    tmp = tmp_path_factory.mktemp("rec")
    rec = tmp / "rec"
    old = os.umask(0o022)  # the usual umask: files would be 0644 without the recorder's own modes
    try:
        sc = start_local_sidecar(tmp, {"record_dir": str(rec)}, (keys.private, keys.public))
    finally:
        os.umask(old)
    sc.wait_started()
    try:
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams(), prompt_token_ids=[1, 2, 3])
        for i in range(6):
            x = np.random.default_rng(i).standard_normal(V).astype(np.float32)
            x[i] = 12.0
            s.step(x)
        s.close()
        c.close()
    finally:
        sc.stop()
    return rec


def _copy(recording: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "copy"
    shutil.copytree(recording, out)
    (session,) = [p for p in out.iterdir() if p.is_dir()]
    return out, session


def test_the_recording_is_readable_by_its_owner_only_and_replays(recording) -> None:
    paths = [recording, *recording.rglob("*")]
    assert len(paths) >= 5
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p.name}: {mode:#o}"
    r = _replay(recording)
    assert r.returncode == 0 and "6 steps, ledger identical" in r.stdout, r.stdout + r.stderr


def test_a_row_that_inflates_past_its_vocabulary_is_refused_without_inflating_it(recording, tmp_path) -> None:
    root, session = _copy(recording, tmp_path)
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MB of zeros in ~64 kB: a 200-token row is 800 bytes
    (session / "rows.bin").write_bytes(struct.pack("<QI", 0, len(bomb)) + bomb)
    r = _replay(root)
    assert r.returncode == 2 and "MALFORMED recording" in r.stdout and "inflates past 800 bytes" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("rows cut", "runs past the end of the file"),
        ("rows not zlib", "not zlib data"),
        ("open.json history a number", "MALFORMED recording: TypeError"),
        ("open.json not JSON", "MALFORMED recording: JSONDecodeError"),
        ("vocabulary cut", "token 0 runs past the end of the file"),
    ],
)
def test_a_damaged_recording_is_named_and_never_a_traceback(recording, tmp_path, damage: str, message: str) -> None:
    root, session = _copy(recording, tmp_path)
    rows = session / "rows.bin"
    if damage == "rows cut":
        rows.write_bytes(rows.read_bytes()[:-5])
    elif damage == "rows not zlib":
        rows.write_bytes(struct.pack("<QI", 0, 8) + b"notzlib!")
    elif damage == "open.json history a number":
        meta = json.loads((session / "open.json").read_text())
        meta["history"] = 5
        (session / "open.json").write_text(json.dumps(meta))
    elif damage == "open.json not JSON":
        (session / "open.json").write_text("{" * 10)
    else:
        (vocab,) = root.glob("vocab-*.bin")
        vocab.write_bytes(struct.pack("<II", 1, 1000) + b"x")
    r = _replay(root)
    assert r.returncode == 2 and message in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "1 malformed" in r.stdout
