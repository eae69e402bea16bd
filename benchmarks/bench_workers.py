"""Worker threads against worker processes (``worker_kind``), under the training steps that matter to them.

The same loader (CPU, the default decoder, uint8, batch 8, centre crop) with its workers as threads and as DALI's
processes, after a simulated training step of each kind (``dali_arb.tools.bench.STEP_WORKS``): none (the loader flat
out), ``sleep`` (a GPU step: the CPU is free), ``torch`` (a loop dispatching small tensor ops: PyTorch releases the
GIL inside each op) and ``python`` (pure Python holding the GIL: the worst case for threads). Each measurement runs
in a fresh process, as a training job holds one loader; kinds alternate over the rounds; the median round counts.
Images per second, the loader's wait per step, and threads / processes.

``python -m benchmarks workers [--photos DIR]``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import case, photo_manifest

KINDS = {"thread": "threads", "process": "processes"}
ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
from dali_arb import DALIBucketIterator
from dali_arb.tools.bench import _time
manifest, kind, workers, work, step_ms, batches = sys.argv[1:7]
it = DALIBucketIterator(manifest, batch_size=8, device="cpu", crop="center", dtype="uint8", workers=int(workers),
                        worker_kind=kind, rank=0, world_size=1)
def stream():
    while True:
        yield from it
batches_of = stream()
for _ in range(4):  # start the workers, warm up
    next(batches_of)
timed = _time(batches_of, int(batches), lambda b: 0, float(step_ms) / 1000, work)
print(json.dumps({"seconds": timed["seconds"], "wait_s": sum(timed["waits"]) / len(timed["waits"])}))
"""


def _measure(manifest: Path, kind: str, workers: int, work: str, step_ms: float, batches: int) -> dict:
    args = [str(manifest), kind, str(workers), work, str(step_ms), str(batches)]
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=600, check=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


@case("workers")
def workers(args) -> dict:
    cores = os.cpu_count() or 1
    count = 64 if args.quick else 256
    batches, rounds = (8, 1) if args.quick else (32, 3)
    settings = [("sleep", 0.0), ("sleep", 60.0), ("torch", 60.0), ("python", 60.0)]
    out: dict = {"cores": cores}
    with photo_manifest(args, count, min_mp=args.min_mp, max_mp=args.max_mp, seed=1) as manifest:
        for worker_count in sorted({1, cores}):
            for work, step_ms in settings:
                runs: dict[str, list] = {kind: [] for kind in KINDS}
                for r in range(rounds):
                    order = list(KINDS) if r % 2 == 0 else list(reversed(KINDS))
                    for kind in order:
                        runs[kind].append(_measure(manifest, kind, worker_count, work, step_ms, batches))
                label = f"{worker_count} worker(s), " + (f"{work} step {step_ms:g} ms" if step_ms else "no step")
                rates = {}
                for kind, timed in runs.items():
                    median = sorted(timed, key=lambda t: t["seconds"])[len(timed) // 2]
                    rates[kind] = batches * 8 / median["seconds"]
                    out[f"{label}: {KINDS[kind]} img/s; wait ms per step"] = (
                        f"{rates[kind]:.1f}; {1000 * median['wait_s']:.1f}"
                    )
                out[f"{label}: threads / processes"] = f"{rates['thread'] / rates['process']:.2f}x"
    return out
