"""Shared fixtures: key pairs, a real sidecar process on a Unix socket, the real model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine_adapters.llama_cpp import CHAT  # noqa: F401 - the tests' prompts import it from here
from sidecar.launch import LocalSidecar, free_port, start_local_sidecar  # noqa: F401 - tests import free_port from here
from sidecar.signing import generate_keypair


@dataclass
class Keys:
    private: Path
    public: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    priv, pub = generate_keypair(tmp_path_factory.mktemp("keys"))
    return Keys(priv, pub)


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    priv, pub = generate_keypair(tmp_path_factory.mktemp("other-keys"))
    return Keys(priv, pub)


@pytest.fixture
def start_sidecar(tmp_path: Path, keys: Keys) -> Iterator:
    """Start ``python -m sidecar serve`` in its own process, as deployed."""
    started: list[LocalSidecar] = []

    def start(policies: dict | None = None, signing: Keys | None = None, **config: object) -> LocalSidecar:
        d = tmp_path / f"sidecar{len(started)}"
        d.mkdir()
        k = signing or keys
        if policies:
            config["policies"] = policies
        sc = start_local_sidecar(d, config or None, (k.private, k.public))
        started.append(sc)
        sc.wait_started()
        return sc

    yield start
    for sc in started:
        sc.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's promtool (installed by `make test`)."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: run `make setup-prometheus` (Debian's prometheus package)")
    return exe


@pytest.fixture(scope="session")
def llama():
    """The embedded SmolLM2-135M through llama-cpp-python (installed by `make test`)."""
    from engine_adapters.llama_cpp import load_llama

    return load_llama(n_threads=2)


@pytest.fixture(scope="session")
def hf_model():
    """The embedded SmolLM2-135M through transformers' GGUF loader, float32 on the CPU
    (model, tokenizer), loaded once for the transformers and vLLM adapter tests."""
    from engine_adapters.hf import load_embedded

    return load_embedded()


# -- what the fault matrix and the fuzzing did, for scripts/gen_reliability.py ------------------
# With FSE_RELIABILITY_OUT=FILE, each fault-matrix case and each hostile-input test's outcome
# is written to FILE as JSON when the run ends (docs/reliability.md is made from it).
_OUTCOMES: list[dict] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    report = yield
    if os.environ.get("FSE_RELIABILITY_OUT") and (report.when == "call" or report.failed):
        marker = item.get_closest_marker("fault")
        params = getattr(getattr(item, "callspec", None), "params", {})
        _OUTCOMES.append(
            {
                "test": item.nodeid,
                "function": getattr(item, "originalname", item.name),
                "fault": marker.args[0] if marker else None,
                "lane": params.get("lane"),
                "outcome": report.outcome,
                "seconds": round(report.duration, 3),
            }
        )
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("FSE_RELIABILITY_OUT")
    if out:
        Path(out).write_text(json.dumps(_OUTCOMES, indent=1) + "\n")


def pytest_report_header() -> str:
    from sidecar import accel

    return f"libfse sidecar core: {accel.status().describe()}"
