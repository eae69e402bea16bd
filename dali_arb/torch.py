"""``DALIBucketIterator``: what a PyTorch training loop holds: a :class:`~dali_arb.loader.session.LoaderSession`
whose batches come out as torch tensors (DALI's outputs through DLPack, without a copy). Imports torch when a
batch is converted, DALI when the pipeline is built.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .data.manifest import Manifest
from .loader.options import LoaderOptions, datasets_from, loader_options
from .loader.session import Batch, LoaderSession

__all__ = ["DALIBucketIterator"]


class DALIBucketIterator(LoaderSession):
    """Aspect-ratio-bucketed batches from a manifest, decoded and resized by DALI.

    Every batch holds ``batch_size`` images of one bucket resolution. ``len(loader)`` is the number
    of steps in the current epoch, equal on every rank. Iterating runs the rest of the current
    epoch; when an epoch has been run through, the next iteration starts the following epoch
    (``set_epoch`` picks one explicitly, as with ``DistributedSampler``).

    Each batch is a dict: ``images`` (``torch.Tensor [B, 3, H, W]`` on this rank's GPU, or the CPU),
    ``ids`` (manifest keys), ``captions`` (``""`` where none), ``original_size`` (``int64 [B, 2]``,
    ``(height, width)``: the manifest's size before resizing where a row has one, else EXIF-upright),
    ``crop_top_left`` (``int64 [B, 2]``, ``(top, left)`` in resized-image pixels, after the flip), ``target_size``
    (``(H, W)``), ``flipped`` (``bool [B]``), ``epoch`` and ``step``. Everything but ``images`` stays on the CPU.

    A sample that cannot be read or decoded is replaced by a deterministic stand-in from the same
    bucket, logged once, and listed in :attr:`failed`; the batch keeps its size.

    Two spellings build the same loader (the same batches, the same ``state_dict``)::

        DALIBucketIterator("m.parquet", batch_size=16, buckets=BucketSpec(), flip=0.5, device="gpu")
        DALIBucketIterator([Dataset("m.parquet", buckets=BucketSpec())],
                           options=LoaderOptions(batch_size=16, augment=Augment(flip=0.5), decode=Decode(device="gpu")))

    The grouped objects (:mod:`dali_arb.loader.options`) validate once, print as JSON (``to_dict()``) and are what
    the CLI builds; the keywords below fill the same fields (``workers`` is ``Workers.count``, ``worker_kind``
    ``Workers.kind``, ``caption_dropout`` ``CaptionPolicy.dropout``...). Give one spelling, not both.

    Args:
        manifest: path of a manifest from ``dali-arb index``, or a :class:`Manifest`; or a list of them, one
            per dataset (``batch["dataset"]`` says which each sample came from); or a list of
            :class:`~dali_arb.loader.options.Dataset` (each with its own ``buckets`` and ``repeats``).
        options: a :class:`~dali_arb.loader.options.LoaderOptions` instead of the keyword arguments below.
        batch_size: samples per batch on this rank (every bucket the same), or a
            :class:`~dali_arb.plan.batching.BatchSizing`.
        batch_pixels, max_batch, batch_multiple, batch_sizes: instead of ``batch_size``, batch sizes by bucket: a bucket
            of w x h serves ``max(1, batch_pixels // (w*h))`` samples per rank and step (at most ``max_batch``,
            rounded down to a multiple of ``batch_multiple``), or ``batch_sizes[(w, h)]``; each step has one batch
            size on every rank, and the pipeline is built for the largest (``loader.batch_size``).
        buckets: a :class:`BucketSpec` (default: NovelAI's buckets), or one per dataset (multi-resolution).
        repeats: per dataset, times each image is served per epoch: an integer serves it that many times, a
            fraction serves that share of the dataset, another subset each epoch (:mod:`dali_arb.plan.mixture`).
        seed: shared by every rank.
        rank, world_size: ``None`` reads ``torch.distributed`` / torchrun's environment (else 0, 1).
        device: ``"gpu"`` (decode with nvJPEG on this rank's GPU), ``"cpu"``, or ``"auto"``.
        crop: ``"random"`` (seeded by seed, epoch, step and sample) or ``"center"``.
        flip: probability of a horizontal flip.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` (scaled to [-1, 1]) or ``"uint8"`` (raw).
        leftover, sync_ranks: see :class:`Planner`.
        workers: threads or processes (``worker_kind``) running the external source (reading, and with the
            ``opencv`` and ``pillow`` decoders decoding); 0 does it on the loader's own thread, when DALI asks
            for a batch. Default: the decoder's, from this rank's share of the cores (``LOCAL_WORLD_SIZE`` ranks
            share a node): all of it for ``opencv`` and ``pillow``, a quarter of it, 1-4, for ``dali``.
        worker_kind: ``"thread"`` (default): the workers are threads of this process (no process, no import,
            no ``/dev/shm``; decoding and reading release the GIL, so they keep pace with processes while the
            training loop dispatches torch ops); ``"process"``: DALI's spawned worker processes (about 100 MB PSS
            each on a node; a worker killed by the OOM killer is restarted from), for a training loop that runs
            long stretches of pure Python, which holds the GIL the threads need (0.78x their pace measured). See
            :mod:`dali_arb.loader.workers` and benchmarks/RESULTS.md.
        num_threads: DALI threads (default: the decoder's: 4 on GPU, all cores for ``dali`` on CPU,
            a quarter of the cores for ``pillow``).
        prefetch: batches DALI prepares ahead.
        device_id: GPU index (default: the local rank).
        decoder: ``"dali"`` (DALI decodes and resizes: nvJPEG on GPU, libjpeg-turbo on CPU), ``"opencv"``
            or ``"pillow"`` (the worker processes decode with libjpeg-turbo at reduced DCT scale and resize
            to the bucket; DALI flips and normalises), or ``"auto"``: ``dali`` on GPU, ``opencv`` on CPU.
            A :class:`~dali_arb.loader.decoders.Decoder` instance is used as it is. See :mod:`dali_arb.loader.decoders`.
        hw_decoder_load: with ``dali`` on GPU, the share of each batch for the hardware JPEG decoder
            (A100/H100; DALI's default 0.65).
        jpeg_scaling: with ``opencv`` or ``pillow``, how far the workers let libjpeg-turbo decode a JPEG at a
            reduced DCT scale: ``"quality"`` (default) only while the image keeps 3x the resize, so the output
            stays within 35 dB of a full-resolution antialiased resize; ``"fast"`` the largest reduction that
            covers the resize (as the fastest peers do: up to 2.7x less decoding on large photos, 28-30 dB
            worst on detailed ones). ``benchmarks/RESULTS.md`` has both.
        read_ahead: for samples in object storage (``s3://``, ``gs://``, ``https://`` manifests), steps whose samples
            are fetched ahead in the background, from the plan (default: every step the pipeline and its workers
            prepare ahead, plus one); 0 fetches each sample when it is needed, one request at a time.
        sample_cache, sample_cache_gb: a folder where samples read from object storage stay for later epochs
            (default: none; read-ahead then waits in a private folder of ``/dev/shm`` and each sample is dropped
            once read), at most ``sample_cache_gb`` (least recently used removed first). The ranks of a node may
            share one folder.
        caption_dropout, shuffle_tags, keep_tags, tag_separator: caption tricks (:class:`CaptionPolicy`): a
            caption of several lines is several captions, one drawn per sample per epoch; ``caption_dropout``
            empties it with that probability; ``shuffle_tags`` shuffles the tags after the first
            ``keep_tags`` (split at ``tag_separator``, joined with ``tag_separator + " "``). Seeded by
            (seed, epoch, step, position in the global batch): resume reproduces them.
        frames, fps, clip, stride, clip_count, images, layout, video_decoder, max_clip_mb: clips instead of images (issue 21;
            :class:`~dali_arb.loader.options.Video`, docs/video-decode.md): ``frames`` the frame buckets; each batch
            then holds ``video`` ``[B, F, 3, H, W]`` (``layout="BCFHW"``: ``[B, 3, F, H, W]``) instead of
            ``images``, ``frame_index`` ``int64 [B, F]`` (source frame numbers) and ``fps`` ``float32 [B]``;
            ``max_clip_mb`` (default 4096, None: off) refuses at construction a plan with a clip over that memory.
        cache_dir: where the manifest's memory-mapped cache lives (default ``$DALI_ARB_CACHE``, else
            ``~/.cache/dali_arb``; see :mod:`dali_arb.data.cache`). A manifest path is opened through it,
            so every rank and worker of a node shares one copy; a :class:`Manifest` object is used as it is.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Manifest | list[Any],
        *,
        buckets: Any = None,
        repeats: list[float] | None = None,
        options: LoaderOptions | None = None,
        **keywords: Any,
    ) -> None:
        super().__init__(datasets_from(manifest, buckets, repeats), loader_options(options, keywords))

    @classmethod
    def from_config(
        cls, path: str | os.PathLike, *, trainer_options: dict[str, Any] | None = None, **overrides: Any
    ) -> DALIBucketIterator:
        """The loader a dataset config describes: a kohya dataset TOML or ``train_data_dir`` (``N_name`` folders), a
        SimpleTuner ``multidatabackend.json``, or our ``dali_arb.toml`` (``dali-arb index --from ...`` writes one). A
        trainer's config is indexed into the node cache folder once and reused; each option it sets that the loader
        ignores is logged as one warning (docs/kohya.md). ``trainer_options``: the trainer's command-line dataset
        options a ``train_data_dir`` needs (``{"resolution": 1024, "enable_bucket": True}``). ``overrides``: this
        class's keywords (``device``, ``batch_size``, ``buckets``...), winning over the config's."""
        from .configs import load

        datasets, options = load(path, trainer_options=trainer_options, **overrides)
        return cls(datasets, options=options)

    def convert(self, batch: Batch) -> dict[str, Any]:
        """The batch dict of torch tensors: DALI's outputs through DLPack (no copy), the rest from NumPy."""
        import torch

        # The pipeline runs DALI's dynamic executor, whose outputs own their memory: hand them to
        # torch through DLPack without a copy, as DALI's own iterator does for such pipelines.
        gpu = self.device == "gpu"
        device = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        tensors = {}
        with torch.cuda.device(device) if gpu else contextlib.nullcontext():
            for key, output in batch.parts.items():
                tensor = torch.from_dlpack(output.as_tensor())
                tensors[key] = tensor.to(torch.bfloat16) if self.dtype == "bfloat16" else tensor
        if batch.frame_index is not None:
            return self._video_batch(batch, tensors)
        images = tensors.pop("images")
        return {
            "images": images,
            "ids": batch.ids,
            "dataset": torch.from_numpy(batch.dataset),
            "captions": batch.captions,
            "original_size": torch.from_numpy(batch.original_size),
            "crop_top_left": torch.from_numpy(batch.crop_top_left),
            "target_size": (int(images.shape[2]), int(images.shape[3])),
            "flipped": torch.from_numpy(batch.flipped),
            "epoch": batch.epoch,
            "step": batch.step,
            **tensors,
        }

    def _video_batch(self, batch: Batch, tensors: dict[str, Any]) -> dict[str, Any]:
        """A video loader's batch: ``video`` ``[B, F, 3, H, W]`` (``layout="BCFHW"``: ``[B, 3, F, H, W]``, a
        permuted view), ``frame_index`` ``int64 [B, F]``, ``fps`` ``float32 [B]``, and the keys images have."""
        import torch

        video = tensors.pop("video")
        if self.options.video.layout == "BCFHW":
            video = video.permute(0, 2, 1, 3, 4)
        return {
            "video": video,
            "frame_index": torch.from_numpy(batch.frame_index),
            "fps": torch.from_numpy(batch.fps),
            "ids": batch.ids,
            "dataset": torch.from_numpy(batch.dataset),
            "captions": batch.captions,
            "original_size": torch.from_numpy(batch.original_size),
            "crop_top_left": torch.from_numpy(batch.crop_top_left),
            "target_size": (int(video.shape[-2]), int(video.shape[-1])),
            "flipped": torch.from_numpy(batch.flipped),
            "epoch": batch.epoch,
            "step": batch.step,
            **tensors,
        }
