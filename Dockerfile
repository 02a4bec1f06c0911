# syntax=docker/dockerfile:1
# The modgate gateway image: the HTTP API and the `modgate` CLI (prompts, keys, config checks).
# No vLLM and no GPU libraries: models run in the RayService's Ray image (k8s/).
#
#   docker build -t modgate:0.1.0 .
#   docker run --rm modgate:0.1.0 --help
# In Kubernetes (k8s/base/gateway.yaml) it runs `modgate gateway --config /etc/modgate/modgate.yaml`
# with the config and prompts mounted from ConfigMaps.
#
# Runs as uid/gid 10001 and works with a read-only root filesystem: it writes only to
# /var/lib/modgate (data_dir) and /tmp, which Kubernetes mounts as emptyDirs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package needs (see .dockerignore): metadata first, then the three packages.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY serving ./serving
COPY prompt_registry ./prompt_registry
# Wheels for modgate and every dependency, without the cpu/gpu extras (no vLLM, no torch).
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="modgate" \
      org.opencontainers.image.description="modgate gateway: versioned moderation prompts served on vLLM via Ray Serve"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 modgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/modgate --no-create-home \
        --shell /usr/sbin/nologin modgate \
 && mkdir -p /var/lib/modgate /etc/modgate \
 && chown 10001:10001 /var/lib/modgate
# Install from the wheels only (no index): exactly what the build stage resolved. pip compiles
# the .pyc files here, so nothing needs writing at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels modgate \
 && modgate --help >/dev/null
USER 10001:10001
WORKDIR /var/lib/modgate
EXPOSE 8080
ENTRYPOINT ["modgate"]
CMD ["gateway", "--config", "/etc/modgate/modgate.yaml"]
