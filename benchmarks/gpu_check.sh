#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine (../shared/gpu/README.md): the GPU test
# tier, the loader benchmark on GPU and CPU against the Pillow baselines (a few thousand JPEGs of
# 0.8-3 MP), and GPU memory after warm-up vs after the run. Figures go under $OUT.
#
#   after wheels.sh install:  export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
#
# The machine needs, besides DALI and torch: numpy, pyarrow, pillow, tqdm, matplotlib, pytest,
# hypothesis (stage their wheels with DALI's if the machine lacks them).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
{ date -u; nvidia-smi -L; python3 -c 'import nvidia.dali as d, torch; print("DALI", d.__version__, "torch", torch.__version__)'; } \
    | tee "$OUT/device.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tail -n 30 | tee "$OUT/gpu-tests.txt"
python3 -m benchmarks loader --device gpu --images "${IMAGES:-3000}" --json "$OUT/bench-gpu.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench-gpu.txt"
python3 -m benchmarks loader --device cpu --images "${CPU_IMAGES:-512}" --json "$OUT/bench-cpu.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench-cpu.txt"
