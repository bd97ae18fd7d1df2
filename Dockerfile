# The meshplane image: `docker build -t meshplane:dev .` (docs/deploying.md).
#
# Two stages on the same pinned base. The build stage builds a wheel of meshplane from
# this source tree and installs it, with its dependencies, into the venv /opt/meshplane.
# The final stage copies only that venv: no compiler, no pip, no pip cache and no
# source tree. It runs as UID 10001 and writes nothing at run time, so it runs with a
# read-only root filesystem (`docker run --read-only`, readOnlyRootFilesystem: true).
# Checked by tests/test_deploy.py.

# ---- build: wheel from the source tree, installed into a venv ---------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY meshplane ./meshplane

# Every dependency comes as a prebuilt wheel (--only-binary): nothing is compiled here.
# The last line is a smoke test: `meshplane --help` imports the whole server.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/meshplane \
    && /opt/meshplane/bin/pip install --no-cache-dir --only-binary=:all: /wheels/meshplane-*.whl \
    && /opt/meshplane/bin/pip check \
    && /opt/meshplane/bin/pip uninstall --yes pip setuptools \
    && /opt/meshplane/bin/meshplane --help > /dev/null

# ---- final: the venv on the slim base, non-root, read-only friendly ---------------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="meshplane" \
      org.opencontainers.image.description="An Envoy xDS control plane for multi-cluster, multi-region locality failover" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

# No .pyc writes at run time (the venv's bytecode was compiled at install); logs unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/meshplane/bin:$PATH

# The user the Kubernetes manifests name (runAsUser: 10001). pip, setuptools and wheel of
# the base image go too: nothing in this image installs anything.
RUN groupadd --system --gid 10001 meshplane \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin meshplane \
    && python -m pip uninstall --yes --no-cache-dir pip setuptools wheel

COPY --from=build /opt/meshplane /opt/meshplane

WORKDIR /etc/meshplane
USER 10001:10001

# 18000: ADS (gRPC, xDS); 18001: /metrics, /ready, /healthz, /debug.
EXPOSE 18000 18001

ENTRYPOINT ["meshplane"]
CMD ["serve", "--help"]
