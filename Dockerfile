# syntax=docker/dockerfile:1
#
# genstruct-grpc image. Default: llama.cpp built with CUDA for GPU offload.
#   docker build -t genstruct-grpc .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -v "$PWD/models:/app/models" genstruct-grpc
# CPU-only image:
#   docker build -t genstruct-grpc:cpu --build-arg BUILD_IMAGE=python:3.11-slim-bookworm \
#     --build-arg RUNTIME_IMAGE=python:3.11-slim-bookworm --build-arg LLAMA_CMAKE_ARGS=-DGGML_CUDA=off .
#
# llama.cpp is compiled by tools/llama_build.py with its `portable` profile, as the local
# install and the benchmark's llama-server are: CPU code for every x86-64 level from plain
# SSE to AVX-512, the best one the host supports picked at run time (never the AMX one, which
# faults on some hosts), and CUDA for the architectures named below, so the image runs on
# other machines than the one that built it and no GPU is needed to build it. The install
# step is the Makefile's, the same one `make run` and CI use.

ARG BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${BUILD_IMAGE} AS build
# CUDA architectures, e.g. "89" for an L4 only; empty: tools/llama_build.py's explicit list.
ARG CUDA_ARCHITECTURES=
# Appended to the profile's CMake arguments; the linker flag (as in llama.cpp's own CUDA image)
# lets the link go through without the GPU driver, which the build machine does not have.
ARG LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    LLAMA_PROFILE=portable \
    LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS} \
    LLAMA_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} \
    LLAMA_WHEEL_CACHE=/tmp/llama-wheels
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY tools ./tools
COPY protos ./protos
COPY client ./client
COPY service ./service
COPY models/registry.toml ./models/registry.toml
RUN make .venv/.server && rm -rf /tmp/llama-wheels

FROM ${RUNTIME_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin genstruct
WORKDIR /app
COPY --from=build --chown=10001:10001 /app /app
# The models folder is a volume, which hides the registry beside it: keep a copy outside.
COPY --from=build /app/models/registry.toml /app/etc/registry.toml
ENV PATH=/app/.venv/bin:$PATH \
    GENSTRUCT_MODELS_DIR=/app/models \
    GENSTRUCT_MODEL_REGISTRY=/app/etc/registry.toml \
    GENSTRUCT_LOG_FORMAT=json \
    HF_HOME=/app/models/.cache
# Weights are mounted here (or downloaded here on first start).
VOLUME ["/app/models"]
USER 10001:10001
# gRPC and Prometheus metrics.
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["genstruct", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["genstruct-server"]
# Inside a container the service must be reachable from outside it: bind all interfaces,
# for the metrics port too (a wildcard --host alone keeps it on loopback).
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--metrics-host", "0.0.0.0"]
