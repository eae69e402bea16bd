"""What a trainer's dataset config becomes: :class:`Converted` (the datasets to index, each with how, and the
loader's options, and one note per option ignored), and :func:`materialise`, which indexes them into a folder and
writes our config file there. Shared by the kohya and SimpleTuner readers."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..index.captions import CaptionSource
from .ours import CONFIG_NAME, ConfigFile, DatasetEntry

__all__ = ["Converted", "IndexJob", "materialise"]


@dataclass
class IndexJob:
    """How one dataset is indexed: the ``folder``, where its captions come from (``captions``), whether only the
    images at its top level count (``top_only``: kohya reads no subfolders) and which file extensions
    (``extensions``, ``None``: every image; compared as written: kohya's are ``.png`` and ``.PNG``, not ``.Png``), and
    its paired images (``pairs``: :class:`~dali_arb.data.pairs.PairSpec`, kohya's ControlNet conditioning images)."""

    folder: str
    captions: CaptionSource = field(default_factory=CaptionSource)
    top_only: bool = False
    extensions: tuple[str, ...] | None = None
    pairs: tuple = ()


@dataclass
class Converted:
    """A trainer's config in our terms: ``datasets`` (our entries, their ``manifest`` a file name) with their
    ``jobs``, the ``loader`` keywords, and ``notes``: one line per option ignored or approximated."""

    datasets: list[DatasetEntry] = field(default_factory=list)
    jobs: list[IndexJob] = field(default_factory=list)
    loader: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, entry: DatasetEntry, job: IndexJob) -> None:
        self.datasets.append(entry)
        self.jobs.append(job)


def materialise(converted: Converted, folder: str | os.PathLike, *, update: bool = False, workers: int | None = None,
                progress: bool | None = False) -> ConfigFile:  # fmt: skip
    """Index every dataset of ``converted`` into ``folder`` (one manifest each, named by its entry) and write our
    config file there (:data:`CONFIG_NAME`); a manifest already there is reused unless ``update`` (then unchanged
    files are reused, new ones indexed)."""
    from ..data.manifest import rejects_path
    from ..index import build_index

    if "://" in os.fspath(folder):
        raise ConfigError(f"-o {folder}: --from writes a local folder (manifests and {CONFIG_NAME}); upload it after")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"-o {folder} is a file; --from writes a folder (manifests and {CONFIG_NAME}); name a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not converted.datasets:
        raise ConfigError("the config names no dataset with images to index")
    entries = []
    for entry, job in zip(converted.datasets, converted.jobs):
        manifest = folder / entry.manifest
        if update or not manifest.exists():
            summary = build_index([job.folder], manifest, captions=job.captions, update=update, workers=workers,
                                  progress=progress, pairs=list(job.pairs))  # fmt: skip
            if summary.rejected:
                converted.notes.append(f"{summary.rejected} file(s) of {job.folder} rejected, each with its reason in "
                                       f"{rejects_path(manifest)}")  # fmt: skip
            dropped = _keep_what_the_trainer_reads(manifest, job)
            if dropped:
                converted.notes.append(
                    f"{dropped} image(s) of {job.folder} left out as the trainer does (in subfolders, or with an "
                    f"extension it does not read: it reads {' '.join(job.extensions or ())} at the top level only)"
                )
        entries.append(DatasetEntry(str(manifest), entry.repeats, entry.buckets, entry.captions, entry.source))
    config = ConfigFile(entries, converted.loader, folder / CONFIG_NAME)
    config.write(folder / CONFIG_NAME)
    return ConfigFile.read(folder / CONFIG_NAME)


def _keep_what_the_trainer_reads(manifest: Path, job: IndexJob) -> int:
    """Drop the rows the trainer would not read (``job.top_only``, ``job.extensions``); how many were dropped."""
    if not job.top_only and job.extensions is None:
        return 0
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..errors import IndexingError
    from ..index.run import ROWS_PER_GROUP

    table = pq.read_table(manifest)
    keep = [
        (not job.top_only or "/" not in key)
        and (job.extensions is None or os.path.splitext(src or "")[1] in job.extensions)
        for key, src in zip(table.column("key").to_pylist(), table.column("source").to_pylist())
    ]
    dropped = keep.count(False)
    if dropped:
        if dropped == len(keep):
            manifest.unlink()
            raise IndexingError(
                f"no images the trainer would read in {job.folder} (top level, {' '.join(job.extensions or ())})"
            )
        tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}-{secrets.token_hex(4)}.filter.partial")
        try:
            pq.write_table(table.filter(pa.array(keep)), tmp, row_group_size=ROWS_PER_GROUP)
            os.replace(tmp, manifest)
        finally:
            tmp.unlink(missing_ok=True)
    return dropped
