#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine (../shared/gpu/README.md). Figures go under $OUT:
#   device.txt     date, GPU, versions, NVIDIA_DRIVER_CAPABILITIES, /dev/shm, and whether the hardware
#                  JPEG decoder exists (nvImageCodec restricted to HW_GPU_ONLY: DALI hides its absence)
#   gpu-tests.txt  the GPU test tier: shapes, dtype, device, pixels against the CPU path, bad files and
#                  formats on the GPU decoder, flat GPU memory across bucket switches
#   bench-gpu.*    the loader on the GPU vs DataLoader + torchvision decode_jpeg(device="cuda") and
#                  DataLoader + Pillow (plain, draft) on all cores, same plan and output
#   sweep.*        hw_decoder_load x DALI threads, beside the same peers
#   bench-cpu.*    the CPU path and its peers on the same machine
#
#   after wheels.sh install:  export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
#
# The machine needs, besides DALI and torch: numpy, pyarrow, pillow, tqdm, matplotlib, pytest,
# hypothesis (and torchvision for its peer; stage wheels with DALI's if the machine lacks them).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
{
    date -u
    nvidia-smi -L
    python3 -c 'import nvidia.dali as d, torch; print("DALI", d.__version__, "torch", torch.__version__)'
    echo "NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-<unset>}"
    df -h /dev/shm
    python3 benchmarks/hw_decoder.py
} 2>&1 | tee "$OUT/device.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tail -n 30 | tee "$OUT/gpu-tests.txt"
python3 -m benchmarks loader --device gpu --images "${IMAGES:-3000}" --json "$OUT/bench-gpu.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench-gpu.txt"
python3 -m benchmarks gpu_sweep --device gpu --images "${SWEEP_IMAGES:-2000}" --json "$OUT/sweep.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/sweep.txt"
python3 -m benchmarks loader --device cpu --images "${CPU_IMAGES:-512}" --json "$OUT/bench-cpu.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench-cpu.txt"
