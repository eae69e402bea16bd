"""Our loader config file (``dali_arb.toml``): the datasets (a manifest each, its repeats, buckets and caption
options) and the loader's options, in TOML. ``dali-arb index --from kohya|simpletuner`` writes one beside the
manifests; ``DALIBucketIterator.from_config`` and the CLI's ``--config`` read it. The schema (docs/kohya.md)::

    format = 1
    [loader]                 # any keyword of DALIBucketIterator: batch_size, crop, flip, seed, dtype...
    batch_size = 4
    [[datasets]]
    manifest = "01_dog.parquet"   # relative to this file's folder (or absolute, or a URL)
    source = "/data/10_dog"       # where it was indexed from (informative)
    repeats = 10                  # times each image is served per epoch (optional: once)
    [datasets.buckets]            # BucketSpec keywords (optional: NovelAI's buckets)
    bucket_sizes = ["512x512", "576x448"]
    [datasets.captions]           # CaptionPolicy fields (optional: the loader's caption options)
    instance_prompt = "sks dog"

Imports the standard library (``tomllib``), the loader's option objects and the plan's BucketSpec and
CaptionPolicy.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..loader.options import _KEYWORD_TO_FIELD, Dataset, LoaderOptions
from ..plan.buckets import BucketSpec
from ..plan.captions import CaptionPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (Python 3.10: the tomli backport, a dependency there)
    import tomli as tomllib

__all__ = ["CONFIG_FORMAT", "CONFIG_NAME", "ConfigFile", "DatasetEntry", "tomllib"]

#: The version of the file's schema.
CONFIG_FORMAT = 1
#: The name ``dali-arb index --from ... -o DIR`` gives the file in ``DIR``.
CONFIG_NAME = "dali_arb.toml"


@dataclass
class DatasetEntry:
    """One ``[[datasets]]`` table: ``manifest`` (a path, relative to the file's folder when relative), ``repeats``,
    ``buckets`` (:class:`BucketSpec` keywords) and ``captions`` (:class:`CaptionPolicy` fields); ``source`` says
    where it was indexed from."""

    manifest: str
    repeats: float | None = None
    buckets: dict[str, Any] = field(default_factory=dict)
    captions: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def dataset(self, folder: Path | None, where: str) -> Dataset:
        """The loader's :class:`Dataset`, the manifest resolved against ``folder``; a ConfigError naming ``where``
        for a bad option."""
        manifest = self.manifest
        if folder is not None and "://" not in manifest and not os.path.isabs(manifest):
            manifest = str(folder / manifest)
        try:
            buckets = BucketSpec(**self.buckets) if self.buckets else None
            captions = CaptionPolicy(**self.captions) if self.captions else None
        except TypeError as exc:  # an unknown keyword
            raise ConfigError(f"{where}: {_unknown(exc)}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return Dataset(manifest, buckets=buckets, repeats=self.repeats, captions=captions)


@dataclass
class ConfigFile:
    """A loader config file: its datasets and the loader's keyword options (``loader``)."""

    datasets: list[DatasetEntry]
    loader: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> ConfigFile:
        """The file at ``path``; a ConfigError naming it for anything malformed."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config {path} cannot be read ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {path} is not valid TOML ({exc})") from None
        if data.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
            raise ConfigError(f"config {path} has format {data.get('format')!r}; this dali_arb reads {CONFIG_FORMAT}")
        unknown = sorted(set(data) - {"format", "loader", "datasets"})
        if unknown:
            raise ConfigError(f"config {path}: unknown table(s) {', '.join(unknown)} (it has format, loader, datasets)")
        entries = data.get("datasets")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"config {path} has no [[datasets]]; give at least one with a manifest")
        datasets = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("manifest"), str):
                raise ConfigError(f'config {path}: datasets[{i}] needs manifest = "PATH"')
            extra = sorted(set(entry) - {"manifest", "repeats", "buckets", "captions", "source"})
            if extra:
                raise ConfigError(f"config {path}: datasets[{i}] has unknown option(s) {', '.join(extra)}")
            datasets.append(DatasetEntry(entry["manifest"], entry.get("repeats"), dict(entry.get("buckets", {})),
                                         dict(entry.get("captions", {})), entry.get("source")))  # fmt: skip
        loader = data.get("loader", {})
        if not isinstance(loader, dict):
            raise ConfigError(f"config {path}: [loader] must be a table of options")
        return cls(datasets, dict(loader), path)

    def build(self, **overrides: Any) -> tuple[list[Dataset], LoaderOptions]:
        """The loader's datasets and options; ``overrides`` (DALIBucketIterator's keywords, and ``buckets`` for
        every dataset) win over the file's; a caption keyword (``caption_dropout``...) changes every dataset's own
        caption policy too."""
        folder = None if self.path is None else self.path.resolve().parent
        where = f"config {self.path}" if self.path else "config"
        datasets = [e.dataset(folder, f"{where} datasets[{i}]") for i, e in enumerate(self.datasets)]
        caption_keywords = {k: v for k, v in overrides.items() if _KEYWORD_TO_FIELD.get(k, ("",))[0] == "captions"}
        if caption_keywords:  # a caption keyword given to from_config holds for every dataset, its own policy too
            changes = {_KEYWORD_TO_FIELD[k][1]: v for k, v in caption_keywords.items()}
            datasets = [
                d if d.captions is None else Dataset(d.manifest, d.buckets, d.repeats, replace(d.captions, **changes))
                for d in datasets
            ]
        buckets = overrides.pop("buckets", None)
        if buckets is not None:
            if not isinstance(buckets, BucketSpec):
                raise ConfigError(f"buckets must be a BucketSpec, got {type(buckets).__name__}")
            datasets = [Dataset(d.manifest, buckets=buckets, repeats=d.repeats, captions=d.captions) for d in datasets]
        try:
            options = LoaderOptions.from_keywords(**{**self.loader, **overrides})
        except TypeError as exc:
            raise ConfigError(f"{where} [loader]: {_unknown(exc)}") from None
        return datasets, options

    def write(self, path: str | os.PathLike) -> Path:
        """Write the file (TOML) to ``path``, atomically; manifests inside its folder are written relative."""
        path = Path(path)
        folder = path.resolve().parent
        lines = [f"# dali_arb loader config: DALIBucketIterator.from_config({path.name!r}) or --config {path.name}",
                 f"format = {CONFIG_FORMAT}", "", "[loader]"]  # fmt: skip
        lines += [f"{k} = {_toml(v)}" for k, v in self.loader.items() if v is not None]
        for entry in self.datasets:
            manifest = entry.manifest
            if "://" not in manifest and Path(manifest).resolve().parent == folder:
                manifest = Path(manifest).name
            lines += ["", "[[datasets]]", f"manifest = {_toml(manifest)}"]
            if entry.source is not None:
                lines.append(f"source = {_toml(entry.source)}")
            if entry.repeats is not None:
                lines.append(f"repeats = {_toml(entry.repeats)}")
            for table in ("buckets", "captions"):
                values = {k: v for k, v in getattr(entry, table).items() if v is not None}
                if values:
                    lines += [f"[datasets.{table}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
        try:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _toml(value: Any) -> str:
    """``value`` (str, bool, int, float, a list of them) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} into a config file")


def _unknown(exc: TypeError) -> str:
    """A TypeError about an unknown keyword, as one line without Python's function names."""
    return str(exc).replace("__init__() ", "").replace("DALIBucketIterator() ", "")
