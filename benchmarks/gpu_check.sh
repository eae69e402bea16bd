#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine (../shared/gpu/README.md). Each step runs under its
# own time limit, most important first, so a slow step costs only itself. Figures go under $OUT:
#   device.txt       date, GPU, driver, cores, versions, NVIDIA_DRIVER_CAPABILITIES, /dev/shm, and whether the
#                    hardware JPEG decoder exists (nvImageCodec restricted to HW_GPU_ONLY: DALI hides its absence)
#   gpu-tests.txt    the GPU test tier: shapes, dtype, device, pixels against the CPU path, pairs and masks, bad
#                    files and formats on the GPU decoder, resume, flat GPU memory across bucket switches (one
#                    batch size, and batch sizes by bucket from a pixel budget: issue 20)
#   example.txt      examples/diffusers_sdxl.py --tiny on the GPU (needs diffusers: carry its wheel in .whl)
#   cpu.*            the CPU path on every core against the OpenCV, Pillow and torchvision peers, and with worker
#                    processes beside its default worker threads
#   bench-gpu.*      the loader on the GPU vs DataLoader + torchvision decode_jpeg(device="cuda") and
#                    DataLoaders with OpenCV reduced decode, Pillow draft and Pillow on all cores; PSNR, overhead
#   sweep.*          hw_decoder_load x DALI threads, the OpenCV decoder feeding the GPU, beside the same peers
#   video.*          clips (issue 21): the loader with NVDEC (video_decoder="dali_video") vs torchcodec's CUDA decoder
#                    (when installed) vs DataLoader + PyAV on every core vs the CPU loader, frames/s, same plan; the
#                    GPU video tests (NVDEC frames against the CPU workers') run in gpu-tests
#
#   after wheels.sh install:  export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
#   STEPS (default: all, in this order): device gpu-tests example cpu bench-gpu sweep video
#   limits (s): TESTS_S EXAMPLE_S CPU_S BENCH_S SWEEP_S VIDEO_S; sizes: IMAGES, MIN_MP, MAX_MP; TESTS (pytest -k)
#
# The machine needs, besides DALI and torch: numpy, pyarrow, pillow, opencv, tqdm, matplotlib, pytest,
# hypothesis (and torchvision for its peer; stage wheels with DALI's if the machine lacks them); for video: av (PyAV,
# FFmpeg inside its wheel) and, for its peer, a torchcodec built for the machine's torch and CUDA.
set -uo pipefail
OUT=${OUT:-out}
PHOTOS=${PHOTOS:-/tmp/dali-arb-photos}
STEPS=${STEPS:-device gpu-tests example cpu bench-gpu sweep video}
mkdir -p "$OUT" "$PHOTOS"
export PYTHONUNBUFFERED=1
sizes=(--images "${IMAGES:-1600}" --min-mp "${MIN_MP:-1}" --max-mp "${MAX_MP:-4}" --photos "$PHOTOS")

step() {  # step NAME SECONDS COMMAND...: output to $OUT/NAME.txt (and the console), exit status logged
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | grep -v -i -E 'warn(ing)?[: ]|nvjpeg2k|nvtiff|nvTIFF|nvJPEG2000|^Note: ' \
        | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$OUT/$name.txt"
}

step device 90 bash -c '
    date -u; nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    echo "cores $(nproc), memory $(free -g | awk "/Mem:/ {print \$2}") GiB"
    python3 -c "import nvidia.dali as d, torch, cv2, PIL; print(\"DALI\", d.__version__, \"torch\", torch.__version__, \"opencv\", cv2.__version__, \"Pillow\", PIL.__version__)"
    python3 -c "import torchvision; print(\"torchvision\", torchvision.__version__)" || echo "torchvision missing"
    echo "NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-<unset>}"
    df -h /dev/shm
    python3 benchmarks/hw_decoder.py'
step gpu-tests "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -m gpu -k "${TESTS:-}" tests
step example "${EXAMPLE_S:-120}" bash -c 'python3 -m dali_arb index dali_arb/samples -o "$0/samples.parquet" -q &&
    python3 examples/diffusers_sdxl.py "$0/samples.parquet" --tiny --device gpu --epochs 3 --max-steps 8' "$PHOTOS"
step cpu "${CPU_S:-180}" python3 -m benchmarks cpu_cores "${sizes[@]}" --json "$OUT/cpu.json"
step bench-gpu "${BENCH_S:-240}" python3 -m benchmarks loader --device gpu "${sizes[@]}" --json "$OUT/bench-gpu.json"
step sweep "${SWEEP_S:-240}" python3 -m benchmarks gpu_sweep --device gpu "${sizes[@]}" --json "$OUT/sweep.json"
step video "${VIDEO_S:-240}" python3 -m benchmarks video_gpu ${VIDEO_QUICK:+--quick} --json "$OUT/video.json"
