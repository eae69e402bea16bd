"""SimpleTuner's ``multidatabackend.json`` as it is (its ``documentation/DATALOADER.md``, ``helpers/prompts.py``): each
enabled ``"type": "local"`` image backend is one of our datasets:

- ``instance_data_dir``: the folder, every image in it and its subfolders;
- ``repeats``: SimpleTuner's 0 is "seen once", so ours is ``repeats + 1``;
- ``resolution`` with ``resolution_type`` (``pixel_area``: pixels of the side of a square of that area; ``area``:
  megapixels; ``pixel``: the short edge, approximated by the square of that side): our resolution preset
  (:class:`BucketSpec` ``resolution=``, sides rounded to 64); ``crop_aspect: square``: that one square bucket;
- ``minimum_image_size``: images under it are rejected (the short side for ``pixel``, the area otherwise);
- ``crop_style``: ``center`` or ``random`` (``corner`` and ``face`` are centred, with a note);
- ``caption_strategy``: ``filename`` (the stem, underscores to spaces), ``textfile`` (``IMAGE.txt``, one line drawn
  per epoch), ``instanceprompt`` (the ``instance_prompt`` for every image); ``prepend_instance_prompt``: it goes in
  front of every caption.

Every other option is named in a note (text and image embed backends, ``probability``, resize thresholds...).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..index.captions import CaptionSource
from .convert import Converted, IndexJob
from .ours import DatasetEntry

__all__ = ["from_json"]

#: Options read, or known and ignored (with why).
MAPPED = {"id", "type", "dataset_type", "instance_data_dir", "resolution", "resolution_type", "minimum_image_size",
          "crop", "crop_style", "crop_aspect", "caption_strategy", "instance_prompt", "prepend_instance_prompt",
          "only_instance_prompt", "repeats", "disabled", "disable", "probability"}  # fmt: skip
IGNORED = {
    "maximum_image_size": "the loader resizes each image straight to its bucket (antialiased), no pre-downsampling",
    "target_downsample_size": "the loader resizes each image straight to its bucket (antialiased), no pre-downsampling",
    "cache_dir_vae": "latents are the training script's", "vae_cache_clear_each_epoch": "latents are the training script's",
    "text_embeds": "text embeddings are the training script's", "image_embeds": "latents are the training script's",
    "metadata_backend": "the manifest holds sizes and captions", "skip_file_discovery": "the manifest is the file list",
    "preserve_data_backend_cache": "the manifest is the loader's cache", "start_epoch": "not supported: every dataset serves from epoch 0",
    "start_step": "not supported: every dataset serves from step 0", "crop_aspect_buckets": "not supported: buckets come from resolution",
    "max_upscale_threshold": "not supported; minimum_image_size refuses small images",
    "is_regularisation_data": "weighting the loss is the training script's (batch['dataset'] says which)",
}  # fmt: skip


def from_json(path: str | os.PathLike, *, batch_size: int | None = None) -> Converted:
    """The datasets of SimpleTuner's ``multidatabackend.json`` (its ``train_batch_size`` lives in the training config:
    give ``batch_size``, or to ``from_config``)."""
    path = Path(path)
    try:
        backends = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"SimpleTuner config {path} cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"SimpleTuner config {path} is not valid JSON ({exc})") from None
    if not isinstance(backends, list):
        raise ConfigError(f"SimpleTuner config {path} must be a JSON list of backends")
    out = Converted()
    if batch_size is not None:
        out.loader["batch_size"] = batch_size
    crops = []
    for i, backend in enumerate(backends):
        label = f"backend {backend.get('id', i)!r}" if isinstance(backend, dict) else f"backend {i}"
        if not isinstance(backend, dict):
            raise ConfigError(f"{path}: {label} is not a JSON object")
        if backend.get("disabled") or backend.get("disable"):
            out.notes.append(f"{label} skipped: disabled")
            continue
        kind = backend.get("dataset_type", "image")
        if kind != "image":
            out.notes.append(
                f"{label} ignored: dataset_type {kind!r} is the training script's (only image datasets are loaded)"
            )
            continue
        if backend.get("type", "local") != "local":
            out.notes.append(
                f"{label} ignored: type {backend.get('type')!r} is not read yet (index it with dali-arb index URL)"
            )
            continue
        for name in backend:
            if name in IGNORED:
                out.notes.append(f"{label}: {name} ignored: {IGNORED[name]}")
            elif name not in MAPPED:
                out.notes.append(f"{label}: {name} ignored: not an option this reader knows")
        entry, job, crop = _backend(backend, label, path, len(out.datasets), out)
        out.add(entry, job)
        crops.append(crop)
    out.loader["crop"] = "random" if "random" in crops else "center"
    if len(set(crops)) > 1:
        out.notes.append("crop_style differs between datasets: the loader crops every dataset at random")
    out.loader["leftover"] = "partial"
    return out


def _backend(
    b: dict[str, Any], label: str, path: Path, number: int, out: Converted
) -> tuple[DatasetEntry, IndexJob, str]:
    folder = b.get("instance_data_dir")
    if not folder:
        raise ConfigError(f"{path}: {label} has no instance_data_dir")
    strategy = b.get("caption_strategy", "filename")
    prompt = b.get("instance_prompt") or ""
    if b.get("only_instance_prompt"):
        strategy = "instanceprompt"
    sources = {"filename": CaptionSource(filename=True), "textfile": CaptionSource(extension=".txt"),
               "instanceprompt": CaptionSource(none=True)}  # fmt: skip
    if strategy not in sources:
        raise ConfigError(f"{path}: {label} caption_strategy {strategy!r} is not read yet; use filename, textfile or "
                          "instanceprompt, or index the folder with --captions FILE --caption-column NAME")  # fmt: skip
    if strategy == "instanceprompt" and not prompt:
        raise ConfigError(f"{path}: {label} caption_strategy instanceprompt needs an instance_prompt")
    captions = {"instance_prompt": prompt if strategy == "instanceprompt" else ""}
    if b.get("prepend_instance_prompt") and prompt and strategy != "instanceprompt":
        captions["prefix"] = prompt
    style = b.get("crop_style", "random") if b.get("crop", False) else "center"
    if style not in ("center", "random"):
        out.notes.append(f"{label}: crop_style {style!r} ignored: crops are centred or random")
    if not b.get("crop", False):
        out.notes.append(
            f"{label}: crop false: the loader resizes to cover the nearest-aspect bucket and crops the rest"
        )
    if b.get("probability", 1.0) != 1.0:
        out.notes.append(f"{label}: probability ignored: datasets are mixed by repeats, every image each epoch")
    repeats = b.get("repeats", 0)
    if isinstance(repeats, bool) or not isinstance(repeats, (int, float)) or repeats < 0:
        raise ConfigError(f"{path}: {label} repeats must be a non-negative number, got {repeats!r}")
    name = (
        f"{number:02d}_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in str(b.get('id', 'images')))}.parquet"
    )
    entry = DatasetEntry(name, float(repeats) + 1.0, _buckets(b, label, path), captions, source=str(folder))
    return entry, IndexJob(str(folder), sources[strategy]), "random" if style == "random" else "center"


def _buckets(b: dict[str, Any], label: str, path: Path) -> dict[str, Any]:
    kind = b.get("resolution_type", "pixel")
    res = b.get("resolution", 1024 if kind != "area" else 1.0)
    if isinstance(res, bool) or not isinstance(res, (int, float)) or res <= 0:
        raise ConfigError(f"{path}: {label} resolution must be a positive number, got {res!r}")
    if kind not in ("pixel", "area", "pixel_area"):
        raise ConfigError(f"{path}: {label} resolution_type must be pixel, area or pixel_area, got {kind!r}")
    side = math.sqrt(res * 1e6) if kind == "area" else float(res)
    side = max(64, round(side / 64) * 64)
    out: dict[str, Any] = (
        {"resolution": side} if b.get("crop_aspect") != "square" else {"bucket_sizes": [f"{side}x{side}"]}
    )
    least = b.get("minimum_image_size")
    if least:
        if kind == "pixel":
            out["min_size"] = int(least)
        else:
            out["min_area"] = int(least * 1e6) if kind == "area" else int(least) * int(least)
    return out
