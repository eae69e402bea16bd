"""The DALI graph: external source → decode → resize (cover, crop as ROI) → flip + normalise → NCHW.

Imports DALI lazily (inside functions), so the rest of dali_arb works without it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from .errors import ConfigError, DeviceError

__all__ = ["DTYPES", "build_pipeline", "gpu_count", "resolve_device"]

#: Output dtypes: DALI type name per public dtype (bfloat16 is made from float16 by torch).
DTYPES = {"float16": "FLOAT16", "bfloat16": "FLOAT16", "float32": "FLOAT", "uint8": "UINT8"}


def gpu_count() -> int:
    """CUDA devices DALI can see (0 without a GPU or a driver)."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return int(GetCUDADeviceCount())
    except Exception:
        return 0


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"gpu"`` when DALI sees a GPU, else ``"cpu"``; checks an explicit ``"gpu"``."""
    if device not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    if device == "auto":
        return "gpu" if gpu_count() > 0 else "cpu"
    if device == "gpu" and gpu_count() == 0:
        raise DeviceError("device 'gpu' asked for, but DALI sees no CUDA GPU; use device 'cpu' (or 'auto')")
    return device


def build_pipeline(
    source: Any,
    *,
    batch_size: int,
    device: str,
    device_id: int | None,
    dtype: str,
    num_threads: int | None = None,
    workers: int = 1,
    prefetch: int = 2,
    max_image_side: int = 0,
    decoded_input: bool = False,
) -> Any:
    """A built DALI pipeline whose outputs are ``(images, meta)``.

    ``images``: ``[B, 3, H, W]`` of ``dtype`` on the pipeline's device (H, W: the step's bucket);
    ``meta``: ``int64 [B, 9]`` on the CPU (``source.META_FIELDS``).

    Args:
        source: a :class:`~dali_arb.source.BatchSource`.
        device: ``"gpu"`` (nvJPEG / hardware decoder, ``mixed``) or ``"cpu"``.
        workers: Python worker processes reading bytes (DALI's parallel external source);
            0 reads in the main process (for tests and debugging).
        max_image_side: largest image side in the manifest: the GPU decoder preallocates for it.
        decoded_input: the source delivers finished crops (``uint8 HWC`` at the bucket size; the
            ``pillow`` decoder): no decode and no resize here.
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    threads = num_threads or (4 if gpu else max(1, os.cpu_count() or 1))
    out_type = getattr(types, DTYPES[dtype])
    raw = dtype == "uint8"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id if gpu else None,
        prefetch_queue_depth=prefetch,
        py_num_workers=max(1, workers),
        py_start_method="spawn",
        exec_dynamic=True,
    )
    def arb_pipeline():
        feed = {
            "source": source,
            "batch": True,
            "batch_info": True,
            "parallel": workers > 0,
            # batches computed ahead by the workers (DALI's default, 1, keeps all but one worker idle)
            "prefetch_queue_depth": max(2, 2 * workers) if workers > 0 else None,
        }
        if decoded_input:  # finished crops from the workers: only flip, normalise and layout here
            images, mirror, meta = fn.external_source(
                **feed, num_outputs=3, dtype=[types.UINT8, types.INT32, types.INT64], layout=["HWC"]
            )
            if gpu:
                images = images.gpu()
        else:
            encoded, roi_start, roi_end, size, mirror, meta = fn.external_source(
                **feed,
                num_outputs=6,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32, types.INT64],
            )
            decode_args: dict[str, Any] = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
            if gpu and max_image_side:
                decode_args.update(preallocate_width_hint=max_image_side, preallocate_height_hint=max_image_side)
            images = fn.decoders.image(encoded, **decode_args)
            # Resize the crop window (in source pixels) straight to the bucket size: the same pixels as
            # resizing the whole image to cover the bucket and cropping, without the discarded work.
            images = fn.resize(
                images,
                size=size,
                roi_start=roi_start,
                roi_end=roi_end,
                roi_relative=False,
                antialias=True,
                interp_type=types.INTERP_LINEAR,
            )
        images = fn.crop_mirror_normalize(
            images,
            mirror=mirror,
            dtype=out_type,
            output_layout="CHW",
            mean=[0.0] * 3 if raw else [127.5] * 3,
            std=[1.0] * 3 if raw else [127.5] * 3,
        )
        return images, meta

    pipe = arb_pipeline()
    with _workers_skip_main():
        pipe.build()
    return pipe


@contextlib.contextmanager
def _workers_skip_main():
    """Start worker processes without re-importing the program's ``__main__``.

    "spawn" workers normally import the main script again: that fails for stdin and notebooks, and
    re-runs a training script that lacks an ``if __name__ == "__main__"`` guard in every worker. Our
    source lives in ``dali_arb.source``, so workers never need ``__main__``.
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        for name in saved:
            if name == "__spec__":
                main.__spec__ = None
            else:
                delattr(main, name)
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
