# syntax=docker/dockerfile:1
# The fse sidecar. Build from the repository root:
#   docker build -f deploy/images/sidecar.Dockerfile -t libfse/fse-sidecar:0.2.0 .
# The final stage has no compiler and no pip cache; it runs as the numeric user 10001
# (the pod's runAsUser) with a read-only root filesystem. The signing key is not in the
# image: it comes from the Secret mounted at /var/run/secrets/fse.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
COPY engine_adapters/ engine_adapters/
# every dependency installs from a manylinux wheel (grpcio, numpy, pyahocorasick, hyperscan,
# cryptography): nothing is compiled; pip byte-compiles, so a read-only /opt/venv is fine
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --prefer-binary .

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
