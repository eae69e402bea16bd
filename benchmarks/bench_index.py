"""Indexer: JPEG headers per second from local disk, against decoding every image (what slow trainers do)."""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from . import case


def _make(args: tuple[str, int, int]) -> None:
    folder, start, stop = args
    from PIL import Image

    rng = np.random.default_rng(start)
    import dali_arb

    base = np.asarray(Image.open(Path(dali_arb.__file__).parent / "samples" / "hubble.jpg").convert("RGB"))
    for i in range(start, stop):
        h, w = int(rng.integers(64, 256)), int(rng.integers(64, 256))
        y, x = int(rng.integers(0, base.shape[0] - h)), int(rng.integers(0, base.shape[1] - w))
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(base[y : y + h, x : x + w]).save(os.path.join(sub, f"{i:06d}.jpg"), quality=85)


def _decode_all(paths: list[str]) -> int:
    from PIL import Image

    for p in paths:
        with Image.open(p) as img:
            img.convert("RGB")
    return len(paths)


@case("index")
def index(args) -> dict:
    from dali_arb.index import build_index

    n = 2000 if args.quick else 20_000
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        step = 1000
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_make, [(str(folder), s, min(s + step, n)) for s in range(0, n, step)]))
        os.sync()
        summary = build_index([str(folder)], Path(tmp) / "m.parquet", workers=workers, progress=False)
        paths = sorted(str(p) for p in folder.rglob("*.jpg"))[:2000]
        start = time.perf_counter()
        with ProcessPoolExecutor(workers) as pool:
            decoded = sum(pool.map(_decode_all, [paths[i::workers] for i in range(workers)]))
        t_decode = time.perf_counter() - start
        summary2 = build_index([str(folder)], Path(tmp) / "m.parquet", workers=workers, update=True, progress=False)
    decode_rate = decoded / t_decode
    return {
        f"index {n} JPEGs, {workers} processes: files/s (goal >= 2000)": round(summary.files_per_s),
        "  decode-every-image files/s (same processes)": round(decode_rate),
        "  ratio": f"{summary.files_per_s / decode_rate:.1f}x",
        "  --update on the unchanged folder: files/s": round(summary2.files_per_s),
    }
