# syntax=docker/dockerfile:1
# The fse sidecar. Build from the repository root:
#   docker build -f deploy/images/sidecar.Dockerfile -t libfse/fse-sidecar:0.2.0 .
# The final stage has no compiler and no pip cache; it runs as the numeric user 10001
# (the pod's runAsUser) with a read-only root filesystem. The signing key is not in the
# image: it comes from the Secret mounted at /var/run/secrets/fse.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc for the compiled fast path only (sidecar/accel.py); the final stage has no compiler
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY sidecar/ sidecar/
COPY engine_adapters/ engine_adapters/
# at the tested versions (constraints.txt); every dependency installs from a manylinux wheel (grpcio, numpy, pyahocorasick, hyperscan,
# cryptography); pip byte-compiles, so a read-only /opt/venv is fine. Then the pure core and
# the service are compiled with mypyc into site-packages/sidecar/_accel (its manifest holds
# the installed sources' hashes), the build's tools leave the venv, and the build fails
# unless the installed sidecar loads the compiled modules.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --prefer-binary -c constraints.txt . \
    && /opt/venv/bin/pip install -c constraints.txt mypy setuptools \
    && /opt/venv/bin/fse-sidecar accel build \
    && /opt/venv/bin/pip uninstall -y mypy mypy_extensions librt pathspec \
    && /opt/venv/bin/fse-sidecar accel status --require

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# the wire contract (guard.proto, PROTOCOL.md, VERDICT.md, RING.md, vectors.json) and the
# default configuration with its default policy (the pod's ConfigMap replaces /etc/fse)
COPY proto/fse/ /usr/share/fse/proto/fse/
COPY deploy/kustomize/base/sidecar.yaml /etc/fse/sidecar.yaml
USER 10001:10001
EXPOSE 8081 9464
ENTRYPOINT ["/opt/venv/bin/fse-sidecar", "serve", "--config", "/etc/fse/sidecar.yaml"]
