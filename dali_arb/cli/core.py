"""The core commands of ``dali-arb``: index, buckets, plan. They need neither DALI nor torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..plan.batching import BatchSizing
from ..plan.buckets import BucketSpec, format_size
from ..plan.frames import FrameSpec
from .batching import batch_from_args
from .configs import add_caption_options, expand_config
from .options import (
    add_bucket_options,
    add_cache_option,
    add_frame_options,
    add_plan_options,
    frames_from_args,
    non_negative_int,
    positive_int,
    spec_from_args,
)

__all__ = ["png_path", "register"]


def png_path(text: str, option: str) -> Path:
    """Where a picture goes: ``text`` as given when it ends in ``.png``, with ``.png`` added when it has
    no suffix; any other suffix, a folder, or a folder that does not exist is refused in one line, before any work
    (the file written is always the one named; no folder is made, as with ``index -o``)."""
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise ConfigError(f"{option} {text} is a folder; name the picture in it, e.g. {path / 'preview.png'}")
    if path.suffix == "":
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() != ".png":
        raise ConfigError(f"{option} must name a .png file, got {text!r}")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {text}: folder {path.parent} does not exist; create it or choose another {option}")
    return path


# -- commands ------------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace) -> int:
    from ..data.pairs import PairSpec
    from ..index import build_index
    from .configs import caption_source, index_from_config

    if args.config_format:
        return index_from_config(args)
    pairs = [PairSpec.parse(text, "pair") for text in args.pair or []]
    pairs += [PairSpec.parse(text, "mask") for text in args.mask or []]
    summary = build_index(
        args.sources,
        args.output,
        max_pixels=args.max_pixels,
        workers=args.workers,
        update=args.update,
        progress=None if not args.quiet else False,
        pairs=pairs,
        captions=caption_source(args),
        engine=args.engine,
        address=args.address,
    )
    print(summary.line(), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(
            json.dumps(
                {
                    "manifest": str(summary.manifest),
                    "rows": summary.rows,
                    "rejected": summary.rejected,
                    "reused": summary.reused,
                    "files": summary.files_seen,
                    "seconds": round(summary.seconds, 3),
                    "files_per_s": round(summary.files_per_s, 1),
                    "reject_reasons": summary.reject_reasons,
                }
            )
        )
    return 0


def cmd_buckets(args: argparse.Namespace) -> int:
    expand_config(args)  # a loader config where a manifest goes: its manifests, repeats, buckets, batch size
    spec = getattr(args, "config_spec", None) or spec_from_args(args)
    batch = batch_from_args(args, default=16)
    frames = frames_from_args(args)
    if frames is not None:
        return _clip_buckets(args, spec, batch, frames)
    plot_path = png_path(args.plot, "--plot") if args.plot else None
    if not args.manifest:
        sizes = [{"width": int(w), "height": int(h)} for h, w in spec.sizes]
        if not isinstance(batch, int) or args.batch_size is not None:  # the batch each bucket would get
            per_step = BatchSizing.of(batch).per_bucket(spec.sizes).tolist()
            sizes = [{**s, "images_per_step": b, "pixels_per_step": b * s["width"] * s["height"]}
                     for s, b in zip(sizes, per_step)]  # fmt: skip
        if args.json:
            print(json.dumps({"buckets": sizes}))
        else:
            print(" ".join(_bucket_word(s) for s in sizes))
        return 0
    from ..data.manifest import Manifest
    from ..tools.report import REJECTED_LISTED, bucket_report, format_report

    manifests = [Manifest.open(path, cache_dir=args.cache_dir) for path in args.manifest]
    several = len(manifests) > 1 or args.repeats is not None
    report = bucket_report(
        [m.heights for m in manifests] if several else manifests[0].heights,
        [m.widths for m in manifests] if several else manifests[0].widths,
        spec,
        batch_size=batch,
        world_size=args.world_size,
        seed=args.seed,
        leftover=args.leftover,
        sync_ranks=not args.independent_ranks,
        repeats=args.repeats,
        epoch=args.epoch,
        keys=[m.keys_at for m in manifests] if several else manifests[0].keys_at,
        rejected_limit=None if args.rejected else REJECTED_LISTED,
    )
    report["manifest"] = str(args.manifest[0]) if len(args.manifest) == 1 else [str(p) for p in args.manifest]
    if args.rejected:
        write_rejected(report["rejected"], [str(p) for p in args.manifest], Path(args.rejected))
        report["rejected"] = report["rejected"][:REJECTED_LISTED]
        report["rejected_file"] = str(args.rejected)
    if args.plot:
        from ..tools.plots import plot_buckets

        plot_buckets(report, plot_path)
        report["plot"] = str(plot_path)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_report(report))
        if args.rejected:
            print(f"rejected images written to {args.rejected}")
        if args.plot:
            print(f"plot written to {plot_path}")
    return 0


def _clip_buckets(args: argparse.Namespace, spec: BucketSpec, batch, frames: FrameSpec) -> int:
    """``buckets --frames``: the (frames, width, height) buckets, and with manifests how their clips fall in them
    (clips, clips per step, full batches, leftovers per bucket; videos, images, clips and steps per epoch)."""
    if args.rejected:
        raise ConfigError("--rejected lists rejected images; leave it out with --frames")
    if args.plot and not args.manifest:
        raise ConfigError("--plot draws how a manifest's clips fall in the buckets: give the manifest too")
    plot_path = png_path(args.plot, "--plot") if args.plot else None  # checked before any work
    sizing = BatchSizing.of(batch)
    if not args.manifest:
        sizes = np.tile(spec.sizes, (len(frames.frames), 1))
        counts = np.repeat(np.asarray(frames.frames, np.int64), len(spec.sizes))
        per_step = sizing.per_bucket(sizes, counts).tolist()
        words = [{"frames": int(f), "width": int(w), "height": int(h), "clips_per_step": int(b),
                  "pixels_per_step": int(b) * int(f) * int(w) * int(h)}
                 for f, (h, w), b in zip(counts.tolist(), sizes.tolist(), per_step)]  # fmt: skip
        if args.json:
            print(json.dumps({"buckets": words, "frames": frames.to_dict()}))
        else:
            print(
                " ".join(f"{b['frames']}x{format_size(b['height'], b['width'])}:{b['clips_per_step']}" for b in words)
            )
        return 0
    from ..data.manifest import Manifest
    from ..loader.planning import build_planner

    manifests = [Manifest.open(path, cache_dir=args.cache_dir) for path in args.manifest]
    config = _plan_config(args, manifests, spec=spec, batch=batch, rank=0, frames=frames)
    planner = build_planner(config, manifests)
    plan = planner.epoch(args.epoch)
    counts = planner.index.epoch_counts(args.epoch)
    units = planner.units
    rows = []
    for k in np.flatnonzero(counts).tolist():
        h, w = (int(v) for v in planner.index.sizes[k])
        n, u = int(counts[k]), int(units[k])
        f, b = int(planner.frames[k]), int(planner.batch[k])
        rows.append({"frames": f, "width": w, "height": h, "clips": n, "clips_per_step": b,
                     "pixels_per_step": b * f * w * h, "full_batches": n // u, "leftover": n % u})  # fmt: skip
    is_video = np.concatenate([m.video_columns()[0] > 0 for m in manifests])  # (N,) over the datasets' rows
    videos = int(is_video.sum())
    table = planner.clips
    report = {
        "manifest": [str(p) for p in args.manifest],
        "frames": frames.to_dict(),
        "buckets": rows,
        "rows": sum(len(m) for m in manifests),
        "videos": videos,
        "clips": len(table),
        "clips_from_videos": int(is_video[table.row].sum()),
        "epoch": args.epoch,
        "steps_per_epoch": len(plan),
        "leftover": plan.leftover.value,
        "trimmed": plan.trimmed,
        "dropped": plan.dropped,
        "duplicated": plan.duplicated,
    }
    if plot_path is not None:
        from ..tools.plots import plot_clip_buckets

        plot_clip_buckets(report, plot_path)
        report["plot"] = str(plot_path)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(f"{report['rows']} rows ({videos} videos) -> {len(table)} clips; frames {list(frames.frames)}, "
          f"fps {frames.fps or 'own'}, clip {frames.clip}")  # fmt: skip
    print(f"{'frames':>6} {'bucket':>11} {'clips':>7} {'per step':>8} {'px/step':>8} {'batches':>7} {'leftover':>8}")
    for r in rows:
        size = format_size(r["height"], r["width"])
        print(f"{r['frames']:>6} {size:>11} {r['clips']:>7} {r['clips_per_step']:>8} "
              f"{r['pixels_per_step'] / 1e6:>7.1f}M {r['full_batches']:>7} {r['leftover']:>8}")  # fmt: skip
    print(f"epoch {args.epoch}: {len(plan)} steps, leftover {plan.leftover.value}; trimmed {plan.trimmed}, "
          f"dropped {plan.dropped}, served twice {plan.duplicated}")  # fmt: skip
    if plot_path is not None:
        print(f"plot written to {plot_path}")
    return 0


def _plan_config(args: argparse.Namespace, manifests: list, *, spec, batch, rank: int, frames) -> Any:
    """The loader's :class:`LoaderConfig` of the plan options (the one way ``buckets --frames`` and ``plan`` plan)."""
    from ..loader.planning import LoaderConfig
    from ..plan.mixture import check_repeats

    several = len(manifests) > 1
    return LoaderConfig(
        batch_size=batch, spec=spec, seed=args.seed, rank=rank, world_size=args.world_size, leftover=args.leftover,
        sync_ranks=not args.independent_ranks, crop="random", flip=0.0,
        repeats=check_repeats(args.repeats, len(manifests)) if several or args.repeats is not None else None,
        frames=frames,
    )  # fmt: skip


def _bucket_word(size: dict) -> str:
    """``WxH``, with ``:B`` images per step when the report has them."""
    word = format_size(size["height"], size["width"])
    return f"{word}:{size['images_per_step']}" if "images_per_step" in size else word


#: What a spreadsheet reads as a formula at the start of a cell (CSV injection): such a cell gets a leading ``'``.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` as a CSV cell no spreadsheet runs: one starting with ``= + - @``, a tab or a carriage return gets
    a leading ``'`` (OWASP's advice); anything else is unchanged."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_rejected(rejected: list[dict], manifests: list[str], path: Path) -> None:
    """The rejected images as CSV (``manifest,key,reason,width,height``; quoted as needed, so keys holding commas
    or newlines survive; a text cell a spreadsheet would run as a formula starts with ``'``), one row per image,
    written atomically."""
    import csv
    import io

    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow(["manifest", "key", "reason", "width", "height"])
    for entry in rejected:
        key = entry.get("key", entry["row"])
        texts = (manifests[entry.get("dataset", 0)], str(key), entry["reason"])
        out.writerow([*map(spreadsheet_safe, texts), entry["width"], entry["height"]])
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text.getvalue(), encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        raise ConfigError(f"--rejected: cannot write {str(path)!r}: {exc.strerror or exc}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from ..data.manifest import Manifest, ManifestSet
    from ..loader.planning import build_planner
    from ..tools.report import plan_steps

    if not 0 <= args.rank < args.world_size:
        raise ConfigError(
            f"--rank must be in [0, {args.world_size - 1}] for --world-size {args.world_size}, got {args.rank}"
        )
    expand_config(args)  # a loader config where a manifest goes: its manifests, repeats, buckets, batch size
    manifests = [Manifest.open(path, cache_dir=args.cache_dir) for path in args.manifest]
    several = len(manifests) > 1
    frames = frames_from_args(args)
    config = _plan_config(args, manifests, spec=getattr(args, "config_spec", None) or spec_from_args(args),
                          batch=batch_from_args(args, default=16), rank=args.rank, frames=frames)  # fmt: skip
    planner = build_planner(config, manifests)  # the loader's own planner
    plan = planner.epoch(args.epoch)
    data = ManifestSet(manifests)
    rows, bounds, bucket = plan_steps(plan)  # (S,), (steps + 1,), (steps,): batches may differ in size
    starts = None
    if frames is not None:  # clip ids: their rows, and each clip's first frame on the target-rate timeline
        starts = planner.clips.start[rows].tolist()
        rows = planner.clips.row[rows]
    keys = data.keys_at(rows)
    datasets = data.dataset_of(rows).tolist() if several else None
    sizes = plan.sizes[bucket]  # (steps, 2)
    out = sys.stdout
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    chunk: list[str] = []
    for step, ((h, w), a, b) in enumerate(zip(sizes.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())):
        extra = f', "datasets": {dumps(datasets[a:b])}' if several else ""
        if starts is not None:
            extra += f', "frames": {int(plan.frames[bucket[step]])}, "starts": {dumps(starts[a:b])}'
        chunk.append(f'{{"step": {step}, "width": {w}, "height": {h}, "ids": {dumps(keys[a:b])}{extra}}}\n')
        if len(chunk) >= 4096:
            out.write("".join(chunk))
            chunk.clear()
    out.write("".join(chunk))
    out.flush()
    return 0


# -- registration --------------------------------------------------------------------------------------

EPILOG_INDEX = """examples:
  dali-arb index ~/photos -o photos.parquet
  dali-arb index shards/shard-*.tar -o laion.parquet
  dali-arb index img2dataset_out/*.parquet -o meta.parquet
  dali-arb index ~/photos -o photos.parquet --update     # re-read only new or changed files
  dali-arb index ~/photos -o cn.parquet --pair depth=~/depth --mask hole=~/masks   # ~/depth/KEY.png per image
  dali-arb index shards/*.tar -o cn.parquet --pair depth  # tar members KEY.depth.png
  dali-arb index s3://bucket/photos/ -o s3://bucket/photos.parquet --update   # in object storage
"""
EPILOG_BUCKETS = """examples:
  dali-arb buckets --json                               # just the bucket resolutions
  dali-arb buckets photos.parquet --batch-size 16 --world-size 8
  dali-arb buckets photos.parquet --plot buckets.png --json
  dali-arb buckets a.parquet b.parquet --repeats 3,0.5   # two datasets, a thrice, half of b each epoch
  dali-arb buckets photos.parquet --batch-pixels 16*512*512 --max-batch 32   # a pixel budget: images per bucket
  dali-arb buckets photos.parquet --rejected rejected.csv --epoch 3          # name the rejected images
  dali-arb buckets clips.parquet --frames 1,17,33 --fps 24 --clip chunk --batch-pixels 4*17*512*512   # videos
"""
EPILOG_PLAN = """examples:
  dali-arb plan photos.parquet --batch-size 16 --world-size 8 --rank 3 --epoch 2 | head
  dali-arb plan a.parquet b.parquet --repeats 3,0.5 -b 16    # two datasets: ids with "datasets": [0, 1, ...]
  dali-arb plan photos.parquet --batch-pixels 2048x2048      # a pixel budget: batches differ in size by bucket
  dali-arb plan clips.parquet --frames 1,17,33 --fps 24 --clip slide --stride 8    # clips of videos
output: one JSON object per step: {"step": i, "width": w, "height": h, "ids": [...]}; with --frames also
"frames": F and "starts": each clip's first frame (at --fps)
"""


def register(sub: argparse._SubParsersAction, fmt: type) -> None:
    """Add index, buckets and plan to the ``dali-arb`` parser."""
    p = sub.add_parser(
        "index",
        help="build a manifest from folders, tar shards or metadata",
        epilog=EPILOG_INDEX,
        formatter_class=fmt,
        description="Build a Parquet manifest (one row per image) from image folders (recursive), "
        "webdataset .tar shards, or Parquet/CSV metadata with key/width/height columns. "
        "Refused files are listed in MANIFEST.rejects.jsonl.",
    )
    from ..index.readers import accepted  # (the kinds of source are the indexer's table: its help is theirs)

    p.add_argument("sources", nargs="+", metavar="SRC", help=f"what to index: {accepted()}")
    p.add_argument(
        "-o", "--output", required=True, metavar="MANIFEST",
        help="manifest to write: a .parquet file, or a folder ending in / (or an existing one) for a manifest in "
             "parts; local, or an s3:// or gs:// URL (built locally, then uploaded)",
    )  # fmt: skip
    p.add_argument(
        "--max-pixels", type=positive_int, default=89_478_485, help="refuse larger images (default: Pillow's 89478485)"
    )
    p.add_argument("--workers", type=positive_int, default=None, help="processes reading headers (default: all cores)")
    p.add_argument(
        "--update",
        action="store_true",
        help="reuse rows of an existing manifest for unchanged files (same size, mtime and ctime; in object storage the "
        "same ETag); into a manifest in parts (-o DIR/), whole parts whose sources are all unchanged are kept as they are",
    )
    p.add_argument(
        "--pair", action="append", metavar="NAME[=DIR]",
        help="a paired image (3 channels, e.g. a ControlNet condition): DIR/KEY.<ext> for image KEY (DIR may be an "
        "s3:// or gs:// prefix when the images are in storage), or tar members KEY.NAME.<ext>; the loader serves it "
        "as batch[NAME], cut and flipped as the image (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--mask", action="append", metavar="NAME[=DIR]",
        help="a mask (1 channel, [0, 1] for float dtypes), found like --pair (repeatable)",
    )  # fmt: skip
    add_caption_options(p)  # --from kohya|simpletuner, --caption-extension, --captions FILE...
    from ..index.engines import ENGINES

    p.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="local",
        help="where headers are read: local (worker processes here, the default) or ray (Ray tasks on a cluster: "
        "pip install 'dali-arb[ray]'; the same rows)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="with --engine ray: the cluster to join (auto, HOST:6379, ray://HOST:10001); default: start one here",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "buckets",
        help="dry run: how a manifest falls into buckets",
        epilog=EPILOG_BUCKETS,
        formatter_class=fmt,
        description="Report, per bucket, the images, images and pixels per step, full batches, leftovers, trimmed "
        "images, crop loss (at each image's own bucket, and as served in --epoch, leftovers included) and upscaled "
        "share, and totals per epoch; name the rejected images. With no MANIFEST, list the bucket resolutions "
        "(WxH:B with the images per step of a batch option).",
    )
    p.add_argument(
        "manifest", nargs="*", metavar="MANIFEST",
        help="manifest(s) from `dali-arb index` (several: one per dataset), or a loader config (dali_arb.toml)",
    )  # fmt: skip
    add_bucket_options(p)
    add_plan_options(p, batch_required=False)
    add_cache_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--plot", metavar="PNG", help="write a histogram of images per bucket")
    p.add_argument("--epoch", type=non_negative_int, default=0, help="the epoch the report describes (default 0)")
    p.add_argument(
        "--rejected", metavar="CSV",
        help="write every rejected image (manifest,key,reason,width,height) to this CSV file",
    )  # fmt: skip
    add_frame_options(p)
    p.set_defaults(func=cmd_buckets)

    p = sub.add_parser(
        "plan",
        help="print one rank's batch plan for one epoch (JSON lines)",
        epilog=EPILOG_PLAN,
        formatter_class=fmt,
        description="Print the batches of one rank for one epoch. Same arguments, same output, on any machine.",
    )
    p.add_argument("manifest", nargs="+", metavar="MANIFEST",
                   help="manifest(s) (several: one per dataset), or a loader config (dali_arb.toml)")  # fmt: skip
    add_plan_options(p, batch_required=False)  # (batch 16 by default, like buckets)
    add_cache_option(p)
    p.add_argument("--rank", type=non_negative_int, default=0, help="this rank (default 0)")
    p.add_argument("--epoch", type=non_negative_int, default=0, help="epoch (default 0)")
    add_bucket_options(p)
    add_frame_options(p)
    p.set_defaults(func=cmd_plan)
