"""A mutation check of the fail-closed paths (issue 8, item 9).

Each mutant removes one check that stands between an engine and an unverified token. It
is applied to a copy of the code, and the tests named for it must then fail. A mutant
whose original text is no longer in the code fails this test too: rewrite it with the
code, do not drop it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    edits: tuple[tuple[str, str], ...]
    killers: tuple[str, ...]


MUTANTS = [
    Mutant(
        "llama-processor-does-not-force-and-the-boundary-does-not-compare",
        "engine_adapters/llama_cpp.py",
        (
            ("                scores[:] = NEG_INF\n                scores[v.token_id] = 0.0\n", "                pass\n"),
            ("        if v.token_id != token:", "        if False:"),
        ),
        ("tests/test_llama_e2e.py::test_tripping_guard_heals_to_the_strict_sampler_and_changes_the_text",),
    ),
    Mutant(
        "speculating-adapter-keeps-its-guess-instead-of-the-verdict",
        "engine_adapters/llama_cpp.py",
        (
            (
                "            token = v.token_id\n            if ahead and token == guess:",
                "            token = guess if ahead else v.token_id\n            if ahead and token == guess:",
            ),
        ),
        ("tests/test_llama_e2e.py::test_tripping_guard_heals_to_the_strict_sampler_and_changes_the_text[speculating]",),
    ),
    Mutant(
        "adapter-checks-the-key-id-but-not-the-signature",
        "sidecar/signing.py",
        (("        return k is not None and k.verify(v)\n", "        return k is not None\n"),),
        ("tests/test_service.py::test_forged_or_misbound_verdicts_are_rejected",),
    ),
    Mutant(
        "adapter-does-not-check-the-decision",
        "engine_adapters/client.py",
        (("if v.decision not in (pb.DECISION_ACCEPT, pb.DECISION_HEALED):", "if False:"),),
        ("tests/test_service.py::test_forged_or_misbound_verdicts_are_rejected",),
    ),
    Mutant(
        "adapter-does-not-check-the-chain-link",
        "engine_adapters/client.py",
        (("if v.prev_chain_hash != expect.prev_chain_hash:", "if False:"),),
        ("tests/test_trust.py::test_a_verdict_from_an_earlier_opening_of_the_same_id_does_not_link",),
    ),
    Mutant(
        "sidecar-does-not-check-the-seqlock-after-copying-a-row",
        "sidecar/ring.py",
        (('        self._check_seq(slot, seq, int.from_bytes(self._seq_now, "little"))  # whole, or refused\n', ""),),
        ("tests/test_guard_service.py::test_a_frame_torn_while_the_sidecar_copies_it_gives_no_verdict",),
    ),
    Mutant(
        "sidecar-does-not-check-the-seqlock-before-copying-a-row",
        "sidecar/ring.py",
        (("        self._check_seq(slot, seq, now)  # not being written, not replaced\n", ""),),
        ("tests/test_ring.py::test_a_frame_published_before_it_was_whole_is_refused",),
    ),
    Mutant(
        "sidecar-reads-rows-of-a-kind-it-does-not-implement",
        "sidecar/ring.py",
        (("        if kind == KIND_FULL:", "        if kind != KIND_COMPACT:"),),  # an unknown kind read as FULL
        ("tests/test_ring.py::test_a_compact_row_is_read_whole_beside_full_rows_and_an_unknown_kind_is_refused",),
    ),
    Mutant(
        "sidecar-does-not-check-the-session-owner",
        "sidecar/service.py",
        (("        if not hmac.compare_digest(secret, s.secret):", "        if False:"),),
        ("tests/test_trust.py::test_another_client_cannot_step_or_close_a_session_it_did_not_open",),
    ),
]


def _copy_tree(dest: Path) -> None:
    skip = {".venv", ".venv-vllm", ".fse-models", ".git", "bench-results", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    skip |= {".hypothesis", "__pycache__"}  # (vLLM's venv and the converted model: 4 GB)
    shutil.copytree(ROOT, dest, ignore=lambda _d, names: [n for n in names if n in skip])


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_every_mutant_of_a_fail_closed_check_is_killed(tmp_path: Path, mutant: Mutant) -> None:
    tree = tmp_path / "tree"
    _copy_tree(tree)
    target = tree / mutant.path
    code = target.read_text()
    for old, new in mutant.edits:
        assert code.count(old) == 1, f"mutant {mutant.name}: {old!r} is not (once) in {mutant.path}; rewrite the mutant"
        code = code.replace(old, new)
    target.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy wins over the editable install
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.killers],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "passed" in r.stdout or "failed" in r.stdout, r.stdout + r.stderr  # the tests ran
    assert r.returncode != 0, f"mutant {mutant.name} survived:\n{r.stdout[-2000:]}"
