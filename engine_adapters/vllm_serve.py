"""``fse-vllm``: vLLM's OpenAI server with the guard in it, and the embedded model for it.

    fse-vllm serve MODEL [vLLM's own options ...]
    fse-vllm model DIR        # the embedded SmolLM2 as a Hugging Face folder vLLM can load

``serve`` runs ``vllm.entrypoints.openai.api_server`` in this process (vLLM's CPU build
has no working ``vllm`` console script) with the guard's two pieces added:
``--logits-processors engine_adapters.vllm:FseLogitsProcessor`` (every request guarded,
in the engine process) and ``--middleware engine_adapters.vllm_api.FseGuardMiddleware``
(what the client sees: ``content_filter``, 503, error events), and the directory they
share (``FSE_OUTCOMES_DIR``; made under /dev/shm and removed at exit unless given).
The sidecar comes from ``FSE_SIDECAR`` and ``FSE_PUBLIC_KEY``; the policies from
``FSE_POLICY`` and ``FSE_POLICIES`` (engine_adapters/vllm.py).
"""

from __future__ import annotations

import argparse
import atexit
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

from sidecar.about import add_version_flag

from .outcomes import OutcomeBoard

PROCESSOR = "engine_adapters.vllm:FseLogitsProcessor"
MIDDLEWARE = "engine_adapters.vllm_api.FseGuardMiddleware"
_OWN = ("--logits-processors", "--middleware")


def vllm_argv(model: str, rest: list[str]) -> list[str]:
    """vLLM's command line: the operator's options, then the guard's two."""
    taken = [a for a in rest if a.split("=")[0] in _OWN]
    if taken:
        raise SystemExit(f"fse-vllm serve: {', '.join(taken)} is set by fse-vllm itself (the guard's processor and middleware)")
    return ["vllm-openai-server", "--model", model, *rest, "--logits-processors", PROCESSOR, "--middleware", MIDDLEWARE]


def outcomes_dir() -> Path:
    """FSE_OUTCOMES_DIR, or a fresh private directory removed at exit; either way the rings
    the engine listed there are unlinked at exit (vLLM SIGKILLs its workers)."""
    given = os.environ.get("FSE_OUTCOMES_DIR")
    if given:
        d = Path(given)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        d = Path(tempfile.mkdtemp(prefix="fse-vllm-outcomes-", dir=base))
        atexit.register(shutil.rmtree, d, True)  # registered first: runs after the rings' release
        os.environ["FSE_OUTCOMES_DIR"] = str(d)
    atexit.register(OutcomeBoard(d).release_rings)
    return d


def serve(model: str, rest: list[str]) -> None:
    missing = [k for k in ("FSE_SIDECAR", "FSE_PUBLIC_KEY") if not os.environ.get(k)]
    if missing:
        raise SystemExit(f"fse-vllm serve: set {' and '.join(missing)} (the sidecar's address and its verifying key file)")
    argv = vllm_argv(model, rest)
    outcomes_dir()
    sys.argv = argv
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="fse-vllm", description=__doc__.split("\n\n")[0])
    add_version_flag(p, "fse-vllm")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="vLLM's OpenAI server, every request guarded (vLLM's own options follow MODEL)")
    s.add_argument("model")
    m = sub.add_parser("model", help="write the embedded SmolLM2 as a Hugging Face folder (float32 safetensors, ~540 MB)")
    m.add_argument("dir", type=Path)
    known, rest = p.parse_known_args(args)
    if known.cmd == "serve":
        serve(known.model, rest)
        return 0
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    from .hf import save_embedded

    print(save_embedded(known.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
