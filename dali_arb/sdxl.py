"""SDXL's size conditioning from a batch, in one place: :func:`add_time_ids`.

SDXL (Podell et al. 2023, section 2.2) conditions the UNet on six numbers per image, in this order:
``original_size`` ``(height, width)`` of the source image, ``crops_coords_top_left`` ``(top, left)`` of the crop,
and ``target_size`` ``(height, width)`` of the image the model sees. diffusers passes them as
``added_cond_kwargs["time_ids"]``, ``[B, 6]``. A batch of :class:`~dali_arb.DALIBucketIterator` holds all three:
``original_size`` (the size before resizing where the manifest records it, img2dataset's ``original_width``/
``original_height``; else the indexed, EXIF-upright size), ``crop_top_left`` (in resized-image pixels, after the
flip: what SDXL was trained with) and ``target_size`` (the bucket). Imports torch when called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_time_ids"]

_KEYS = ("original_size", "crop_top_left", "target_size")


def add_time_ids(batch: dict[str, Any], *, dtype: Any = None, device: Any = None) -> Any:
    """SDXL's ``time_ids`` ``[B, 6]`` of ``batch``: ``original_size`` (h, w), ``crop_top_left`` (top, left),
    ``target_size`` (h, w), the order SDXL was trained with.

    ``dtype`` defaults to ``torch.float32``: every size up to 2**24 is exact in it, and diffusers' UNet casts
    ``time_ids`` to float32 for its sinusoidal embedding anyway. ``float16`` holds whole numbers exactly only up to
    2048 and ``bfloat16`` only up to 256 (a 1000-pixel crop offset of 1001 becomes 1000): cast the embedding, not
    these numbers. ``device``: where the tensor goes (default: the CPU, where the batch keeps these keys).
    """
    import torch

    missing = [key for key in _KEYS if key not in batch]
    if missing:
        raise KeyError(
            f"add_time_ids needs the batch keys {list(_KEYS)}; this batch lacks {missing}: pass a batch of "
            "DALIBucketIterator (dali_arb.torch) as it comes"
        )
    original = torch.as_tensor(batch["original_size"], dtype=torch.int64)
    crop = torch.as_tensor(batch["crop_top_left"], dtype=torch.int64)
    if original.ndim != 2 or original.shape[1] != 2 or crop.shape != original.shape:
        raise ValueError(
            f"original_size {tuple(original.shape)} and crop_top_left {tuple(crop.shape)} must both be [B, 2]; "
            "pass a batch of DALIBucketIterator as it comes"
        )
    target = torch.as_tensor(batch["target_size"], dtype=torch.int64)
    if target.shape != (2,):
        raise ValueError(f"target_size must be one (height, width), got {batch['target_size']!r}")
    ids = torch.cat([original, crop, target.expand(len(original), 2)], dim=1)
    return ids.to(device=device, dtype=torch.float32 if dtype is None else dtype)
