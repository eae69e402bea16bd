"""The ``dali-arb`` command line.

Every user mistake ends in one line on stderr (what was wrong, the value, what to do) and a
non-zero exit; ``--debug`` shows the traceback instead. DALI and torch are imported only by the
commands that run the loader.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

from .buckets import BucketSpec, format_size, parse_size
from .errors import ConfigError, DaliArbError

__all__ = ["main"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line, like every other error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(convert: type, description: str, accept) -> object:
    """An argparse type: ``convert`` the text and check it with ``accept``, naming the bad value."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: v > 0)
_probability = _number(float, "a probability between 0 and 1", lambda v: 0 <= v <= 1)


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text, what="size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bucket_options(parser: argparse.ArgumentParser) -> None:
    """The bucket options, same names wherever buckets are involved (CONTRACT.md)."""
    d = BucketSpec()
    g = parser.add_argument_group("bucket options")
    g.add_argument(
        "--max-area",
        type=_positive_int,
        default=d.max_area,
        help=f"largest bucket area in pixels (default {d.max_area})",
    )
    g.add_argument(
        "--min-dim", type=_positive_int, default=d.min_dim, help=f"smallest bucket side (default {d.min_dim})"
    )
    g.add_argument(
        "--max-dim", type=_positive_int, default=d.max_dim, help=f"largest bucket side (default {d.max_dim})"
    )
    g.add_argument(
        "--step", type=_positive_int, default=d.step, help=f"bucket sides are multiples of this (default {d.step})"
    )
    g.add_argument("--base", type=_size, default=d.base, metavar="WxH", help="base bucket (default 512x512)")
    g.add_argument(
        "--no-upscale", action="store_true", help="never enlarge images; small ones go to scaled-down buckets"
    )
    g.add_argument(
        "--max-aspect-error",
        type=_positive_float,
        default=d.max_aspect_error,
        help=f"reject images whose |log aspect| is further than this from every bucket (default {d.max_aspect_error}; 'inf' keeps all)",
    )


def spec_from_args(args: argparse.Namespace) -> BucketSpec:
    return BucketSpec(
        max_area=args.max_area,
        min_dim=args.min_dim,
        max_dim=args.max_dim,
        step=args.step,
        base=args.base,
        no_upscale=args.no_upscale,
        max_aspect_error=args.max_aspect_error,
    )


def add_plan_options(parser: argparse.ArgumentParser, *, batch_required: bool) -> None:
    g = parser.add_argument_group("plan options")
    g.add_argument(
        "--batch-size",
        "-b",
        type=_positive_int,
        required=batch_required,
        default=None if batch_required else 16,
        help="samples per batch per rank" + ("" if batch_required else " (default 16)"),
    )
    g.add_argument("--world-size", type=_positive_int, default=1, help="number of ranks (default 1)")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="shared by all ranks (default 0)")
    g.add_argument(
        "--leftover",
        choices=["nearest", "drop", "duplicate"],
        default="nearest",
        help="what to do with images that do not fill a batch (default nearest; see LeftoverPolicy)",
    )
    g.add_argument(
        "--independent-ranks",
        action="store_true",
        help="let each rank draw its own buckets (NovelAI) instead of all ranks training one bucket per step",
    )


# -- commands ------------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace) -> int:
    from .index import build_index

    summary = build_index(
        args.sources,
        args.output,
        max_pixels=args.max_pixels,
        workers=args.workers,
        update=args.update,
        progress=None if not args.quiet else False,
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
    spec = spec_from_args(args)
    if args.manifest is None:
        sizes = [{"width": int(w), "height": int(h)} for h, w in spec.sizes]
        if args.json:
            print(json.dumps({"buckets": sizes}))
        else:
            print(" ".join(format_size(s["height"], s["width"]) for s in sizes))
        return 0
    from .manifest import Manifest
    from .report import bucket_report, format_report

    manifest = Manifest.read(args.manifest, columns=[])
    report = bucket_report(
        manifest.heights,
        manifest.widths,
        spec,
        batch_size=args.batch_size,
        world_size=args.world_size,
        seed=args.seed,
        leftover=args.leftover,
        sync_ranks=not args.independent_ranks,
    )
    report["manifest"] = str(args.manifest)
    if args.plot:
        from .plots import plot_buckets

        plot_buckets(report, args.plot)
        report["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .manifest import Manifest
    from .planner import Planner
    from .world import World

    if not 0 <= args.rank < args.world_size:
        raise ConfigError(
            f"--rank must be in [0, {args.world_size - 1}] for --world-size {args.world_size}, got {args.rank}"
        )
    manifest = Manifest.read(args.manifest, columns=[])
    assignment = spec_from_args(args).assign(manifest.heights, manifest.widths)
    planner = Planner(
        assignment,
        batch_size=args.batch_size,
        world=World(rank=args.rank, world_size=args.world_size),
        seed=args.seed,
        leftover=args.leftover,
        sync_ranks=not args.independent_ranks,
    )
    plan = planner.epoch(args.epoch)
    keys = manifest.keys_at(plan.rows)
    B = plan.batch_size
    sizes = plan.sizes[plan.bucket]  # (steps, 2)
    out = sys.stdout
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    chunk: list[str] = []
    for step, (h, w) in enumerate(sizes.tolist()):
        chunk.append(
            f'{{"step": {step}, "width": {w}, "height": {h}, "ids": {dumps(keys[step * B : (step + 1) * B])}}}\n'
        )
        if len(chunk) >= 4096:
            out.write("".join(chunk))
            chunk.clear()
    out.write("".join(chunk))
    out.flush()
    return 0


# -- parser --------------------------------------------------------------------------------------

EPILOG_INDEX = """examples:
  dali-arb index ~/photos -o photos.parquet
  dali-arb index shards/shard-*.tar -o laion.parquet
  dali-arb index img2dataset_out/*.parquet -o meta.parquet
  dali-arb index ~/photos -o photos.parquet --update     # re-read only new or changed files
"""
EPILOG_BUCKETS = """examples:
  dali-arb buckets --json                               # just the bucket resolutions
  dali-arb buckets photos.parquet --batch-size 16 --world-size 8
  dali-arb buckets photos.parquet --plot buckets.png --json
"""
EPILOG_PLAN = """examples:
  dali-arb plan photos.parquet --batch-size 16 --world-size 8 --rank 3 --epoch 2 | head
output: one JSON object per step: {"step": i, "width": w, "height": h, "ids": [...]}
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="dali-arb", description="Aspect-ratio bucketed image batches for GPU training, decoded by NVIDIA DALI."
    )
    parser.add_argument("--version", action="version", version=f"dali-arb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "index",
        help="build a manifest from folders, tar shards or metadata",
        epilog=EPILOG_INDEX,
        formatter_class=fmt,
        description="Build a Parquet manifest (one row per image) from image folders (recursive), "
        "webdataset .tar shards, or Parquet/CSV metadata with key/width/height columns. "
        "Refused files are listed in MANIFEST.rejects.jsonl.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="image folder, .tar shard, or .parquet/.csv metadata")
    p.add_argument("-o", "--output", required=True, metavar="MANIFEST", help="manifest to write (.parquet)")
    p.add_argument(
        "--max-pixels", type=_positive_int, default=89_478_485, help="refuse larger images (default: Pillow's 89478485)"
    )
    p.add_argument("--workers", type=_positive_int, default=None, help="processes reading headers (default: all cores)")
    p.add_argument(
        "--update",
        action="store_true",
        help="reuse rows of an existing manifest for unchanged files (same size and mtime)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "buckets",
        help="dry run: how a manifest falls into buckets",
        epilog=EPILOG_BUCKETS,
        formatter_class=fmt,
        description="Report, per bucket, the images, full batches, leftovers, crop loss and upscaled share, "
        "and totals per epoch. With no MANIFEST, list the bucket resolutions.",
    )
    p.add_argument("manifest", nargs="?", metavar="MANIFEST", help="manifest from `dali-arb index`")
    add_bucket_options(p)
    add_plan_options(p, batch_required=False)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--plot", metavar="PNG", help="write a histogram of images per bucket")
    p.set_defaults(func=cmd_buckets)

    p = sub.add_parser(
        "plan",
        help="print one rank's batch plan for one epoch (JSON lines)",
        epilog=EPILOG_PLAN,
        formatter_class=fmt,
        description="Print the batches of one rank for one epoch. Same arguments, same output, on any machine.",
    )
    p.add_argument("manifest", metavar="MANIFEST")
    add_plan_options(p, batch_required=True)
    p.add_argument("--rank", type=_non_negative_int, default=0, help="this rank (default 0)")
    p.add_argument("--epoch", type=_non_negative_int, default=0, help="epoch (default 0)")
    add_bucket_options(p)
    p.set_defaults(func=cmd_plan)

    for extra in _EXTRA_COMMANDS:
        extra(sub, fmt)
    return parser


_EXTRA_COMMANDS: list = []  # loader commands register here (see commands.py)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dali-arb``; returns the exit code."""
    from . import commands  # noqa: F401  (registers the loader commands)

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed in one line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "max_aspect_error", None) is not None and math.isinf(args.max_aspect_error):
        args.max_aspect_error = math.inf
    try:
        return int(args.func(args) or 0)
    except DaliArbError as exc:
        if args.debug:
            raise
        print(f"dali-arb {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # stdout closed early (`| head`): not an error. Silence the flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"dali-arb {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"dali-arb {args.command}: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug of ours: still one line, with the way to learn more
        if args.debug:
            raise
        print(
            f"dali-arb {args.command}: internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
