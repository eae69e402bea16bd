"""The ``dali-arb`` command line.

Every user mistake ends in one line on stderr (what was wrong, the value, what to do) and a
non-zero exit; ``--debug`` shows the traceback instead. The commands live in ``core`` (index,
buckets, plan: no DALI, no torch) and ``loader`` (preview, bench, demo: DALI and torch imported
only when they run); ``options`` holds what they share. Nothing here registers itself on import.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Sequence

from ..errors import DaliArbError
from . import core, loader
from .options import EXIT_USAGE, Parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole ``dali-arb`` parser, every command included."""
    from .. import __version__

    parser = Parser(
        prog="dali-arb", description="Aspect-ratio bucketed image batches for GPU training, decoded by NVIDIA DALI."
    )
    parser.add_argument("--version", action="version", version=f"dali-arb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    fmt = argparse.RawDescriptionHelpFormatter
    core.register(sub, fmt)
    loader.register(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dali-arb``; returns the exit code."""
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
    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print(f"dali-arb {args.command}: terminated (SIGTERM); nothing was left behind", file=sys.stderr)
        return 128 + signal.SIGTERM
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
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


class Terminated(SystemExit):
    """SIGTERM, raised where the program is, so that every ``finally`` and cleanup runs (temporary files,
    worker processes) before the exit."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
