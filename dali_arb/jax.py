"""``dali_arb.jax.DALIBucketIterator``: the same loader as :mod:`dali_arb.torch`, with JAX arrays out.

The constructor, the plan, ``state_dict`` and the failure handling are the
:class:`~dali_arb.loader.session.LoaderSession`'s; only the batch's arrays differ: ``images`` (and each pair or
mask) is a ``jax.Array [B, 3, H, W]`` on this rank's GPU or the CPU, taken from DALI through DLPack (a clip loader's
``video`` ``[B, F, 3, H, W]``, with ``frame_index`` and ``fps`` on the CPU);
``original_size`` and ``crop_top_left`` are ``int32 [B, 2]`` (``int64`` with ``jax_enable_x64``), ``flipped``
``bool [B]``, ``dataset`` ``int32 [B]``; ``ids`` and ``captions`` stay lists. Needs ``pip install
'dali-arb[jax]'``; imports JAX when a batch is converted.
"""

from __future__ import annotations

from typing import Any

from .loader.options import datasets_from, loader_options
from .loader.session import Batch, LoaderSession

__all__ = ["DALIBucketIterator"]


class DALIBucketIterator(LoaderSession):
    """Aspect-ratio-bucketed batches as JAX arrays; arguments as :class:`dali_arb.DALIBucketIterator`."""

    def __init__(self, manifest: Any, *, buckets: Any = None, repeats: Any = None, options: Any = None,
                 **keywords: Any) -> None:  # fmt: skip
        super().__init__(datasets_from(manifest, buckets, repeats), loader_options(options, keywords))

    @classmethod
    def from_config(cls, path: Any, *, trainer_options: Any = None, **overrides: Any) -> DALIBucketIterator:
        """As :meth:`dali_arb.DALIBucketIterator.from_config`: the loader a kohya, SimpleTuner or our config describes."""
        from .configs import load

        datasets, options = load(path, trainer_options=trainer_options, **overrides)
        return cls(datasets, options=options)

    def convert(self, batch: Batch) -> dict[str, Any]:
        """The batch dict of JAX arrays: DALI's outputs through DLPack, the rest from NumPy."""
        import jax
        import jax.numpy as jnp

        cpu = jax.devices("cpu")[0]  # everything but the images stays on the CPU, as with torch
        arrays = {}
        for key, output in batch.parts.items():
            array = jax.dlpack.from_dlpack(output.as_tensor())
            arrays[key] = array.astype(jnp.bfloat16) if self.dtype == "bfloat16" else array
        if batch.frame_index is not None:  # a clip loader (frames=): video [B, F, 3, H, W] or BCFHW
            video = arrays.pop("video")
            if self.options.video.layout == "BCFHW":
                video = jnp.transpose(video, (0, 2, 1, 3, 4))
            arrays = {"video": video, "frame_index": jax.device_put(batch.frame_index, cpu),
                      "fps": jax.device_put(batch.fps, cpu), **arrays}  # fmt: skip
            images = video
        else:
            images = arrays.pop("images")
            arrays = {"images": images, **arrays}
        return {
            "ids": batch.ids,
            "dataset": jax.device_put(batch.dataset, cpu),
            "captions": batch.captions,
            "original_size": jax.device_put(batch.original_size, cpu),
            "crop_top_left": jax.device_put(batch.crop_top_left, cpu),
            "target_size": (int(images.shape[-2]), int(images.shape[-1])),
            "flipped": jax.device_put(batch.flipped, cpu),
            "epoch": batch.epoch,
            "step": batch.step,
            **arrays,
        }
