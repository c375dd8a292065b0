"""The OpenMP wait policy the shipped llama.cpp engines set before libgomp loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine_adapters.omp import apply_wait_policy
from sidecar.errors import ConfigError


def test_each_policy_sets_libgomp_s_variables_and_the_operator_s_own_win() -> None:
    env: dict[str, str] = {}
    assert apply_wait_policy("bounded", env) == "bounded (GOMP_SPINCOUNT=1000)" and env == {"GOMP_SPINCOUNT": "1000"}
    env = {}
    assert apply_wait_policy("passive", env) == "passive (OMP_WAIT_POLICY=PASSIVE)" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert apply_wait_policy("default", env) == "default (libgomp's own)" and env == {}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_wait_policy("bounded", env) == "operator's OMP_WAIT_POLICY=ACTIVE" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    with pytest.raises(ConfigError, match="must be one of"):
        apply_wait_policy("spin", {})


def test_the_policy_is_refused_once_llama_cpp_has_loaded_libgomp() -> None:
    code = "import llama_cpp\nfrom engine_adapters.omp import apply_wait_policy\napply_wait_policy('bounded')"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "before llama_cpp is imported" in r.stderr
