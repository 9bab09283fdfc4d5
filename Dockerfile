# inferq images. Two targets:
#   docker build --target client -t inferq-client .   # API, enqueue, poll, score: no torch/onnxruntime
#   docker build -t inferq-worker .                     # default (last stage): workers + model builds
#
# The worker image takes CPU torch from PyTorch's CPU index (hundreds of MB rather than
# several GB of CUDA wheels). For a CUDA torch, point TORCH_INDEX_URL at a CUDA index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# or set it empty to take PyPI's default (CUDA) build. Today that buys nothing: workers
# run models through onnxruntime's CPUExecutionProvider and `inferq models build` trains
# on the CPU. GPU inference needs onnxruntime-gpu and a CUDA provider in workers/runtimes/onnx.py.
#
# Only Dockerfile syntax that the legacy builder understands (no RUN --mount, no
# heredocs), so docker-compose 1.29 can build it as well as BuildKit.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    INFERQ_MODEL_REPO=/app/models
RUN groupadd --system --gid 10001 inferq \
    && useradd --system --uid 10001 --gid inferq --create-home --home-dir /home/inferq \
       --shell /usr/sbin/nologin inferq \
    && python -m venv /opt/venv
# The source sits in /src, not /app: `python -c` run from /app must import the installed
# package, not a source tree in the working directory. Only what the wheel needs is
# copied, so editing tests or docs does not invalidate the pip layer.
WORKDIR /src
COPY pyproject.toml ./
COPY shared/ shared/
COPY producer/ producer/
COPY workers/ workers/
COPY api/ api/
COPY cli/ cli/


FROM base AS client
# The HTTP API and direct broker access; `pip install inferq` alone is the HTTP client.
RUN pip install ".[api,tracing,s3,sqs]"
WORKDIR /app
USER inferq
ENTRYPOINT ["inferq"]
CMD ["--help"]


FROM base AS worker
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch==2.13.0 is pinned by the worker extra; from the CPU index pip picks 2.13.0+cpu
# (a local version sorts above plain 2.13.0). An empty TORCH_INDEX_URL means PyPI only.
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[worker,tracing,s3,sqs]"
WORKDIR /app
# Created and owned here, before VOLUME: a new named volume is seeded from the image's
# folder, ownership included, so the non-root `models` one-shot can write into it.
RUN mkdir -p /app/models && chown inferq:inferq /app/models
VOLUME ["/app/models"]
USER inferq
ENTRYPOINT ["inferq"]
CMD ["worker"]
