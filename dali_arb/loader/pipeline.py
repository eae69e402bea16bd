"""The DALI graph: external source → the decoder's part (decode, resize) → flip + normalise → NCHW.

Imports DALI lazily (inside functions), so the rest of dali_arb works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DeviceError
from ..processes import spawn_without_main

if TYPE_CHECKING:
    from .decoders import Decoder

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
    decoder: Decoder,
    batch_size: int,
    device: str,
    device_id: int | None,
    dtype: str,
    num_threads: int,
    workers: int = 1,
    prefetch: int = 2,
    source_prefetch: int | None = None,
    bytes_per_sample_hint: int | None = None,
) -> Any:
    """A built DALI pipeline whose outputs are ``(images, *pairs, meta)``; with a video decoder
    (:mod:`~dali_arb.loader.decoders.video`) ``(video, frame_index, fps, meta)``: ``video`` ``[B, F, 3, H, W]``, every
    frame of a sample flipped alike, ``frame_index`` ``int64 [B, F]`` and ``fps`` ``float32 [B]`` on the CPU.

    ``images``: ``[B, 3, H, W]`` of ``dtype`` on the pipeline's device (H, W: the step's bucket); each of
    ``decoder.pairs`` in order: ``[B, 3, H, W]`` like the images for a pair, ``[B, 1, H, W]`` for a mask
    (``[0, 1]`` for float dtypes, ``0..255`` for ``uint8``), all cut and flipped alike;
    ``meta``: ``int64 [B, F]`` on the CPU (``outputs.META``).

    Args:
        source: a callable taking DALI's ``BatchInfo`` and returning ``decoder.outputs`` in order
            (a :class:`~dali_arb.loader.source.BatchSource`).
        decoder: its part of the graph turns the source's outputs into ``uint8 HWC`` at the bucket size.
        device: ``"gpu"`` or ``"cpu"``.
        workers: Python worker processes running the source (DALI's parallel external source);
            0 runs it in the main process (for tests and debugging).
        prefetch: batches the pipeline prepares ahead.
        source_prefetch: batches the workers compute ahead (default ``max(2, 2 * workers)``).
        bytes_per_sample_hint: initial size of the workers' shared-memory chunks per sample.
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    out_type = getattr(types, DTYPES[dtype])
    raw = dtype == "uint8"
    outputs = decoder.outputs
    video = getattr(decoder, "video", False)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if gpu else None,
        prefetch_queue_depth=prefetch,
        py_num_workers=max(1, workers),
        py_start_method="spawn",
        exec_dynamic=True,
    )
    def arb_pipeline():
        feed: dict[str, Any] = {"source": source, "batch": True, "batch_info": True, "parallel": workers > 0}
        if workers > 0:
            # batches computed ahead by the workers (DALI's default, 1, keeps all but one worker idle)
            feed["prefetch_queue_depth"] = source_prefetch or max(2, 2 * workers)
            if bytes_per_sample_hint:
                feed["bytes_per_sample_hint"] = int(bytes_per_sample_hint)
        nodes = fn.external_source(
            **feed,
            num_outputs=len(outputs),
            dtype=[getattr(types, o.dtype) for o in outputs],
            layout=[o.layout or "" for o in outputs],
        )
        feeds = {o.name: node for o, node in zip(outputs, nodes)}
        decoded = decoder.graph(feeds, gpu=gpu)
        if not isinstance(decoded, dict):  # a decoder written before pairs: one node, the images
            decoded = {"images": decoded}
        finished = []
        for key, _, channels in decoder.parts:
            if channels == 1:  # a mask: [0, 1] (or 0..255 raw)
                mean, std = [0.0], [1.0 if raw else 255.0]
            else:  # [-1, 1] (or 0..255 raw)
                mean, std = [0.0 if raw else 127.5] * 3, [1.0 if raw else 127.5] * 3
            finished.append(
                fn.crop_mirror_normalize(
                    decoded[key],
                    mirror=feeds["mirror"],
                    dtype=out_type,
                    output_layout="FCHW" if video else "CHW",
                    mean=mean,
                    std=std,
                )
            )
        passed = [feeds[o.name] for o in getattr(decoder, "passed_outputs", ())]
        return (*finished, *passed, feeds["meta"])

    pipe = arb_pipeline()
    with spawn_without_main():
        pipe.build()
    return pipe
