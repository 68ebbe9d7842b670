# hms-sidecar's image. docs/image.md explains it; build with:
#   docker build -t hms-sidecar .

# One base for both stages: the venv built in one runs in the other, and its scripts
# name the interpreter by path (/usr/local/bin/python). The tag says what it is; the
# digest (the multi-platform index, as docker-library/repo-info records it) makes it so.
FROM python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3 AS base

# --- builder: /opt/venv with the locked dependencies and the project, compiled ---------
FROM base AS builder
ARG VENV=/opt/venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# The venv has no pip of its own (the base image's pip installs into it), so the image
# carries nothing the sidecar does not run. Locked wheels only, each checked against its
# hash, and no resolving (--no-deps: the lock is the whole set). A layer of its own, so
# a change to the code reuses it.
COPY requirements/runtime.txt requirements/build.txt requirements/
RUN python -m venv --without-pip "$VENV" \
    && python -m pip --python "$VENV/bin/python" install --no-cache-dir --no-compile \
        --require-hashes --only-binary=:all: --no-deps --requirement requirements/runtime.txt

# The compiled hot path (scripts/compile.py: mypyc, docs/operations.md): a C compiler
# from the base image's Debian (its version follows the pinned digest, hence unpinned
# here; skipped where one is already installed), and a second throwaway venv with
# runtime.txt's exact pins plus mypy, for the type information mypyc compiles from.
COPY requirements/compile.txt requirements/
# hadolint ignore=DL3008
RUN if ! command -v gcc >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python -m venv --without-pip .compile-env \
    && python -m pip --python .compile-env/bin/python install --no-cache-dir --no-compile \
        --require-hashes --only-binary=:all: --no-deps --requirement requirements/compile.txt

# The project: a wheel built by the locked setuptools (--no-build-isolation: nothing
# unpinned is downloaded to build it) in a throwaway venv, installed without its
# dependencies (they are in already), and its hot path compiled to C extensions beside
# the .py files it replaces (the `started` log line says `hot_path: compiled`). Then
# everything in the venv is compiled to bytecode once, and marked never to be checked
# against its source: nothing is compiled or written at run time, which a read-only
# root filesystem requires.
COPY pyproject.toml README.md ./
COPY scripts/compile.py scripts/
COPY sidecar/ sidecar/
RUN python -m venv --without-pip .build-env \
    && python -m pip --python .build-env/bin/python install --no-cache-dir --no-compile \
        --require-hashes --only-binary=:all: --no-deps --requirement requirements/build.txt \
    && python -m pip --python .build-env/bin/python wheel --no-cache-dir --no-deps \
        --no-build-isolation --wheel-dir dist . \
    && python -m pip --python "$VENV/bin/python" install --no-cache-dir --no-compile \
        --no-deps --no-index dist/hms_sidecar-*.whl \
    && .compile-env/bin/python scripts/compile.py --root "$VENV/lib/python3.11/site-packages" \
    && "$VENV/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$VENV/lib"

# --- the image ----------------------------------------------------------------------
FROM base
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="hms-sidecar" \
      org.opencontainers.image.description="Service sidecar: Consul registration, localhost proxy with circuit breakers, durable event relay, OpenTelemetry" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# A numeric user (Kubernetes' runAsNonRoot checks the number) without a home; the spool
# directory, the only place the sidecar writes, owned by it. The base image ships the
# standard library without bytecode: compile it here, for the same reason as the venv.
RUN groupadd --gid 10001 sidecar \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
    && install --directory --owner=10001 --group=10001 --mode=0700 /var/lib/sidecar \
    && python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        -x '/(site-packages|ensurepip|idlelib|lib2to3|tkinter|turtledemo)/' \
        /usr/local/lib/python3.11

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_SPOOL_PATH=/var/lib/sidecar/spool.db
VOLUME ["/var/lib/sidecar"]
USER 10001:10001

# 4001: the app-facing API (it listens on 127.0.0.1 unless SIDECAR_LISTEN says
# otherwise: the app shares the pod's network). 9902: the admin API (/live, /ready,
# /metrics).
EXPOSE 4001 9902
# The sidecar is PID 1 and needs no init: it handles SIGTERM and SIGINT itself (drain,
# then exit 0) and starts no child processes to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
CMD ["run"]
