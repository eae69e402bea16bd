"""kohya sd-scripts' datasets as they are: a dataset TOML (``--dataset_config``: ``[general]``, ``[[datasets]]``,
``[[datasets.subsets]]``) or a DreamBooth ``train_data_dir`` (folders ``N_name``: ``N`` repeats, class tokens
``name``), read as kohya reads them (``library/config_util.py``, ``library/train_util.py``):

- an option of ``[general]`` holds for every dataset and subset, a dataset's for its subsets, a subset's own wins;
- each subset is one of our datasets: the images at the top level of ``image_dir`` (``.png .jpg .jpeg .webp .bmp``,
  lower or upper case: kohya's ``IMAGE_EXTENSIONS``), served ``num_repeats`` times per epoch; a subset with fewer
  than one repeat is left out, as kohya does;
- captions: the first line of ``<image stem><caption_extension>`` (default ``.caption``; every line with
  ``enable_wildcard``), else the subset's ``class_tokens``; then prefix/suffix, dropout, shuffle, keep tokens, the
  keep-tokens separator and tag dropout in kohya's order (:attr:`CaptionPolicy.kohya_order`);
- buckets: kohya's ``make_bucket_resolutions(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)`` as an
  explicit list (one bucket, the resolution, without ``enable_bucket``), no image rejected for its aspect,
  ``bucket_no_upscale``; ``flip_aug`` is a flip probability of 0.5, ``random_crop`` a random crop (else centred);
- regularisation subsets (``is_reg``) serve as many images per epoch as the training subsets, as kohya does;
- ControlNet subsets (``conditioning_data_dir``): the image of the same stem there is a pair, ``batch["conditioning"]``,
  resized, cropped and flipped with the image (an image without one is rejected with a reason; kohya stops).

Options with no meaning for a loader, or not supported, are named in a note each (:attr:`Converted.notes`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..index.captions import CaptionSource
from .convert import Converted, IndexJob
from .ours import DatasetEntry, tomllib

__all__ = ["IMAGE_EXTENSIONS", "bucket_resolutions", "from_dreambooth_folder", "from_toml", "is_dreambooth_folder"]

#: The extensions kohya reads (``train_util.IMAGE_EXTENSIONS`` without the optional AVIF and JPEG XL plug-ins).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP")

#: kohya's defaults (``config_util``: ``BaseSubsetParams``, ``DreamBoothSubsetParams``, ``DreamBoothDatasetParams``).
DEFAULTS: dict[str, Any] = {
    "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
    "keep_tokens_separator": "", "caption_prefix": "", "caption_suffix": "", "caption_dropout_rate": 0.0,
    "caption_tag_dropout_rate": 0.0, "flip_aug": False, "random_crop": False, "enable_wildcard": False,
    "caption_extension": ".caption", "class_tokens": None, "is_reg": False, "secondary_separator": "",
    "caption_dropout_every_n_epochs": 0,
    "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False, "resolution": None,
}  # fmt: skip
#: Options read but with no meaning for a loader (or not supported yet), and why: one note each where set.
IGNORED = {
    "color_aug": "colour jitter is not an augmentation of this loader",
    "face_crop_aug_range": "face crops are not an augmentation of this loader",
    "token_warmup_min": "token warm-up follows the training step count, which the loader does not know",
    "token_warmup_step": "token warm-up follows the training step count, which the loader does not know",
    "cache_info": "the manifest is the loader's cache of sizes and captions",
    "alpha_mask": "alpha masks are not read; index masks with --mask NAME=DIR",
    "custom_attributes": "only the training script reads them",
    "validation_split": "no validation split; index the validation images as their own manifest",
    "validation_seed": "no validation split; index the validation images as their own manifest",
    "network_multiplier": "a training option, not a loader one",
    "resize_interpolation": "DALI resizes with its antialiased linear filter",
    "debug_dataset": "use `dali-arb preview` to look at batches",
    "max_token_length": "tokenizing is the training script's",
    "prior_loss_weight": "weighting the loss is the training script's (batch['dataset'] says which samples are regularisation)",
}  # fmt: skip
SUBSET_ONLY = ("image_dir", "is_reg", "class_tokens", "caption_extension", "num_repeats", "metadata_file",
               "conditioning_data_dir")  # fmt: skip
KNOWN = set(DEFAULTS) | set(IGNORED) | set(SUBSET_ONLY) | {"subsets"}


def bucket_resolutions(resolution: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                       divisible: int = 64) -> list[tuple[int, int]]:  # fmt: skip
    """kohya's ``model_util.make_bucket_resolutions``: ``(width, height)`` buckets of area at most the
    resolution's, sides from ``min_size`` to ``max_size`` in steps of ``divisible``, plus the square; sorted."""
    max_width, max_height = resolution
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def is_dreambooth_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding at least one ``N_name`` folder (kohya's ``train_data_dir``)."""
    path = Path(path)
    return path.is_dir() and any(p.is_dir() and _repeats_of(p.name)[0] > 0 for p in path.iterdir())


def _repeats_of(name: str) -> tuple[int, str]:
    """kohya's ``extract_dreambooth_params``: ``"10_sks dog"`` -> ``(10, "sks dog")``; ``(0, "")`` without repeats."""
    tokens = name.split("_")
    try:
        return int(tokens[0]), "_".join(tokens[1:])
    except ValueError:
        return 0, ""


def from_dreambooth_folder(path: str | os.PathLike, *, reg_data_dir: str | os.PathLike | None = None,
                           resolution: int | tuple[int, int] | None = None, batch_size: int | None = None,
                           **options: Any) -> Converted:  # fmt: skip
    """The datasets of a kohya ``train_data_dir`` (and ``reg_data_dir``): one subset per ``N_name`` folder
    (kohya's ``generate_dreambooth_subsets_config_by_subdirs``); ``options`` are kohya's dataset/subset options of the
    command line (``enable_bucket=True``, ``caption_extension=".txt"``...), as in ``[general]``."""
    subsets = []
    for base, is_reg in ((path, False), (reg_data_dir, True)):
        if base is None:
            continue
        if not Path(base).is_dir():
            raise ConfigError(f"{base} is not a folder; give kohya's train_data_dir (a folder of N_name folders)")
        for sub in sorted(Path(base).iterdir()):
            repeats, tokens = _repeats_of(sub.name)
            if sub.is_dir() and repeats >= 1:
                subsets.append(
                    {"image_dir": str(sub), "num_repeats": repeats, "class_tokens": tokens, "is_reg": is_reg}
                )
    if not subsets:
        raise ConfigError(f"{path} holds no N_name folders (e.g. 10_sks dog: 10 repeats, class tokens 'sks dog')")
    general = {
        k: v for k, v in {"resolution": resolution, "batch_size": batch_size, **options}.items() if v is not None
    }
    return _convert({"general": general, "datasets": [{"subsets": subsets}]}, Path(path), str(path))


def from_toml(path: str | os.PathLike) -> Converted:
    """The datasets of a kohya dataset TOML (``image_dir`` relative to the working directory, as kohya reads it)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"kohya config {path} cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"kohya config {path} is not valid TOML ({exc})") from None
    if not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise ConfigError(f"kohya config {path} has no [[datasets]] (with [[datasets.subsets]] naming image_dir)")
    return _convert(data, path, str(path))


def _convert(data: dict[str, Any], path: Path, where: str) -> Converted:
    out = Converted()
    general = data.get("general", {})
    for name in sorted(set(data) - {"general", "datasets"}):
        out.notes.append(f"{where}: [{name}] ignored: kohya's dataset config has only [general] and [[datasets]]")
    _note_options(general, "[general]", out)
    train_images, reg = 0, []  # images x repeats of the training subsets; the regularisation entries
    batch_sizes, flips, crops = [], [], []
    for d, dataset in enumerate(data["datasets"]):
        subsets = dataset.get("subsets") or []
        _note_options(dataset, f"datasets[{d}]", out)
        if not subsets:
            raise ConfigError(f"{where}: datasets[{d}] has no [[datasets.subsets]]; give each an image_dir")
        for s, subset in enumerate(subsets):
            label = f"datasets[{d}].subsets[{s}]"
            _note_options(subset, label, out)
            opts = {**DEFAULTS, **general, **dataset, **subset}
            if "metadata_file" in opts:
                raise ConfigError(f"{where}: {label} is a fine-tuning subset (metadata_file): not read yet; give "
                                  "image_dir with caption files, or index the images with --captions FILE")  # fmt: skip
            if not opts.get("image_dir"):
                raise ConfigError(f"{where}: {label} has no image_dir")
            repeats = _int(opts["num_repeats"], "num_repeats", label, where)
            if repeats < 1:
                out.notes.append(
                    f"{label} ({opts['image_dir']}) left out: num_repeats {repeats} is under 1, as kohya does"
                )
                continue
            entry, job = _subset(opts, repeats, label, where, len(out.datasets))
            out.add(entry, job)
            batch_sizes.append(_int(opts["batch_size"], "batch_size", label, where))
            flips.append(bool(opts["flip_aug"]))
            crops.append(bool(opts["random_crop"]))
            if opts["is_reg"]:
                reg.append((entry, _count_images(job)))
            else:
                train_images += repeats * _count_images(job)
    _balance_regularisation(reg, train_images, out)
    _loader_options(out, batch_sizes, flips, crops)
    return out


def _subset(opts: dict[str, Any], repeats: int, label: str, where: str, number: int) -> tuple[DatasetEntry, IndexJob]:
    folder = str(opts["image_dir"])
    wildcard = bool(opts["enable_wildcard"])
    captions = {
        "kohya_order": True, "instance_prompt": opts["class_tokens"] or "",
        "shuffle_tags": opts["shuffle_caption"], "keep_tags": opts["keep_tokens"],
        "separator": opts["caption_separator"], "keep_separator": opts["keep_tokens_separator"] or "",
        "prefix": opts["caption_prefix"] or "", "suffix": opts["caption_suffix"] or "",
        "dropout": _number(opts["caption_dropout_rate"]), "tag_dropout": _number(opts["caption_tag_dropout_rate"]),
        "secondary_separator": opts["secondary_separator"] or "",
        "dropout_every_epochs": opts["caption_dropout_every_n_epochs"],
    }  # fmt: skip
    _check(captions, opts, label, where)
    name = f"{number:02d}_{_safe(Path(folder).name)}.parquet"
    entry = DatasetEntry(name, float(repeats), _buckets(opts, label, where), captions, source=folder)
    pairs = ()
    if opts.get(
        "conditioning_data_dir"
    ):  # ControlNet: the image of the same stem there, served as batch["conditioning"]
        from ..data.pairs import PairSpec

        pairs = (PairSpec("conditioning", "pair", str(opts["conditioning_data_dir"])),)
    job = IndexJob(folder, CaptionSource(extension=opts["caption_extension"], first_line=not wildcard),
                   top_only=True, extensions=IMAGE_EXTENSIONS, pairs=pairs)  # fmt: skip
    return entry, job


#: Our caption field -> kohya's option, to name the option a user wrote in an error.
KOHYA_NAMES = {"instance_prompt": "class_tokens", "shuffle_tags": "shuffle_caption", "keep_tags": "keep_tokens",
               "separator": "caption_separator", "keep_separator": "keep_tokens_separator", "prefix": "caption_prefix",
               "suffix": "caption_suffix", "dropout": "caption_dropout_rate", "tag_dropout": "caption_tag_dropout_rate",
               "secondary_separator": "secondary_separator",
               "dropout_every_epochs": "caption_dropout_every_n_epochs"}  # fmt: skip


def _check(captions: dict[str, Any], opts: dict[str, Any], label: str, where: str) -> None:
    """A ConfigError naming the kohya option (and its value) that makes no valid caption policy."""
    from ..plan.captions import CaptionPolicy

    for field, option in KOHYA_NAMES.items():
        try:
            CaptionPolicy(**{field: captions[field]})
        except ConfigError:
            raise ConfigError(f"{where}: {label}: {option} = {opts[option]!r} is not valid "
                              f"({_KINDS.get(option, 'see kohya docs')})") from None  # fmt: skip


_KINDS = {"shuffle_caption": "true or false", "keep_tokens": "a non-negative integer",
          "caption_dropout_rate": "a probability in [0, 1]", "caption_tag_dropout_rate": "a probability in [0, 1]",
          "caption_separator": "a non-empty string", "class_tokens": "a string", "caption_prefix": "a string",
          "caption_suffix": "a string", "keep_tokens_separator": "a string", "secondary_separator": "a string",
          "caption_dropout_every_n_epochs": "a non-negative integer"}  # fmt: skip


def _buckets(opts: dict[str, Any], label: str, where: str) -> dict[str, Any]:
    """BucketSpec keywords of kohya's bucket options."""
    res = opts["resolution"]
    if res is None:
        raise ConfigError(f"{where}: {label} has no resolution (kohya takes --resolution); give resolution = 1024 "
                          "or [width, height] in [general] (a train_data_dir: --set resolution=1024 on the command "
                          "line, trainer_options={'resolution': 1024} in Python)")  # fmt: skip
    if isinstance(res, int) and not isinstance(res, bool):
        res = (res, res)
    elif isinstance(res, str):
        res = tuple(int(v) for v in res.split(","))
    if not (isinstance(res, (list, tuple)) and len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res)):
        raise ConfigError(f"{where}: {label} resolution must be a size or [width, height], got {opts['resolution']!r}")
    width, height = res
    if opts["enable_bucket"]:
        sizes = bucket_resolutions((width, height), _int(opts["min_bucket_reso"], "min_bucket_reso", label, where),
                                   _int(opts["max_bucket_reso"], "max_bucket_reso", label, where),
                                   _int(opts["bucket_reso_steps"], "bucket_reso_steps", label, where))  # fmt: skip
    else:
        sizes = [(width, height)]
    if not sizes:
        raise ConfigError(f"{where}: {label}: min_bucket_reso..max_bucket_reso leave no bucket for resolution {res}")
    return {"bucket_sizes": [f"{w}x{h}" for w, h in sizes], "no_upscale": bool(opts["bucket_no_upscale"]),
            "max_aspect_error": math.inf}  # fmt: skip


def _balance_regularisation(reg: list[tuple[DatasetEntry, int]], train_images: int, out: Converted) -> None:
    """kohya serves regularisation images until they number the training images (with repeats) per epoch: scale
    the regularisation subsets' repeats so that they do (fractional repeats: another subset of images each epoch,
    where kohya keeps a fixed one)."""
    reg_images = sum(entry.repeats * count for entry, count in reg)
    if not reg or reg_images == 0:
        return
    scale = train_images / reg_images
    for entry, _ in reg:
        entry.repeats = entry.repeats * scale
    out.notes.append(f"regularisation subsets serve {train_images} images per epoch, as many as the training subsets "
                     f"(repeats scaled by {scale:.4g}, as kohya balances them)")  # fmt: skip


def _loader_options(out: Converted, batch_sizes: list[int], flips: list[bool], crops: list[bool]) -> None:
    out.loader["batch_size"] = batch_sizes[0] if batch_sizes else 1
    out.loader["leftover"] = "partial"  # kohya batches each bucket's last images as a smaller batch
    if len(set(batch_sizes)) > 1:
        out.notes.append(f"batch_size differs between datasets ({sorted(set(batch_sizes))}): one loader has one; "
                         f"using {batch_sizes[0]}")  # fmt: skip
    out.loader["flip"] = 0.5 if any(flips) else 0.0
    if len(set(flips)) > 1:
        out.notes.append("flip_aug is on for some subsets only: the loader flips every dataset with probability 0.5")
    out.loader["crop"] = "random" if any(crops) else "center"
    if len(set(crops)) > 1:
        out.notes.append("random_crop is on for some subsets only: the loader crops every dataset at random")


def _note_options(table: dict[str, Any], label: str, out: Converted) -> None:
    for name in table:
        if name in IGNORED:
            out.notes.append(f"{label}: {name} ignored: {IGNORED[name]}")
        elif name not in KNOWN:
            out.notes.append(f"{label}: {name} ignored: not a kohya dataset option (a typo?)")


def _count_images(job: IndexJob) -> int:
    """Images kohya would read in ``job.folder`` (its top level, its extensions)."""
    try:
        return sum(1 for e in os.scandir(job.folder) if e.is_file() and os.path.splitext(e.name)[1] in IMAGE_EXTENSIONS)
    except OSError as exc:
        raise ConfigError(f"image_dir {job.folder} cannot be listed ({exc.strerror or exc})") from None


def _number(value: Any) -> Any:
    """An int rate as a float (kohya's TOML may say 0 for 0.0); anything else as it is, for the check to name."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _int(value: Any, name: str, label: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {label} {name} must be an integer, got {value!r}")
    return value


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "images"
