# Shimmy on the CPU: one node (`shimmy serve`) or the front (`shimmy route`).
#   docker build -t shimmy-server .
#   docker run --rm -p 127.0.0.1:11435:11435 -v "$PWD/models:/models:ro" shimmy-server
# Models are read from /models; every SHIMMY_* variable works (docs/configuration.md).
# The CUDA build is Dockerfile.cuda; docs/deployment.md has compose and Kubernetes.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: llama-cpp-python compiled once, into a virtual environment that the runtime copies
FROM ${PYTHON_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# A portable build (no -march=native): the image runs on CPUs other than the one that built it.
# AMX kernels stay out, as in the Makefile (docs/performance.md says why).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shimmy_core shimmy_core
COPY plugins plugins
# The demo extra lets a bare `docker run` answer at once; build with --build-arg EXTRAS= to leave it out.
ARG EXTRAS=demo
RUN python -m venv /opt/shimmy \
    && /opt/shimmy/bin/pip install --upgrade pip setuptools wheel \
    && /opt/shimmy/bin/pip install ".${EXTRAS:+[$EXTRAS]}"

# ---- runtime: the environment and nothing that built it
FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shimmy \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/shimmy shimmy \
    && mkdir /models && chown shimmy:shimmy /models
COPY --from=build /opt/shimmy /opt/shimmy
# Inside a container Shimmy must listen on every interface; publish the port on 127.0.0.1 (as
# compose.yaml does) or set SHIMMY_API_KEY before publishing it further.
ENV PATH=/opt/shimmy/bin:$PATH \
    SHIMMY_HOST=0.0.0.0 \
    SHIMMY_PORT=11435 \
    SHIMMY_MODEL_PATHS=/models \
    SHIMMY_HOME=/home/shimmy/.shimmy \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/shimmy
VOLUME ["/models"]
EXPOSE 11435
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('SHIMMY_PORT', '11435'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["shimmy"]
CMD ["serve"]
