"""Option parsing shared by every ``dali-arb`` command: one-line usage errors, number checks, bucket
and plan options. Imports nothing of the loader."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ..errors import ConfigError
from ..plan.buckets import BucketSpec, parse_area, parse_size, parse_sizes
from ..plan.frames import CLIP_MODES, FrameSpec
from ..plan.planner import LeftoverPolicy
from .batching import add_batch_options

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "add_bucket_options",
    "add_frame_options",
    "add_plan_options",
    "frames_from_args",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "probability",
    "read_bucket_sizes",
    "spec_from_args",
]

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
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


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: v > 0)
non_negative_float = _number(float, "a non-negative number", lambda v: v >= 0 and v != float("inf"))
probability = _number(float, "a probability between 0 and 1", lambda v: 0 <= v <= 1)


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text, what="size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _area(text: str) -> int:
    try:
        return parse_area(text, what="area")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_bucket_sizes(text: str) -> list[tuple[int, int]]:
    """``--bucket-sizes``: the ``(width, height)`` buckets listed in the file ``text``, or written inline.

    The file holds ``WxH`` sizes separated by new lines, commas or blanks, ``#`` starting a comment (a ``.txt`` or
    ``.csv`` of one size a line), or is JSON (``.json``, or text starting with ``[``): a list of ``"WxH"`` strings,
    ``[width, height]`` pairs or ``{"width": w, "height": h}`` objects. Text that is not a file but a list of
    sizes (``1024x1024,896x1152``) is read as that list."""
    listed = _listed_sizes(text)
    try:
        return list(BucketSpec.from_sizes(listed).bucket_sizes or ())
    except ConfigError as exc:  # a bad entry, a size given twice
        raise ConfigError(f"{text}: {exc}") from None


def _listed_sizes(text: str) -> list:
    """The entries ``--bucket-sizes text`` lists, unchecked (see :func:`read_bucket_sizes`)."""
    path = Path(text)
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for a file: an inline list
        is_file = False
    if not is_file:
        if re.fullmatch(r"[\s,;]*\d+\s*[xX]\s*\d+([\s,;]+\d+\s*[xX]\s*\d+)*[\s,;]*", text):
            return parse_sizes(text)
        raise ConfigError(f"{text}: no such file (give a file of WxH lines, or WxH,WxH,... inline)")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{text}: cannot read it ({exc})") from None
    if path.suffix.lower() != ".json" and not content.lstrip().startswith("["):
        return parse_sizes(content, what=text)
    try:
        listed = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{text}: not valid JSON ({exc})") from None
    if not isinstance(listed, list):
        raise ConfigError(f"{text}: the JSON must be a list of sizes, got a {type(listed).__name__}")
    return listed


def _bucket_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return read_bucket_sizes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bucket_options(parser: argparse.ArgumentParser) -> None:
    """The bucket options, same names wherever buckets are involved (CONTRACT.md). Geometry options default to
    ``None`` (NovelAI's, or what ``--resolution`` / ``--bucket-sizes`` set), so that a clash can be named."""
    d = BucketSpec()
    g = parser.add_argument_group("bucket options")
    g.add_argument(
        "--resolution", type=positive_int, default=None, metavar="R",
        help="preset: buckets of area R*R, sides R/2..2R in steps of --step, base RxR (1024: SDXL-class, 33 "
        "buckets); instead of --max-area, --min-dim, --max-dim and --base",
    )  # fmt: skip
    g.add_argument(
        "--bucket-sizes", type=_bucket_sizes, default=None, metavar="FILE",
        help="exactly these buckets: a file of WxH sizes, one a line (# comments), or JSON [\"WxH\", ...]; "
        "or WxH,WxH,... inline",
    )  # fmt: skip
    g.add_argument(
        "--max-area", type=_area, default=None, metavar="AREA",
        help="largest bucket area in pixels: N, W*H or WxH (default 512*768)",
    )  # fmt: skip
    g.add_argument("--min-dim", type=positive_int, default=None, help=f"smallest bucket side (default {d.min_dim})")
    g.add_argument("--max-dim", type=positive_int, default=None, help=f"largest bucket side (default {d.max_dim})")
    g.add_argument(
        "--step", type=positive_int, default=None, help=f"bucket sides are multiples of this (default {d.step})"
    )
    g.add_argument("--base", type=_size, default=None, metavar="WxH", help="base bucket (default 512x512)")
    g.add_argument(
        "--no-upscale", action="store_true", help="never enlarge images; small ones go to scaled-down buckets"
    )
    g.add_argument(
        "--max-aspect-error",
        type=positive_float,
        default=d.max_aspect_error,
        help=f"reject images whose |log aspect| is further than this from every bucket (default {d.max_aspect_error}; 'inf' keeps all)",
    )
    g.add_argument(
        "--min-size", type=positive_int, default=None, metavar="PIXELS",
        help="reject images whose short side is under this (instead of enlarging them; default: keep all)",
    )  # fmt: skip
    g.add_argument(
        "--min-area", type=_area, default=None, metavar="AREA",
        help="reject images of fewer pixels than this: N, W*H or WxH (default: keep all)",
    )  # fmt: skip


#: The bucket options ``spec_from_args`` passes on when given (``None``: not given).
_SPEC_OPTIONS = ("resolution", "bucket_sizes", "max_area", "min_dim", "max_dim", "step", "base", "min_size", "min_area")


def spec_from_args(args: argparse.Namespace) -> BucketSpec:
    """The :class:`BucketSpec` of the parsed bucket options; a ConfigError names options that clash."""
    given = {name: getattr(args, name) for name in _SPEC_OPTIONS if getattr(args, name, None) is not None}
    return BucketSpec(no_upscale=args.no_upscale, max_aspect_error=args.max_aspect_error, **given)


def add_plan_options(parser: argparse.ArgumentParser, *, batch_required: bool) -> None:
    g = parser.add_argument_group("plan options")
    add_batch_options(g, required=batch_required)  # --batch-size, or a pixel budget or table: batch_from_args
    g.add_argument("--world-size", type=positive_int, default=1, help="number of ranks (default 1)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="shared by all ranks (default 0)")
    g.add_argument(
        "--leftover",
        choices=[policy.value for policy in LeftoverPolicy],
        default="auto",
        help="what to do with images that do not fill a batch (default auto: partial, each remainder as one smaller batch at its own bucket, where nearest would move 1 image in 10 to another bucket, else nearest; see LeftoverPolicy)",
    )
    g.add_argument(
        "--repeats", type=_repeats, default=None, metavar="R,R,...",
        help="with several manifests: times each one's images are served per epoch (3,0.5: thrice, and half of "
        "the second, another half each epoch; default 1 each)",
    )  # fmt: skip
    g.add_argument(
        "--independent-ranks",
        action="store_true",
        help="let each rank draw its own buckets (NovelAI) instead of all ranks training one bucket per step",
    )


def _repeats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (3,0.5), got {text!r}") from None
    return values


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir``: where the manifest's memory-mapped cache lives (``data/cache.py``)."""
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="folder of the manifest cache, shared by the processes of a node (default $DALI_ARB_CACHE, "
        "else ~/.cache/dali_arb)",
    )


def _frame_counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame counts separated by commas (1,17,33), got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive frame counts separated by commas (1,17,33), got {text!r}")
    return values


def add_frame_options(parser: argparse.ArgumentParser) -> None:
    """``--frames`` and what cuts clips from videos (issue 21): the samples become clips, buckets (frames, w, h)."""
    g = parser.add_argument_group("video options (clips instead of images)")
    g.add_argument(
        "--frames", type=_frame_counts, default=None, metavar="F,F,...",
        help="frame buckets (1,17,33,49,81): videos are cut into clips, each in the largest bucket its length fills, "
        "images are 1-frame samples; buckets become (frames, width, height)",
    )  # fmt: skip
    g.add_argument("--fps", type=positive_float, default=None, help="target frame rate (default: each video's own)")
    g.add_argument(
        "--clip", choices=CLIP_MODES, default="head",
        help="clips per video: head (one from the start), chunk (consecutive), slide (every --stride frames), "
        "uniform (--clip-count evenly spaced); default head",
    )  # fmt: skip
    g.add_argument("--stride", type=positive_int, default=1, help="--clip slide: frames between windows (default 1)")
    g.add_argument("--clip-count", type=positive_int, default=1, help="--clip uniform: clips per video (default 1)")
    g.add_argument(
        "--images", choices=("include", "exclude"), default="include",
        help="images beside videos: 1-frame samples (include, the default; --frames needs 1) or left out",
    )  # fmt: skip


def frames_from_args(args: argparse.Namespace) -> FrameSpec | None:
    """The :class:`FrameSpec` of ``--frames`` and its options, or None without ``--frames``; a ConfigError naming
    a clip option given without it."""
    if args.frames is None:
        given = [f"--{n.replace('_', '-')}" for n, default in
                 (("fps", None), ("clip", "head"), ("stride", 1), ("clip_count", 1), ("images", "include"))
                 if getattr(args, n) != default]  # fmt: skip
        if given:
            raise ConfigError(f"{', '.join(given)} cut clips from videos: give --frames too (e.g. --frames 1,17,33)")
        return None
    return FrameSpec(frames=tuple(args.frames), fps=args.fps, clip=args.clip, stride=args.stride,
                     count=args.clip_count, images=args.images == "include")  # fmt: skip
