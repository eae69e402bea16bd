"""dali_arb's benchmark suite: ``python -m benchmarks [CASE ...] [--json FILE]``.

Each case compares side by side in one run and returns a dict of figures; the runner prints a
table and writes JSON. Cases register with :func:`case`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CASES: dict[str, Callable] = {}


def case(name: str):
    """Register a benchmark case: a function ``(args) -> dict`` of figures."""

    def register(fn: Callable) -> Callable:
        CASES[name] = fn
        return fn

    return register


@contextlib.contextmanager
def photo_manifest(args, count: int, *, min_mp: float, max_mp: float, seed: int) -> Iterator[Path]:
    """A manifest of ``count`` photo-like JPEGs of ``min_mp``..``max_mp`` megapixels (``make_photo_jpegs``).

    With ``--photos DIR`` the JPEGs and the manifest are made once under ``DIR/<count>-<min>-<max>-<seed>``
    and kept, so several cases (and several runs) time the same files without making them again;
    otherwise they live in a temporary folder for the case alone."""
    from dali_arb.index import build_index
    from dali_arb.tools.photos import make_photo_jpegs

    with contextlib.ExitStack() as stack:
        if getattr(args, "photos", None):
            root = Path(args.photos) / f"{count}-{min_mp:g}-{max_mp:g}-{seed}"
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        manifest = root / "m.parquet"
        if not manifest.exists():
            make_photo_jpegs(root / "photos", count, min_mp=min_mp, max_mp=max_mp, seed=seed)
            build_index([str(root / "photos")], manifest, progress=False)
        yield manifest


def loader_rows(result: dict) -> dict[str, str]:
    """One figure per loader a ``dali_arb.tools.bench.run_bench`` result timed: ``images/s (MP/s, p50/p99 ms)``."""
    from dali_arb.tools.bench import LOADER_NAMES

    return {
        f"  {label} images/s (MP/s, p50/p99 ms)": (
            f"{r['images_per_s']} ({r['megapixels_per_s']}, {r['batch_ms_p50']}/{r['batch_ms_p99']})"
        )
        for key, label in LOADER_NAMES.items()
        if isinstance(r := result.get(key), dict)
    }
