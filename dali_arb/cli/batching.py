"""The batch-sizing flags of ``dali-arb``: one batch size, a pixel budget or a table, parsed into what the planner
takes (``int | BatchSizing``). Every error is one line that echoes the value and says what to write instead.

    --batch-size 16                          every bucket 16 images per rank and step
    --batch-pixels 16*512*512                a bucket of w x h gets max(1, N // (w*h)) images (also 4194304, 2048x2048)
        --max-batch 32 --batch-multiple 2    ... at most 32, rounded down to a multiple of 2
    --batch-sizes FILE                       one ``WxH=B`` line per bucket (``#`` starts a comment); clips also
                                             ``FxWxH=B`` (that frame count; before its ``WxH`` line's)
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from ..errors import ConfigError
from ..plan.batching import BatchSizing

__all__ = ["add_batch_options", "batch_from_args", "parse_pixels", "read_batch_sizes"]

_FACTOR = re.compile(r"\s*(\d+)\s*")


def parse_pixels(text: str) -> int:
    """A pixel count written as ``4194304``, ``16*512*512`` or ``2048x2048`` (factors multiplied); a ConfigError
    otherwise."""
    factors = re.split(r"[*xX]", str(text))
    if not all(_FACTOR.fullmatch(f) for f in factors):
        raise ConfigError(f"expected a pixel count such as 4194304, 16*512*512 or 2048x2048, got {text!r}")
    value = math.prod(int(f) for f in factors)
    if value < 1:
        raise ConfigError(f"expected a positive pixel count, got {text!r}")
    return value


def read_batch_sizes(path: str | Path) -> dict[tuple[int, ...], int]:
    """``{(width, height): images}`` and ``{(frames, width, height): clips}`` from a file of ``WxH=B`` and
    ``FxWxH=B`` lines (blank lines and ``#`` comments skipped); a ConfigError naming the file and line otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"--batch-sizes: cannot read {str(path)!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    table: dict[tuple[int, ...], int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(?:(\d+)\s*[xX]\s*)?(\d+)\s*[xX]\s*(\d+)\s*=\s*(\d+)", line)
        if not match or min(int(g) for g in match.groups() if g is not None) < 1:
            raise ConfigError(
                f"{path}:{number}: expected WIDTHxHEIGHT=IMAGES such as 1024x1024=4, or FRAMESxWIDTHxHEIGHT=CLIPS "
                f"such as 33x832x480=2, got {raw.strip()!r}"
            )
        key = tuple(int(g) for g in match.groups()[:3] if g is not None)
        if key in table:
            raise ConfigError(f"{path}:{number}: bucket {'x'.join(map(str, key))} is given twice")
        table[key] = int(match.group(4))
    if not table:
        raise ConfigError(
            f"--batch-sizes: {str(path)!r} names no bucket; write one WIDTHxHEIGHT=IMAGES line per bucket"
        )
    return table


def _positive(text: str) -> int:
    """A positive integer (``--batch-size``, ``--max-batch``, ``--batch-multiple``); a ConfigError otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"expected a positive integer, got {text}")
    return value


def _argparse_type(parse):
    """``parse`` as an argparse type: its ConfigError becomes argparse's one-line usage error."""

    def convert(text: str):
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def add_batch_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, required: bool) -> None:
    """``--batch-size/-b``, ``--batch-pixels``, ``--batch-sizes`` (at most one; exactly one when ``required``),
    ``--max-batch`` and ``--batch-multiple`` (with ``--batch-pixels``). Read them with :func:`batch_from_args`."""
    one = parser.add_mutually_exclusive_group(required=required)
    one.add_argument(
        "--batch-size", "-b", type=_argparse_type(_positive), default=None,
        help="images per batch per rank, the same for every bucket" + ("" if required else " (default 16)"),
    )  # fmt: skip
    one.add_argument(
        "--batch-pixels", type=_argparse_type(parse_pixels), default=None, metavar="N",
        help="a pixel budget per rank and step: a bucket of w x h gets max(1, N // (w*h)) images "
        "(N as 4194304, 16*512*512 or 2048x2048)",
    )  # fmt: skip
    one.add_argument(
        "--batch-sizes", type=_argparse_type(read_batch_sizes), default=None, metavar="FILE",
        help="images per rank and step for each bucket: one WxH=B line per bucket served (1024x1024=4); clips: "
        "also FxWxH=B lines for one frame count (33x832x480=2)",
    )  # fmt: skip
    parser.add_argument(
        "--max-batch", type=_argparse_type(_positive), default=None, metavar="B",
        help="with --batch-pixels: at most B images per rank and step",
    )  # fmt: skip
    parser.add_argument(
        "--batch-multiple", type=_argparse_type(_positive), default=None, metavar="M",
        help="with --batch-pixels: round each bucket's images down to a multiple of M (where one fits)",
    )  # fmt: skip


def batch_from_args(args: argparse.Namespace, *, default: int | None = 16) -> int | BatchSizing:
    """What the parsed batch options ask for: an ``int`` for one batch size (``default`` when none of them is
    given), else a :class:`BatchSizing`. Absent attributes count as not given, so a command with only
    ``--batch-size`` can use it too."""
    size, pixels, table = (getattr(args, n, None) for n in ("batch_size", "batch_pixels", "batch_sizes"))
    max_batch, multiple = getattr(args, "max_batch", None), getattr(args, "batch_multiple", None)
    given = [
        f for f, v in (("--batch-size", size), ("--batch-pixels", pixels), ("--batch-sizes", table)) if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"give one of --batch-size, --batch-pixels and --batch-sizes, got {' and '.join(given)}")
    if pixels is None and (max_batch is not None or multiple is not None):
        flag = "--max-batch" if max_batch is not None else "--batch-multiple"
        value = max_batch if max_batch is not None else multiple
        raise ConfigError(f"{flag} {value} shapes a pixel budget: give it with --batch-pixels N")
    if pixels is not None:
        return BatchSizing(batch_pixels=pixels, max_batch=max_batch, batch_multiple=multiple or 1)
    if table is not None:
        return BatchSizing(batch_sizes=table)
    if size is not None:
        return int(size)
    if default is None:
        raise ConfigError("give --batch-size B, --batch-pixels N or --batch-sizes FILE")
    return int(default)
