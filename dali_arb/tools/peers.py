"""The loaders trainers otherwise run, as a user writes them with well-kept libraries, on dali_arb's plan (the
same batches and buckets; centre crop): PyTorch ``DataLoader`` workers decoding with Pillow (with and without
``draft()``) or OpenCV (at the reduced DCT scale ``jpeg_scaling`` "fast" or "quality" would use), the decode-only
ceiling, and batched ``torchvision.io.decode_jpeg``. Imports NumPy, ``data.imagefacts``, ``plan.geometry`` and
the decoders' JPEG reduction helpers; torch, Pillow, OpenCV and torchvision when they run."""

from __future__ import annotations

import functools

import numpy as np

from ..data.imagefacts import swaps_sides
from ..loader.decoders import jpeg_reduction, opencv_flags, reduction_margin
from ..plan.geometry import cover_crop

__all__ = [
    "PEERS",
    "PEER_START_METHOD",
    "SAME_QUALITY_PEER",
    "DecodeOnly",
    "EncodedBatches",
    "PeerBatches",
    "has_torchvision",
    "torchvision_batch",
]

#: The peers' DataLoader workers start by spawning: forking a process in which DALI's threads already run
#: (the loader under test warms up first) can deadlock the child on a lock one of those threads held.
PEER_START_METHOD = "spawn"
#: The CPU peers, by result key: the ``PeerBatches`` method each runs.
PEERS = {"baseline": "pillow", "baseline_draft": "pillow_draft", "baseline_opencv": "opencv",
         "baseline_opencv_quality": "opencv_quality"}  # fmt: skip
#: the peer that decodes as ``jpeg_scaling`` does: the strongest one producing output of the same quality
SAME_QUALITY_PEER = {"quality": "baseline_opencv_quality", "fast": "baseline_opencv"}


@functools.cache
def _one_opencv_thread_per_worker() -> None:
    """In a peer's DataLoader worker process, one OpenCV thread (as a good user's ``worker_init_fn`` sets it, and
    as dali_arb's workers run): every worker's own pool of a thread per core would oversubscribe the cores."""
    import multiprocessing

    import cv2

    if multiprocessing.parent_process() is not None:
        cv2.setNumThreads(1)


class PeerBatches:
    """Map-style dataset of whole planned batches, as a user writes it with well-kept libraries
    (picklable): ``method`` ``"pillow"`` (decode, resize to cover with antialiased bilinear, crop),
    ``"pillow_draft"`` (the same after ``draft()``: libjpeg-turbo decodes at 1/2..1/8 scale), or
    ``"opencv"`` (``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_2/4/8`` at the largest reduction that still
    covers the bucket, ``cv2.resize`` with ``INTER_AREA`` when shrinking by 2x or more, else linear, crop),
    or ``"opencv_quality"`` (reducing only while the image keeps ``QUALITY_MARGIN`` times the resize, as
    ``jpeg_scaling="quality"``, and ``INTER_AREA`` for every shrink, as kohya's sd-scripts resizes: the
    quality of a full-resolution antialiased resize).
    Centre crop; output ``[B, 3, H, W]`` uint8, or float16 in [-1, 1] normalised in the worker."""

    def __init__(self, sources: list[str], heights: np.ndarray, widths: np.ndarray, rows: np.ndarray,
                 sizes: np.ndarray, *, method: str, dtype: str = "float16") -> None:  # fmt: skip
        self.sources, self.heights, self.widths = sources, heights, widths
        self.rows, self.sizes, self.method, self.dtype = (
            rows,
            sizes,
            method,
            dtype,
        )  # rows: (steps, B); sizes: (steps, 2)

    def __len__(self) -> int:
        return len(self.rows)

    def reduced_flag(self, row: int, bh: int, bw: int) -> int:
        """The ``cv2.imdecode`` flag (BGR, as users write it) at the largest reduction covering the bucket."""
        h, w = int(self.heights[row]), int(self.widths[row])
        rh, rw, _, _ = cover_crop(h, w, bh, bw, 0.0, 0.0, center=True)
        margin = reduction_margin("quality" if self.method == "opencv_quality" else "fast")
        return opencv_flags(rgb=False)[0][jpeg_reduction(h, w, rh, rw, margin=margin)]

    def image(self, row: int, bh: int, bw: int) -> np.ndarray:
        """One sample, ``uint8 (bh, bw, 3)``."""
        if self.method in ("opencv", "opencv_quality"):
            import cv2

            _one_opencv_thread_per_worker()
            img = cv2.imdecode(np.fromfile(self.sources[row], np.uint8), self.reduced_flag(row, bh, bw))
            rh, rw, top, left = cover_crop(img.shape[0], img.shape[1], bh, bw, 0.0, 0.0, center=True)
            # the fast peer area-averages from 2x (as the user wrote it); the quality peer whenever it
            # shrinks, as kohya's sd-scripts does: bilinear below 2x aliases (27.9 dB worst, RESULTS.md)
            shrink = img.shape[0] / rh >= (1.0 if self.method == "opencv_quality" else 2.0) and img.shape[0] > rh
            img = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            return cv2.cvtColor(img[top : top + bh, left : left + bw], cv2.COLOR_BGR2RGB)
        from PIL import Image, ImageOps

        with Image.open(self.sources[row]) as img:
            if self.method == "pillow_draft":
                h, w = int(self.heights[row]), int(self.widths[row])
                rh, rw, _, _ = cover_crop(h, w, bh, bw, 0.0, 0.0, center=True)
                img.draft("RGB", (rh, rw) if swaps_sides(img) else (rw, rh))
            img = ImageOps.exif_transpose(img).convert("RGB")
            rh, rw, top, left = cover_crop(img.height, img.width, bh, bw, 0.0, 0.0, center=True)
            return np.asarray(img.resize((rw, rh), Image.BILINEAR).crop((left, top, left + bw, top + bh)))

    def __getitem__(self, step: int):
        import torch

        bh, bw = (int(v) for v in self.sizes[step])
        out = torch.from_numpy(np.stack([self.image(row, bh, bw) for row in self.rows[step]])).permute(0, 3, 1, 2)
        if self.dtype == "uint8":
            return out.contiguous()
        return ((out.to(torch.float32) - 127.5) / 127.5).to(torch.float16)


class DecodeOnly(PeerBatches):
    """The physical limit of CPU decoding for these images and buckets: each batch's JPEGs decoded at the
    reduction the bucket allows (``cv2.IMREAD_REDUCED_*``; ``method`` ``"opencv"`` or ``"opencv_quality"``
    as in :class:`PeerBatches`), nothing else; returns the batch's image count."""

    def __getitem__(self, step: int):
        import cv2

        bh, bw = (int(v) for v in self.sizes[step])
        for row in self.rows[step]:
            cv2.imdecode(np.fromfile(self.sources[row], np.uint8), self.reduced_flag(row, bh, bw))
        return len(self.rows[step])


class EncodedBatches:
    """Map-style dataset of whole planned batches as encoded bytes (``uint8 (n,)`` tensors), for peers
    that decode in the main process (picklable)."""

    def __init__(self, sources: list[str], rows: np.ndarray) -> None:
        self.sources, self.rows = sources, rows  # rows: (steps, B)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, step: int):
        import torch

        out = []
        for row in self.rows[step]:
            with open(self.sources[row], "rb") as fh:
                out.append(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8))
        return out


def torchvision_batch(encoded: list, bucket: tuple[int, int], device: str):
    """Batched ``decode_jpeg`` on ``device`` (EXIF applied), antialiased bilinear resize to cover the
    bucket, centre crop, float16 in [-1, 1]: ``[B, 3, H, W]``."""
    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    bh, bw = bucket
    images = decode_jpeg(encoded, device=device, apply_exif_orientation=True)
    out = torch.empty((len(images), 3, bh, bw), dtype=torch.float16, device=device)
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        rh, rw, top, left = cover_crop(int(h), int(w), bh, bw, 0.0, 0.0, center=True)
        resized = F.resize(img, [rh, rw], antialias=True)
        out[i] = (resized[:, top : top + bh, left : left + bw].to(torch.float32) - 127.5) / 127.5
    return out


def has_torchvision() -> bool:
    """Whether torchvision imports (and was built for this torch)."""
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # absent, or built for another torch
        return False
    return True
