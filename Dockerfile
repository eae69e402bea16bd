# dali_arb in a container: Python, the project, torch, and DALI's CUDA 12 build (docs/docker.md).
#
#   docker build -t dali-arb .
#   docker run --rm --gpus all --shm-size=8g dali-arb                    # the demo, on the GPU
#   docker run --rm --gpus all --shm-size=8g -v /data:/data dali-arb \
#       dali-arb index /data/photos -o /data/photos.parquet
#   docker run --rm --gpus all --shm-size=8g -v /data:/data dali-arb \
#       torchrun --nproc_per_node=8 examples/train.py /data/photos.parquet
#
# BASE: any Debian or Ubuntu image; the CUDA runtime image by default. On a plain Debian base
# (--build-arg BASE=debian:bookworm) the image runs on the CPU: scripts/container-check builds it so.
# TORCH: the torch requirement pip installs (PyPI's Linux torch is the CUDA build; e.g. torch==2.13.0+cpu
# with PIP_OPTS naming where that build lies). PIP_OPTS: extra pip options (--extra-index-url URL, --find-links DIR).
# EXTRAS: the project's extras; "test" lets `python -m pytest` run in here.
#
# --shm-size=8g (or --ipc=host): the loader's worker processes hand batches over in /dev/shm,
# and Docker's default of 64 MB is too small for them.
ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE}

ARG TORCH=torch
ARG PIP_OPTS=""
ARG EXTRAS=test

# "video" exposes NVDEC (libnvcuvid, DALI's GPU video decoding) in the container, and where the toolkit gates it,
# the hardware JPEG decoder (the NVJPG engines of A100/H100/H200) that makes the GPU path fast (docs/docker.md).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# python3-venv brings ensurepip (Debian and Ubuntu split it out of python3); ca-certificates for pip's HTTPS
# and for object storage (s3://, gs://) at run time; passwd for useradd on minimal bases.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates passwd \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 arb

WORKDIR /opt/dali_arb
# The source tree (.dockerignore leaves out caches, build outputs and .git): the package, and what its tests read
# besides it (examples, support, docs and mkdocs.yml, benchmarks/RESULTS.md, README.md, Makefile).
COPY . ./
# The project's own pyproject.toml bounds every dependency. PIP_OPTS stays unquoted: it holds several words.
# hadolint ignore=DL3013,SC2086
RUN pip install --no-compile $PIP_OPTS "${TORCH}" ".[${EXTRAS}]" \
    && chown -R arb /opt/dali_arb

USER 10001
WORKDIR /home/arb
CMD ["dali-arb", "demo", "--out", "/home/arb/dali-arb-demo"]
