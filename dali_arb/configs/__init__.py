"""Dataset configs: trainers' (a kohya dataset TOML or ``train_data_dir`` of ``N_name`` folders, a SimpleTuner
``multidatabackend.json``) and our own loader config file (``dali_arb.toml``, :mod:`.ours`).

:func:`load` turns any of them into the loader's datasets and options, indexing what is not indexed yet into the
node cache folder once (reused on the next call); :func:`index_config` indexes one into a folder of manifests with
our config file beside them (``dali-arb index --from kohya|simpletuner SRC -o DIR``). Every option of theirs that has
a meaning for a loader is mapped; each one ignored is named in one warning line (docs/kohya.md has the table).

Sits between the adapters and ``loader | index``: imports both, never DALI or a framework.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..loader.options import Dataset, LoaderOptions
from .convert import Converted, materialise
from .ours import CONFIG_NAME, ConfigFile

__all__ = ["CONFIG_NAME", "FORMATS", "ConfigFile", "convert", "detect", "index_config", "load"]

log = logging.getLogger("dali_arb")

#: The configs read: ours, kohya's (TOML or a folder of N_name folders), SimpleTuner's.
FORMATS = ("dali_arb", "kohya", "simpletuner")


def detect(path: str | os.PathLike) -> str:
    """Which of :data:`FORMATS` ``path`` is: a folder (of ``N_name`` folders, or holding our ``dali_arb.toml``), a
    ``.json`` (SimpleTuner), or a ``.toml`` (ours when it has ``format``/``[loader]``, else kohya's)."""
    from .kohya import is_dreambooth_folder

    p = Path(path)
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            return "dali_arb"
        if is_dreambooth_folder(p):
            return "kohya"
        raise ConfigError(f"{path} is a folder with neither {CONFIG_NAME} nor kohya's N_name folders (10_sks dog)")
    if not p.is_file():
        raise ConfigError(f"config {path} not found")
    if p.suffix.lower() == ".json":
        return "simpletuner"
    if p.suffix.lower() == ".toml":
        from .ours import tomllib

        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {path} is not valid TOML ({exc})") from None
        return "dali_arb" if "format" in data or "loader" in data else "kohya"
    raise ConfigError(f"config {path}: give a .toml (ours or kohya's), a SimpleTuner .json or a kohya train_data_dir")


def convert(path: str | os.PathLike, fmt: str | None = None, **options: Any) -> Converted:
    """The trainer's config at ``path`` in our terms (nothing indexed yet); ``options``: kohya's command-line
    dataset options for a ``train_data_dir`` (``resolution``, ``batch_size``, ``enable_bucket``...)."""
    fmt = fmt or detect(path)
    if fmt == "kohya":
        from . import kohya

        if Path(path).is_dir():
            return kohya.from_dreambooth_folder(path, **options)
        if options:
            raise ConfigError(f"a kohya TOML holds its own options; {', '.join(options)} apply to a train_data_dir")
        return kohya.from_toml(path)
    if fmt == "simpletuner":
        from . import simpletuner

        return simpletuner.from_json(path, **options)
    raise ConfigError(f"--from must be one of kohya, simpletuner, got {fmt!r}")


def index_config(path: str | os.PathLike, output: str | os.PathLike, *, fmt: str | None = None, update: bool = False,
                 workers: int | None = None, progress: bool | None = None,
                 **options: Any) -> tuple[ConfigFile, list[str]]:  # fmt: skip
    """Index the trainer's config at ``path`` into the folder ``output`` (a manifest per dataset and our config file);
    returns the config file and the notes (one line per option ignored or approximated)."""
    converted = convert(path, fmt, **options)
    config = materialise(converted, output, update=update, workers=workers, progress=progress)
    return config, converted.notes


def load(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
         trainer_options: dict[str, Any] | None = None, **overrides: Any) -> tuple[list[Dataset], LoaderOptions]:  # fmt: skip
    """The loader's datasets and options from any config at ``path`` (ours, kohya's, SimpleTuner's). A trainer's config
    is indexed into the node cache folder (``cache_dir``, ``$DALI_ARB_CACHE``...) once, keyed by its path, content and
    ``trainer_options``, and reused by the next call; each option ignored is logged as one warning.
    ``trainer_options``: the trainer's command-line dataset options where its config does not hold them (kohya's
    ``resolution``, ``enable_bucket``... for a ``train_data_dir``). ``overrides``: DALIBucketIterator's keywords,
    winning over the config's."""
    fmt = detect(path)
    trainer_options = dict(trainer_options or {})
    if cache_dir is not None:
        overrides["cache_dir"] = cache_dir
    if fmt == "dali_arb":
        if trainer_options:
            raise ConfigError(f"{path} is our loader config: give its options as keywords, not trainer_options")
        return ConfigFile.read(Path(path) / CONFIG_NAME if Path(path).is_dir() else Path(path)).build(**overrides)
    folder = _cache_folder(path, cache_dir, trainer_options)
    converted = convert(path, fmt, **trainer_options)
    with _locked(folder):  # the ranks of a node: one indexes, the others wait and reuse what it wrote
        if (folder / CONFIG_NAME).is_file() and all((folder / e.manifest).is_file() for e in converted.datasets):
            config = ConfigFile.read(folder / CONFIG_NAME)
        else:
            config = materialise(converted, folder)
    for note in converted.notes:
        log.warning("%s", note)
    return config.build(**overrides)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (made if missing) while indexing into it: ``flock`` on ``folder/.lock``."""
    import fcntl

    from ..data.cachefolder import cache_error

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".lock", "a")
    except OSError as exc:
        raise cache_error(folder, exc, "index a dataset config") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cache_folder(path: str | os.PathLike, cache_dir: str | os.PathLike | None, options: dict[str, Any]) -> Path:
    """Where a trainer's config is indexed in the node cache: keyed by its absolute path, its content (a folder: its
    listing of ``N_name`` folders) and the trainer's ``options``."""
    from ..data.cachefolder import cache_root, text_digest

    p = Path(path).resolve()
    content = (
        "\n".join(sorted(x.name for x in p.iterdir()))
        if p.is_dir()
        else p.read_text(encoding="utf-8", errors="replace")
    )
    # the working directory too: kohya reads a relative image_dir from it
    key = f"{p}\n{os.getcwd()}\n{content}\n{sorted(options.items())!r}"
    return cache_root(cache_dir) / "configs" / text_digest(key)
