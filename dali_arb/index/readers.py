"""The kinds of source the indexer reads, in one table: :data:`READERS` (name -> :class:`Reader`).

``build_index`` finds each source's reader with :func:`reader_for` and hands it the source; the CLI's help
(:func:`accepted`) and the "don't know how to index" error list the table's entries. A new kind of source (video
files, JSON Lines metadata) is one reader function and one entry here.

Imports the standard library, pyarrow (through the readers' modules) and ``data.storage`` (URLs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, IndexingError, StorageError
from .folders import folder_task
from .metadata import metadata_chunks
from .records import Reject
from .remote import fetched, pair_listings, prefix_tasks, remote_folder_task, remote_shard_task
from .run import IndexRun
from .shards import shard_task, sidecar_gives_original, sidecar_metadata

__all__ = ["READERS", "Reader", "accepted", "reader_for"]

COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar.zst")


@dataclass(frozen=True)
class Reader:
    """One kind of source.

    Attributes:
        name: its key in :data:`READERS`.
        accepts: what it reads, in words (``"a .tar shard (webdataset layout)"``): the CLI's help and errors.
        remote: its sources are URLs in object storage (``s3://``, ``gs://``, ``https://``), else local paths.
        recognises: whether a source (a local path as given, or a URL) is of this kind.
        read: indexes one source into an :class:`~dali_arb.index.run.IndexRun`.
        fallback: tried after the others (the prefix reader takes any URL no other reader recognises).
    """

    name: str
    accepts: str
    remote: bool
    recognises: Callable[[str], bool]
    read: Callable[[IndexRun, str], None]
    fallback: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a reader's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.accepts, str) or not self.accepts:
            raise ConfigError(f"reader {self.name!r}: accepts must say what it reads, got {self.accepts!r}")
        for field in ("recognises", "read"):
            if not callable(getattr(self, field)):
                raise ConfigError(f"reader {self.name!r}: {field} must be callable, got {getattr(self, field)!r}")


def _key(url: str) -> str:
    from ..data.storage import split_url

    return split_url(url)[2].lower()


def _listable(url: str) -> bool:
    from ..data.storage import SCHEMES, split_url

    return SCHEMES[split_url(url)[0]].can_list  # (HTTP cannot list a folder)


def _is_metadata(name: str) -> bool:
    return name.lower().endswith((".parquet", ".csv"))


# -- local sources -------------------------------------------------------------------------------------------------


def read_folder(run: IndexRun, source: str) -> None:
    """An image folder, recursively: header reading in the workers, one task per folder of files."""
    walk = run.walk
    empty, fresh = True, os.path.realpath(source) not in walk.walked
    for (rows, rejects, reused), task in run.ordered_map(folder_task, walk.tasks(source)):
        empty = False
        run.summary.reused += reused
        run.take(rows, rejects + _drain(walk.rejects), len(task[1]))
    run.take([], _drain(walk.rejects), 0)
    if empty and fresh:  # (a folder already walked through another source is not empty)
        raise empty_folder(source)


def empty_folder(source: str) -> IndexingError:
    """The one line for a folder holding nothing to index (either engine)."""
    return IndexingError(
        f"no image or video files found in folder {source} (searched with its subfolders); give the folder that "
        "holds them, or a .tar shard or .parquet/.csv metadata file"
    )


def read_shard(run: IndexRun, source: str) -> None:
    """A webdataset ``.tar`` shard, in one worker (submitted ahead by the driver where it could be:
    :func:`shard_job`); its rows in the manifest being updated are reused when the shard is unchanged."""
    task = shard_job(run, source)
    if task is None:
        run.write_table(run.old_rows(source), reused=True)
        return
    rows, rejects = run.result(("shard", source), shard_task, task)
    run.take(rows, rejects, len(rows) + len(rejects))


def shard_job(run: IndexRun, source: str) -> tuple | None:
    """The ``shard_task`` arguments that read the shard ``source``, or None where its rows in the manifest being
    updated are reused (the shard unchanged)."""
    reuse = run.old_rows(source)
    if reuse is not None and _shard_unchanged(reuse, os.stat(source)) and not _gains_original(reuse, source, run):
        return None
    # img2dataset's per-shard Parquet beside it: sizes and captions from it, only the tar's headers read
    sidecar = None if run.pairs else sidecar_metadata(source)
    return (source, run.max_pixels, run.pairs, sidecar)


def read_metadata(run: IndexRun, source: str) -> None:
    """img2dataset-style Parquet/CSV metadata, taken as it is, a chunk at a time (``metadata.metadata_chunks``)."""
    for table, rejects in metadata_chunks(Path(source)):
        run.write_table(table)
        run.summary.no_source += table.column("source").null_count
        run.take([], rejects, table.num_rows + len(rejects))


# -- object storage ------------------------------------------------------------------------------------------------


def read_prefix(run: IndexRun, url: str) -> None:
    """The images under a prefix, like a folder: headers only, read with ranged GETs in the workers."""
    summary = run.summary
    with _storage_errors(url):
        unlisted: list[Reject] = []
        tasks, _ = prefix_tasks(url, run.max_pixels, run.previous, pair_listings(run.pairs), unlisted)
        run.take([], unlisted, len(unlisted))
        for (rows, rejects, io), task in run.ordered_map(remote_folder_task, iter(tasks)):
            summary.reused += io["reused"]
            summary.remote_requests += io["requests"]
            summary.remote_bytes += io["bytes_read"]
            summary.remote_images += len(task[0])
            run.take(rows, rejects, len(task[0]))


def read_remote_metadata(run: IndexRun, url: str) -> None:
    """Metadata in object storage: fetched whole; relative paths in it are taken relative to its folder."""
    with _storage_errors(url), fetched(url, os.path.splitext(url)[1]) as local:
        run.summary.fetched_objects += 1
        run.summary.fetched_bytes += os.path.getsize(local)
        for table, rejects in metadata_chunks(Path(local), base_url=url.rsplit("/", 1)[0] + "/"):
            run.write_table(table)
            run.summary.no_source += table.column("source").null_count
            run.take([], [_renamed(r, local, url) for r in rejects], table.num_rows + len(rejects))


def read_remote_shard(run: IndexRun, url: str) -> None:
    """A ``.tar`` shard in object storage, read in one worker (:func:`remote_shard_job`; submitted ahead by the
    driver, as local shards are)."""
    rows, rejects, counts = run.result(("remote_shard", url), remote_shard_job, (url, run.max_pixels, run.pairs))
    for name, value in counts.items():
        setattr(run.summary, name, getattr(run.summary, name) + value)
    run.take(rows, rejects, len(rows) + len(rejects))


def remote_shard_job(args: tuple) -> tuple[list, list[Reject], dict[str, int]]:
    """One ``.tar`` shard in object storage, ``(url, max_pixels, pairs)``: with img2dataset's Parquet beside it (and
    no pairs), sizes from it and offsets from the tar's headers only (``remote.remote_shard_task``: ranged GETs for a
    shard of large images), else fetched whole and read as a local shard; refused if it changed meanwhile. Its rows,
    rejects and the counts it adds to the run's summary (``IndexSummary`` field: value)."""
    from ..data.storage import head

    url, max_pixels, pairs = args
    with _storage_errors(url):
        before = head(url)
        # (the two HEADs, before and after, are not counted in the summary's requests)
        walked = None if pairs else remote_shard_task((before, max_pixels))
        local = url
        if walked is not None and walked[3]:  # img2dataset's Parquet beside it: the tar's headers walked
            rows, rejects, io, _ = walked
            counts = {"shard_walks": 1, "shard_walk_requests": io["requests"], "shard_walk_bytes": io["bytes_read"],
                      "shard_walk_size": before.size}  # fmt: skip
        elif walked is not None:  # the Parquet beside it, its images small: fetched whole, no image read
            rows, rejects, io, _ = walked
            counts = {"fetched_objects": 1, "fetched_bytes": io["bytes_read"]}
        else:
            with fetched(url, ".tar") as local:
                counts = {"fetched_objects": 1, "fetched_bytes": os.path.getsize(local)}
                rows, rejects = shard_task((local, max_pixels, pairs))
        info = head(url)
        if (info.size, info.etag, info.mtime_ns) != (before.size, before.etag, before.mtime_ns):
            raise IndexingError(f"{url} was rewritten while it was indexed; index it again once it is written")
        identity = {"source": url, "mtime_ns": info.mtime_ns, "ctime_ns": None, "source_size": info.size,
                    "etag": info.etag}  # fmt: skip
        rows = [
            row._replace(**identity, pairs=tuple((url, *f[1:]) if f[0] == local else f for f in row.pairs))
            for row in rows
        ]
    return rows, [_renamed(r, local, url) for r in rejects], counts


def read_ahead(run: IndexRun, kind: str, source: str) -> tuple | None:
    """What the reader ``kind`` runs in one worker for ``source`` (a local or remote tar shard), as ``(key, function,
    task)`` for :meth:`IndexRun.ahead`, so that the driver can submit it before the reader's turn; None for other
    readers, and for a shard whose earlier rows are reused."""
    if kind == "shard":
        task = shard_job(run, source)
        return None if task is None else (("shard", source), shard_task, task)
    if kind == "remote_shard":
        return ("remote_shard", source), remote_shard_job, (source, run.max_pixels, run.pairs)
    return None


#: The kinds of source, by name. :func:`reader_for` tries them in order (fallbacks last); add one to index a new
#: kind of source.
READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader("folder", "an image folder (recursive)", False, os.path.isdir, read_folder),
        Reader("shard", "a .tar shard (webdataset layout)", False, lambda s: s.lower().endswith(".tar"), read_shard),
        Reader("metadata", ".parquet/.csv metadata (key, width, height)", False, _is_metadata, read_metadata),
        Reader("remote_shard", "a .tar shard URL", True, lambda u: _key(u).endswith(".tar"), read_remote_shard),
        Reader("remote_metadata", "a .parquet/.csv metadata URL", True, lambda u: _is_metadata(_key(u)), read_remote_metadata),
        Reader("remote_folder", "an s3:// or gs:// prefix (a folder in storage)", True, _listable, read_prefix, fallback=True),
    )
}  # fmt: skip


def accepted(*, remote: bool | None = None, fallbacks: bool = True) -> str:
    """The kinds :data:`READERS` accepts, in words (``remote``: only those of URLs, or only local ones)."""
    kinds = [
        r.accepts for r in READERS.values() if (remote is None or r.remote == remote) and (fallbacks or not r.fallback)
    ]
    return ", ".join(kinds[:-1]) + (" or " if len(kinds) > 1 else "") + kinds[-1]


def reader_for(source: str) -> Reader:
    """The reader of ``source`` (a local path or a URL); an IndexingError naming the accepted kinds for a source
    that is missing, unreadable, a compressed tar, or of no kind in :data:`READERS`."""
    from ..data.storage import is_url

    remote = is_url(source)
    name = _key(source) if remote else Path(source).name.lower()
    if not remote and not os.path.exists(source):
        raise IndexingError(f"source not found: {source}; give {accepted(remote=False)}")
    if not remote and os.path.isdir(source) and not os.access(source, os.R_OK | os.X_OK):
        raise IndexingError(f"cannot read folder {source} (permission denied)")
    if name.endswith(COMPRESSED_TARS):
        how = "ranged reads" if remote else "one positioned read"
        raise IndexingError(
            f"{source} is a compressed tar: the loader reads samples with {how}, so shards must be plain .tar"
            + ("" if remote else " (unpack it with gunzip/xz -d first)")
        )
    candidates = sorted((r for r in READERS.values() if r.remote == remote), key=lambda r: r.fallback)
    found = next((r for r in candidates if r.recognises(source)), None)
    if found is not None:
        return found
    if remote and not _listable(source):
        raise IndexingError(f"{source}: HTTP cannot list a folder; give {accepted(remote=True, fallbacks=False)}")
    raise IndexingError(f"don't know how to index {source}: expected {accepted(remote=remote)}")


# -- helpers -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """A store's failure while indexing ``url`` is an IndexingError with the store's message."""
    try:
        yield
    except StorageError as exc:
        raise IndexingError(str(exc)) from None


def _shard_unchanged(rows, stat: os.stat_result) -> bool:
    """Whether a local shard is the one its earlier ``rows`` were indexed from (their mtime, ctime and size; a
    shard re-packed with its mtime set back has another ctime). Rows of an older manifest (no ctime): no."""
    if "ctime_ns" not in rows.column_names or "source_size" not in rows.column_names:
        return False
    first = {name: rows.column(name)[0].as_py() for name in ("mtime_ns", "ctime_ns", "source_size")}
    return first == {"mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "source_size": stat.st_size}


def _gains_original(rows, shard: str, run: IndexRun) -> bool:
    """Whether an unchanged shard's earlier ``rows`` lack the original sizes its Parquet now gives (a manifest
    written before they were read): then it is read again, headers only."""
    return "original_width" not in rows.column_names and not run.pairs and sidecar_gives_original(shard)


def _renamed(reject: Reject, local: str, url: str) -> Reject:
    """A reject of a fetched copy, naming the object instead of the copy."""
    return {**reject, "source": str(reject["source"]).replace(local, url)}


def _drain(items: list) -> list:
    taken = items[:]
    items.clear()
    return taken
