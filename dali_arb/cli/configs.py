"""The CLI's part of dataset configs (issue 23): ``dali-arb index --from kohya|simpletuner SRC -o DIR``, the caption
source flags of ``index`` (``--caption-extension``, ``--captions-from-filename``, ``--captions FILE``,
``--caption-column``), and a loader config file (``dali_arb.toml``, or the folder holding it) where ``buckets`` and
``plan`` take a manifest."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_caption_options", "caption_source", "config_datasets", "expand_config", "index_from_config",
           "is_config"]  # fmt: skip


def add_caption_options(p: argparse.ArgumentParser) -> None:
    """``index``'s options for configs and caption sources."""
    p.add_argument(
        "--from", dest="config_format", choices=("kohya", "simpletuner"),
        help="SRC is a trainer's dataset config: kohya's dataset TOML or train_data_dir (N_name folders), or "
        "SimpleTuner's multidatabackend.json; -o names a folder that gets a manifest per dataset and dali_arb.toml "
        "(DALIBucketIterator.from_config, and buckets/plan, take it)",
    )  # fmt: skip
    p.add_argument("--set", dest="trainer_options", action="append", metavar="KEY=VALUE",
                   help="with --from: a trainer's command-line dataset option its config does not hold (kohya's "
                   "train_data_dir: --set resolution=1024 --set enable_bucket=true; SimpleTuner: --set batch_size=4); "
                   "VALUE is read as TOML (numbers, true/false, [a, b]), else as text (repeatable)")  # fmt: skip
    p.add_argument("--caption-extension", metavar="EXT",
                   help="captions from the file IMAGE_STEM+EXT (kohya's caption_extension: .txt, .caption, any) "
                   "instead of .txt/.caption")  # fmt: skip
    p.add_argument("--captions-from-filename", action="store_true",
                   help="the caption is the file name's stem, underscores to spaces (SimpleTuner's filename strategy)")  # fmt: skip
    p.add_argument("--captions", metavar="FILE",
                   help="captions from a .jsonl (file_name/key and text/caption per line, as metadata.jsonl), "
                   ".parquet or .csv file (file_name or key column)")  # fmt: skip
    p.add_argument(
        "--caption-column", metavar="NAME", help="the text column of --captions FILE (default text, caption or prompt)"
    )


def caption_source(args: argparse.Namespace):
    """The :class:`~dali_arb.index.captions.CaptionSource` of ``index``'s flags, or None."""
    from ..index.captions import CaptionSource

    if args.trainer_options:
        raise ConfigError("--set gives a trainer's option to --from kohya|simpletuner; add --from")
    source = CaptionSource(extension=args.caption_extension, filename=args.captions_from_filename,
                           file=args.captions, column=args.caption_column)  # fmt: skip
    return source if source.given else None


def index_from_config(args: argparse.Namespace) -> int:
    """``dali-arb index --from FORMAT SRC -o DIR``: index a trainer's config; one warning line per option ignored."""
    from ..configs import index_config

    if len(args.sources) != 1:
        raise ConfigError(
            f"--from {args.config_format} takes one config (a file or kohya's train_data_dir), got {len(args.sources)}"
        )
    if any((args.pair, args.mask, args.caption_extension, args.captions_from_filename, args.captions)):
        raise ConfigError(
            f"--from {args.config_format}: the config says where captions come from; drop the caption and pair flags"
        )
    config, notes = index_config(args.sources[0], args.output, fmt=args.config_format, update=args.update,
                                 workers=args.workers, progress=None if not args.quiet else False,
                                 **trainer_options(args.trainer_options))  # fmt: skip
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    line = f"{len(config.datasets)} dataset(s) indexed; loader config {config.path}"
    print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(
            json.dumps({"config": str(config.path), "manifests": [e.manifest for e in config.datasets], "notes": notes})
        )
    return 0


def trainer_options(texts: list[str] | None) -> dict:
    """``--set KEY=VALUE`` as a dict, each VALUE read as a TOML value (``1024``, ``true``, ``[1024, 768]``) or else as
    text."""
    from ..configs.ours import tomllib

    out = {}
    for text in texts or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE (e.g. resolution=1024), got {text!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def is_config(path: str) -> bool:
    """Whether ``path`` given where a manifest goes is our loader config (``*.toml``, or a folder holding
    ``dali_arb.toml``)."""
    return str(path).endswith(".toml") or Path(path, "dali_arb.toml").is_file()


def config_datasets(path: str) -> list | None:
    """The datasets (manifests, buckets, repeats, caption policies) of the loader config ``path``, or None when
    ``path`` is not one (a manifest)."""
    if not is_config(path):
        return None
    from ..configs import load

    return load(path, batch_size=1)[0]


def expand_config(args: argparse.Namespace) -> None:
    """Where ``buckets`` or ``plan`` got one loader config (``dali_arb.toml`` or its folder) for MANIFEST: its
    manifests, repeats, buckets (shared by its datasets) and batch size (unless ``--batch-size`` is given)."""
    given = [str(m) for m in (args.manifest or [])]
    if len(given) != 1 or not is_config(given[0]):
        return
    from ..configs import load

    datasets, options = load(given[0])
    specs = {d.buckets for d in datasets}
    if len(specs) > 1:
        raise ConfigError(
            f"{given[0]}: its datasets have different buckets; give their manifests one by one with bucket options"
        )
    args.manifest = [str(d.manifest) for d in datasets]
    if len(datasets) > 1 or datasets[0].repeats is not None:
        args.repeats = [1.0 if d.repeats is None else d.repeats for d in datasets]
    args.config_spec = specs.pop()
    batch_given = any(getattr(args, n, None) is not None for n in ("batch_size", "batch_pixels", "batch_sizes"))
    if not batch_given and isinstance(options.batch_size, int):
        args.batch_size = options.batch_size
    if getattr(args, "leftover", None) == "auto":  # (the default: the config's wins)
        args.leftover = options.leftover.value
