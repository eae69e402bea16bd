"""Option parsing shared by every ``dali-arb`` command: one-line usage errors, number checks, bucket
and plan options. Imports nothing of the loader."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..plan.buckets import BucketSpec, parse_size
from ..plan.planner import LeftoverPolicy
from .batching import add_batch_options

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "add_bucket_options",
    "add_plan_options",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "probability",
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


def add_bucket_options(parser: argparse.ArgumentParser) -> None:
    """The bucket options, same names wherever buckets are involved (CONTRACT.md)."""
    d = BucketSpec()
    g = parser.add_argument_group("bucket options")
    g.add_argument(
        "--max-area",
        type=positive_int,
        default=d.max_area,
        help=f"largest bucket area in pixels (default {d.max_area})",
    )
    g.add_argument(
        "--min-dim", type=positive_int, default=d.min_dim, help=f"smallest bucket side (default {d.min_dim})"
    )
    g.add_argument("--max-dim", type=positive_int, default=d.max_dim, help=f"largest bucket side (default {d.max_dim})")
    g.add_argument(
        "--step", type=positive_int, default=d.step, help=f"bucket sides are multiples of this (default {d.step})"
    )
    g.add_argument("--base", type=_size, default=d.base, metavar="WxH", help="base bucket (default 512x512)")
    g.add_argument(
        "--no-upscale", action="store_true", help="never enlarge images; small ones go to scaled-down buckets"
    )
    g.add_argument(
        "--max-aspect-error",
        type=positive_float,
        default=d.max_aspect_error,
        help=f"reject images whose |log aspect| is further than this from every bucket (default {d.max_aspect_error}; 'inf' keeps all)",
    )


def spec_from_args(args: argparse.Namespace) -> BucketSpec:
    """The :class:`BucketSpec` of the parsed bucket options."""
    names = ("max_area", "min_dim", "max_dim", "step", "base", "no_upscale", "max_aspect_error")
    return BucketSpec.from_dict({name: getattr(args, name) for name in names})


def add_plan_options(parser: argparse.ArgumentParser, *, batch_required: bool) -> None:
    g = parser.add_argument_group("plan options")
    add_batch_options(g, required=batch_required)  # --batch-size, or a pixel budget or table: batch_from_args
    g.add_argument("--world-size", type=positive_int, default=1, help="number of ranks (default 1)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="shared by all ranks (default 0)")
    g.add_argument(
        "--leftover",
        choices=[policy.value for policy in LeftoverPolicy],
        default="nearest",
        help="what to do with images that do not fill a batch (default nearest; see LeftoverPolicy)",
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
    """``--cache-dir``: where the manifest's memory-mapped cache lives (``dataplane.py``)."""
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="folder of the manifest cache, shared by the processes of a node (default $DALI_ARB_CACHE, "
        "else ~/.cache/dali_arb)",
    )
