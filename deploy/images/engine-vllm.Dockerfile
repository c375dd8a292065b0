# syntax=docker/dockerfile:1
# vLLM's OpenAI-compatible server under the guard: `fse-vllm serve` adds the fse logits processor
# (engine_adapters.vllm: every request guarded) and its middleware (engine_adapters.vllm_api).
# Build from the repository root:
#   docker build -f deploy/images/engine-vllm.Dockerfile -t libfse/fse-engine-vllm:0.2.0 .
# vLLM's own image carries CUDA, PyTorch and vLLM; this adds the libfse client into its
# Python and runs it as the pod's numeric user.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

FROM ${VLLM_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/libfse
COPY pyproject.toml README.md LICENSE ./
COPY sidecar/ sidecar/
COPY engine_adapters/ engine_adapters/
# as a library user installs it into an engine's environment: pyproject.toml's ranges, resolved
# against what vLLM's image has (no constraints file: vLLM's own pins stand)
RUN python3 -m pip install .
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["fse-vllm", "serve"]
