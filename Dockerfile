# dali_arb on a CUDA 12 runtime: Python, the project, torch, and DALI's cuda120 build.
#
#   docker build -t dali-arb .
#   docker run --rm --gpus all --ipc=host dali-arb                       # the demo, on the GPU
#   docker run --rm --gpus all --ipc=host -v /data:/data dali-arb \
#       dali-arb index /data/photos -o /data/photos.parquet
#   docker run --rm --gpus all --ipc=host -v /data:/data dali-arb \
#       torchrun --nproc_per_node=8 examples/train.py /data/photos.parquet
#
# --ipc=host (or --shm-size=8g): the loader's worker processes hand batches over in /dev/shm,
# and Docker's default of 64 MB is too small for them.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# "video" exposes the hardware JPEG decoder (the NVJPG engines of A100/H100) in the container:
# without it DALI cannot see the engine and falls back to slower CUDA decoding.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 arb

WORKDIR /opt/dali_arb
COPY pyproject.toml README.md ./
COPY dali_arb ./dali_arb
COPY examples ./examples
COPY tests ./tests
COPY support ./support
# torch from PyPI is the CUDA 12 build on Linux; the test extra lets `pytest -m gpu` run in here.
# The project's own pyproject.toml bounds every dependency.
# hadolint ignore=DL3013
RUN pip install --no-compile ".[test]"

USER 10001
WORKDIR /home/arb
CMD ["dali-arb", "demo", "--out", "/home/arb/dali-arb-demo"]
