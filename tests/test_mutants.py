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
        "llama-adapter-evaluates-llama-cpps-own-greedy-token-instead-of-the-verdicts",
        "engine_adapters/llama_cpp.py",
        (
            (
                "                v = session.step(logits)\n                token = v.token_id\n",
                "                v = session.step(logits)\n                token = int(np.argmax(logits))\n",
            ),
        ),
        ("tests/test_llama_e2e.py::test_llama_cpp_context_holds_only_verdict_tokens[grpc]",),
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
    # the mutation audit of issue 28: twelve changes the suite let through before
    Mutant(
        "llama-adapter-goes-on-with-an-unverified-token-after-a-failed-step",
        "engine_adapters/llama_cpp.py",
        (
            (
                "                v = session.step(logits)\n",
                "                try:\n"
                "                    v = session.step(logits)\n"
                "                except GuardError:\n"
                "                    v = pb.Verdict(token_id=int(np.argmax(logits)))\n",
            ),
        ),
        ("tests/test_llama_e2e.py::test_a_failed_step_evaluates_nothing",),
    ),
    Mutant(
        "transformers-adapter-boundary-check-disabled",
        "engine_adapters/hf.py",
        (("if new != allowed[: len(new)] or len(new) != len(allowed):", "if False:"),),
        ("tests/test_hf_e2e.py::test_tokens_the_engine_produced_against_the_verdicts_are_never_returned",),
    ),
    Mutant(
        "client-does-not-check-the-genesis-hash",
        "engine_adapters/client.py",
        ((" or r.genesis_hash != opening.genesis():", ":"),),
        ("tests/test_service.py::test_an_opening_whose_genesis_or_nonce_does_not_bind_it_is_refused[other_genesis]",),
    ),
    Mutant(
        "client-does-not-check-the-opening-nonce-length",
        "engine_adapters/client.py",
        (("if len(r.opening_nonce) < 16 or ", "if "),),
        ("tests/test_service.py::test_an_opening_whose_genesis_or_nonce_does_not_bind_it_is_refused[short_nonce]",),
    ),
    Mutant(
        "engine-takes-answers-from-another-slots-verdict-area",
        "sidecar/ring.py",
        (
            (
                "        lane = self._lane(slot)\n        head = LANE_REQUEST\n",
                "        lane = self._lane((slot + 1) % self.layout.slot_count)\n        head = LANE_REQUEST\n",
            ),
        ),
        ("tests/test_ring.py::test_the_engine_takes_a_slots_answers_from_that_slots_verdict_area_only",),
    ),
    Mutant(
        "engine-does-not-recheck-the-verdict-area-after-the-copy",
        "sidecar/ring.py",
        (
            (
                '        if int.from_bytes(lane[head : head + 8], "little") != frame_seq:\n'
                "            return None\n        return out, service_us",
                "        return out, service_us",
            ),
        ),
        ("tests/test_ring.py::test_the_engine_refuses_answers_whose_verdict_area_changed_while_they_were_copied",),
    ),
    Mutant(
        "node-client-writes-a-frame-without-making-its-seq-odd",
        "clients/node/fse.js",
        (("    fs.writeSync(this.fd, u64(seq + 1n), 0, 8, base); // odd: being written\n", ""),),
        ("tests/test_node_client.py::test_the_node_client_passes_the_conformance_vectors",),
    ),
    Mutant(
        "batch-reader-skips-the-seqlock-check-before-the-copy",
        "sidecar/ring.py",
        (
            (
                '            now, n = struct.unpack_from("<QI", head)\n            self._check_seq(slot, seq, now)\n'
                "        except FseError as exc:\n            return [exc] * len(wanted)",
                '            now, n = struct.unpack_from("<QI", head)\n'
                "        except FseError as exc:\n            return [exc] * len(wanted)",
            ),
        ),
        ("tests/test_ring.py::test_a_batch_frame_published_before_it_was_whole_is_refused_for_every_row",),
    ),
    Mutant(
        "batch-reader-skips-the-seqlock-check-after-the-copy",
        "sidecar/ring.py",
        (
            (
                "            self._read_exact(memoryview(self._seq_now), base)\n"
                '            self._check_seq(slot, seq, int.from_bytes(self._seq_now, "little"))\n'
                "        except FseError as exc:\n            return [exc] * len(wanted)",
                "            self._read_exact(memoryview(self._seq_now), base)\n"
                "        except FseError as exc:\n            return [exc] * len(wanted)",
            ),
        ),
        ("tests/test_ring.py::test_a_batch_frame_replaced_while_its_rows_are_copied_is_refused_for_every_row",),
    ),
    Mutant(
        "audit-writer-leaves-a-failed-write-half-written",
        "sidecar/audit.py",
        (("os.ftruncate(self._fd, self._size)", "pass"),),
        ("tests/test_audit_verify.py::test_a_failed_audit_write_is_cut_back_to_the_last_whole_frame",),
    ),
    Mutant(
        "audit-verify-skips-the-prev-chain-hash-link",
        "sidecar/core/ledger.py",
        (('if rec["prev_chain_hash"] != prev.hex():', "if False:"),),
        ("tests/test_audit_verify.py::test_a_frame_whose_prev_chain_hash_field_lies_is_broken_even_if_its_chain_hash_holds",),
    ),
    Mutant(
        "audit-verify-skips-the-receipt-signature",
        "sidecar/core/ledger.py",
        (("why = check_receipt(statement, check, what)", 'why = ""'),),
        ("tests/test_audit_verify.py::test_a_forged_receipt_signature_is_broken_with_the_key",),
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
