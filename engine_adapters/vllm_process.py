"""vLLM's OpenAI server as a child process, guarded (``fse-vllm serve``) or not, for the
real-vLLM tests and ``fse-sidecar bench vllm``: vLLM's CPU build in this checkout's
``.venv-vllm`` and the embedded model as a Hugging Face folder in ``.fse-models``, both
made by ``make setup-vllm``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL_DIR = ROOT / ".fse-models" / "SmolLM2-135M-Instruct"
MODEL = "smollm2"  # the served model name
SETUP_HINT = "run `make setup-vllm` (vLLM's CPU build in .venv-vllm and the model in .fse-models)"


def missing() -> str | None:
    """What of the real-vLLM set-up is missing, or None."""
    if not VLLM_PYTHON.is_file():
        return f"{VLLM_PYTHON} is missing: {SETUP_HINT}"
    if not (MODEL_DIR / "config.json").is_file():
        return f"{MODEL_DIR} is missing: {SETUP_HINT}"
    return None


@dataclass
class VllmServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until vLLM's /health answers 200; raises with the log's tail if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start (exit {self.proc.poll()}):\n{self.log_text()[-6000:]}")
            time.sleep(0.5)

    def stop(self) -> int | None:
        """SIGTERM (vLLM's clean shutdown, the processor's atexit), then SIGKILL after 60 s.
        Returns once every process of the server's group is gone: vLLM's workers and
        multiprocessing's resource tracker outlive the server by a moment, and the tracker
        writes its shutdown report to the log as it leaves."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 30
        while group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in group_members(self.proc.pid):  # still there after 30 s: nothing of it may outlive stop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone while we looked
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def start_vllm(log: Path, *, guarded: bool, env: Mapping[str, str] = {}, max_num_seqs: int = 32) -> VllmServer:
    """vLLM's OpenAI server on the embedded model, float32, eager, on a free port:
    ``fse-vllm serve`` when ``guarded``, vLLM's own module otherwise."""
    port = free_port()
    if guarded:
        cmd = [str(VLLM_PYTHON), "-m", "engine_adapters.vllm_serve", "serve", str(MODEL_DIR)]
    else:
        cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR)]
    cmd += [
        "--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
        "--max-num-seqs", str(max_num_seqs), "--seed", "0",
    ]  # fmt: skip
    full_env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for a 135M model
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True)
    return VllmServer(proc, port, log)
