"""``build_index``: classify the sources, run the folder/shard/metadata readers in worker processes,
stream rows to a temporary Parquet file, make keys unique, and move the results into place."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat as stat_module
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.imagefacts import DEFAULT_MAX_PIXELS
from ..data.manifest import Manifest, rejects_name, rejects_path
from ..data.pairs import PairSpec, pairs_of
from ..errors import ConfigError, IndexingError, StorageError
from ..processes import die_with_parent, signals_deferred, spawn_without_main, stop_pool
from .folders import FolderWalk, PreviousRows, folder_task
from .metadata import metadata_rows
from .records import Reject, Row, index_schema, rows_to_table, with_identity
from .remote import fetched, pair_listings, prefix_tasks, remote_folder_task
from .shards import shard_task

__all__ = ["IndexSummary", "build_index"]

ROWS_PER_GROUP = 65536


@dataclass
class IndexSummary:
    """What one ``build_index`` call did."""

    manifest: Path | str  # a path, or the URL of a manifest written to object storage
    rows: int = 0
    rejected: int = 0
    reused: int = 0
    files_seen: int = 0
    seconds: float = 0.0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    #: reads from object storage for images under prefixes (headers only): requests, bytes, images
    remote_requests: int = 0
    remote_bytes: int = 0
    remote_images: int = 0
    #: shards and metadata fetched whole from object storage: objects, bytes
    fetched_objects: int = 0
    fetched_bytes: int = 0

    @property
    def files_per_s(self) -> float:
        return self.files_seen / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        reasons = ", ".join(
            f"{n} {r.split(' (')[0]}" for r, n in sorted(self.reject_reasons.items(), key=lambda x: -x[1])
        )
        text = (
            f"indexed {self.rows} images into {self.manifest} "
            f"({self.files_seen} files in {self.seconds:.1f} s, {self.files_per_s:.0f} files/s"
            + (f", {self.reused} unchanged reused" if self.reused else "")
            + f"); rejected {self.rejected}"
        )
        if self.rejected:
            text += f" ({reasons}), listed in {rejects_name(self.manifest)}"
        if self.remote_images:
            text += (
                f"; from object storage: {self.remote_requests / self.remote_images:.2f} requests and "
                f"{self.remote_bytes / self.remote_images / 1024:.0f} KiB per image (headers only)"
            )
        if self.fetched_objects:
            text += f"; {self.fetched_objects} shard/metadata object(s) fetched whole ({self.fetched_bytes / 2**20:.1f} MiB)"
        return text


# -- the driver ----------------------------------------------------------------------------------


def _classify_url(source: str) -> str:
    from ..data.storage import split_url

    scheme, _, key = split_url(source)
    name = key.lower()
    if name.endswith(".tar"):
        return "remote_shard"
    if name.endswith((".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar.zst")):
        raise IndexingError(
            f"{source} is a compressed tar: the loader reads samples with ranged reads, so shards must be plain .tar"
        )
    if name.endswith((".parquet", ".csv")):
        return "remote_metadata"
    if scheme.startswith("http"):
        raise IndexingError(f"{source}: HTTP cannot list a folder; give .tar shard or .parquet/.csv metadata URLs")
    return "remote_folder"  # a prefix: the objects under it, like a folder


def _classify(source: str) -> str:
    from ..data.storage import is_url

    if is_url(source):
        return _classify_url(source)
    path = Path(source)
    if not path.exists():
        raise IndexingError(f"source not found: {source}; give an image folder, .tar shards, or .parquet/.csv metadata")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise IndexingError(f"cannot read folder {source} (permission denied)")
        return "folder"
    name = path.name.lower()
    if name.endswith(".tar"):
        return "shard"
    if name.endswith((".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar.zst")):
        raise IndexingError(
            f"{source} is a compressed tar: the loader reads samples with one positioned read, so shards must be "
            "plain .tar (unpack it with gunzip/xz -d first)"
        )
    if name.endswith((".parquet", ".csv")):
        return "metadata"
    raise IndexingError(f"don't know how to index {source}: expected a folder, a .tar shard, or .parquet/.csv metadata")


def build_index(
    sources: list[str],
    output: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    update: bool = False,
    progress: bool | None = None,
    pairs: list[PairSpec] | tuple = (),
) -> IndexSummary:
    """Index ``sources`` into the manifest ``output`` and its rejects file; returns a summary.

    Args:
        sources: image folders (recursive), ``.tar`` shards (webdataset layout), or Parquet/CSV
            metadata with ``key``, ``width``, ``height`` (optional ``caption``, ``path``, ``status``).
        max_pixels: refuse images with more pixels (decompression bombs).
        workers: processes for header reading (default: all cores).
        update: reuse rows of an existing ``output`` whose file size and mtime are unchanged.
        progress: show a progress bar (default: when stderr is a terminal).
        pairs: paired images and masks (:class:`~dali_arb.data.pairs.PairSpec`): for the image of key ``K``,
            ``folder/K.<ext>``, or in tar shards the member ``K.NAME.<ext>``. A sample whose pair is missing,
            unreadable or of another aspect is rejected with a reason naming the pair.
    """
    if not sources:
        raise ConfigError("give at least one source to index")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    from ..data.storage import expand_sources, is_url

    if is_url(str(output)):
        return _index_to_url(sources, str(output), max_pixels=max_pixels, workers=workers, update=update,
                             progress=progress, pairs=pairs)  # fmt: skip
    output = Path(output)
    if output.exists() and output.is_dir():
        raise IndexingError(f"output {output} is a folder; give a file name such as {output / 'manifest.parquet'}")
    if not output.parent.exists():
        raise IndexingError(f"folder {output.parent} does not exist; create it or choose another -o")
    try:
        expanded = [u for s in sources for u in (expand_sources(s) if is_url(s) else [s])]
        # rows must resolve from any working directory: local sources become absolute paths
        kinds = [(_classify(s), s if is_url(s) else os.path.abspath(s)) for s in expanded]
    except StorageError as exc:
        raise IndexingError(str(exc)) from None
    _check_output(output, kinds)
    pairs = _checked_pairs(pairs, kinds)
    schema = index_schema(pairs)
    previous: PreviousRows | None = None
    known_shards: dict[str, pa.Table] = {}
    summary = IndexSummary(manifest=output)
    if update and output.exists():
        old = Manifest.read(output).table
        same_pairs = pairs_of(old.schema) == {p.name: p.kind for p in pairs}
        if same_pairs and "mtime_ns" in old.column_names and "source" in old.column_names:
            previous = PreviousRows(old)
            shard_sources = [s for k, s in kinds if k == "shard"]
            if shard_sources:
                old_shards = old.filter(pc.is_in(old.column("source"), pa.array(shard_sources)))
                for shard in shard_sources:
                    part = old_shards.filter(pc.equal(old_shards.column("source"), shard))
                    if part.num_rows:
                        known_shards[shard] = part
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    started = time.perf_counter()
    # private temporary files beside the outputs, moved into place at the end: two runs on one output
    # never write into each other's files, and a reader only ever sees a whole manifest
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = output.with_name(f".{output.name}.{unique}.partial")
    rejects_tmp = output.with_name(f".{rejects_path(output).name}.{unique}.partial")
    walk = FolderWalk([s for k, s in kinds if k == "folder"], max_pixels, previous, pairs)
    writer = pq.ParquetWriter(tmp, schema)
    pending: list[Row] = []

    def flush() -> None:
        if pending:
            writer.write_table(rows_to_table(pending, pairs))
            pending.clear()

    def take(rows: list[Row], rejects: list[Reject], files: int) -> None:
        pending.extend(rows)
        summary.rows += len(rows)
        summary.files_seen += files
        for reject in rejects:
            rejects_fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
            summary.rejected += 1
            reason = reject["reason"].split(":")[0].split(" (")[0]
            summary.reject_reasons[reason] = summary.reject_reasons.get(reason, 0) + 1
        if len(pending) >= ROWS_PER_GROUP:
            flush()

    # where this process may run obstore's threads (object storage), workers are spawned, never forked: a forked
    # child inherits its runtime broken (indexing a bucket crashed with SIGSEGV so); else forking is cheaper
    import multiprocessing

    remote = any(kind.startswith("remote_") for kind, _ in kinds) or "obstore" in sys.modules
    pool = ProcessPoolExecutor(
        max_workers=workers or os.cpu_count() or 1,
        initializer=die_with_parent,
        mp_context=multiprocessing.get_context("spawn" if remote else "fork"),
    )
    hidden_main = spawn_without_main()  # workers start at submits throughout the loop: none re-runs __main__
    hidden_main.__enter__()
    try:
        with (
            open(rejects_tmp, "w", encoding="utf-8") as rejects_fh,
            tqdm(disable=not progress, unit=" files", desc="indexing", dynamic_ncols=True) as bar,
        ):
            for kind, source in kinds:
                if kind.startswith("remote_"):
                    _index_remote(kind, source, pool, max_pixels, pairs, take, flush, writer, summary, bar, previous)
                    continue
                if kind == "metadata":
                    table, rejects = metadata_rows(Path(source))
                    flush()
                    writer.write_table(with_identity(table, schema))
                    summary.rows += table.num_rows
                    take([], rejects, table.num_rows + len(rejects))
                    bar.update(table.num_rows + len(rejects))
                elif kind == "shard":
                    reuse = known_shards.get(source)
                    if reuse is not None and _shard_unchanged(reuse, os.stat(source)):
                        flush()
                        writer.write_table(with_identity(reuse, schema))
                        summary.rows += reuse.num_rows
                        summary.reused += reuse.num_rows
                        continue
                    rows, rejects = _submit(pool, shard_task, (source, max_pixels, pairs)).result()
                    take(rows, rejects, len(rows) + len(rejects))
                    bar.update(len(rows) + len(rejects))
                else:
                    empty, fresh = True, os.path.realpath(source) not in walk.walked
                    for (rows, rejects, reused), task in _ordered_map(pool, folder_task, walk.tasks(source)):
                        empty = False
                        summary.reused += reused
                        take(rows, rejects + _drain(walk.rejects), len(task[1]))
                        bar.update(len(task[1]))
                    take([], _drain(walk.rejects), 0)
                    if empty and fresh:  # (a folder already walked through another source is not empty)
                        raise IndexingError(f"no image files found in folder {source}")
            flush()
            writer.close()
        _deduplicate_keys(tmp, rejects_tmp, summary)
        pool.shutdown()
    except BaseException:  # an error, Ctrl-C or SIGTERM (the CLI turns it into SystemExit): leave nothing behind
        stop_pool(pool)
        with contextlib.suppress(Exception):  # (a writer interrupted mid-write may refuse to close)
            writer.close()
        tmp.unlink(missing_ok=True)
        rejects_tmp.unlink(missing_ok=True)
        raise
    finally:
        hidden_main.__exit__(None, None, None)
    os.replace(tmp, output)
    os.replace(rejects_tmp, rejects_path(output))
    summary.seconds = time.perf_counter() - started
    if summary.rows == 0:
        raise IndexingError(
            f"no usable images in {', '.join(sources)} ({summary.rejected} rejected, see {rejects_path(output)})"
        )
    return summary


def _index_to_url(sources: list[str], url: str, *, update: bool, **options) -> IndexSummary:
    """``build_index`` into object storage: the manifest and its rejects file are written in a private local
    folder, then uploaded, rejects first, so a reader that finds the manifest finds whole files. With ``update``,
    the manifest already at ``url`` (if any) is fetched first and its unchanged rows reused."""
    import shutil
    import tempfile

    from ..data.storage import download, exists, upload

    name = url.rstrip("/").rsplit("/", 1)[-1]
    if not name.endswith(".parquet") or url.endswith("/"):
        raise IndexingError(f"-o {url}: name the manifest object, e.g. {url.rstrip('/')}/manifest.parquet")
    rejects_url = rejects_name(url)
    folder = Path(tempfile.mkdtemp(prefix="dali-arb-index-"))
    try:
        local = folder / name
        try:
            if update and exists(url):
                download(url, local)
        except StorageError as exc:
            raise IndexingError(str(exc)) from None
        try:
            summary = build_index(sources, local, update=update, **options)
        except IndexingError as exc:  # its message names the local file: name the URL the user gave
            if rejects_path(local).exists():  # ("no usable images ... see the rejects file": put it there)
                with contextlib.suppress(StorageError):
                    upload(rejects_path(local), rejects_url)
            raise IndexingError(str(exc).replace(str(local), url)) from None
        try:
            upload(rejects_path(local), rejects_url)
            upload(local, url)
        except StorageError as exc:
            raise IndexingError(f"the manifest was built but could not be written: {exc}") from None
        summary.manifest = url
        return summary
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _index_remote(kind, url, pool, max_pixels, pairs, take, flush, writer, summary, bar, previous) -> None:
    """Index one object-storage source (``remote.py``): a prefix (headers only), a shard or metadata (fetched)."""
    from ..data.storage import head

    try:
        if kind == "remote_folder":
            unlisted: list[Reject] = []
            tasks, _ = prefix_tasks(url, max_pixels, previous, pair_listings(pairs), unlisted)
            take([], unlisted, len(unlisted))
            for (rows, rejects, io), task in _ordered_map(pool, remote_folder_task, iter(tasks)):
                summary.reused += io["reused"]
                summary.remote_requests += io["requests"]
                summary.remote_bytes += io["bytes_read"]
                summary.remote_images += len(task[0])
                take(rows, rejects, len(task[0]))
                bar.update(len(task[0]))
            return
        suffix = ".tar" if kind == "remote_shard" else os.path.splitext(url)[1]
        before = head(url) if kind == "remote_shard" else None
        with fetched(url, suffix) as local:
            summary.fetched_objects += 1
            summary.fetched_bytes += os.path.getsize(local)
            if kind == "remote_metadata":
                table, rejects = metadata_rows(Path(local), base_url=url.rsplit("/", 1)[0] + "/")
                flush()
                writer.write_table(with_identity(table, writer.schema))
                summary.rows += table.num_rows
                take([], [_renamed(r, local, url) for r in rejects], table.num_rows + len(rejects))
                return
            rows, rejects = _submit(pool, shard_task, (local, max_pixels, pairs)).result()
        info = head(url)
        if (info.size, info.etag, info.mtime_ns) != (before.size, before.etag, before.mtime_ns):
            raise IndexingError(f"{url} was rewritten while it was indexed; index it again once it is written")
        identity = {"source": url, "mtime_ns": info.mtime_ns, "ctime_ns": None, "source_size": info.size,
                    "etag": info.etag}  # fmt: skip
        rows = [
            row._replace(**identity, pairs=tuple((url, *f[1:]) if f[0] == local else f for f in row.pairs))
            for row in rows
        ]
        take(rows, [_renamed(r, local, url) for r in rejects], len(rows) + len(rejects))
        bar.update(len(rows) + len(rejects))
    except StorageError as exc:
        raise IndexingError(str(exc)) from None


def _shard_unchanged(rows: pa.Table, stat: os.stat_result) -> bool:
    """Whether a local shard is the one its earlier ``rows`` were indexed from (their mtime, ctime and size; a
    shard re-packed with its mtime set back has another ctime). Rows of an older manifest (no ctime): no."""
    if "ctime_ns" not in rows.column_names or "source_size" not in rows.column_names:
        return False
    first = {name: rows.column(name)[0].as_py() for name in ("mtime_ns", "ctime_ns", "source_size")}
    return first == {"mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "source_size": stat.st_size}


def _renamed(reject: Reject, local: str, url: str) -> Reject:
    """A reject of a fetched copy, naming the object instead of the copy."""
    return {**reject, "source": str(reject["source"]).replace(local, url)}


def _checked_pairs(pairs: list[PairSpec] | tuple, kinds: list[tuple[str, str]]) -> list[PairSpec]:
    """The pairs with absolute folders (or prefix URLs ending in ``/``); a ConfigError for what cannot work (a pair
    without a folder for image folders, metadata sources, a missing folder, a name given twice, a pair folder in
    object storage for local images or the reverse)."""
    from ..data.storage import is_url

    checked = []
    for spec in pairs:
        if not isinstance(spec, PairSpec):
            raise ConfigError(f"pairs must be PairSpec objects, got {type(spec).__name__}")
        if any(p.name == spec.name for p in checked):
            raise ConfigError(f"pair name {spec.name!r} is given twice; each pair needs its own name")
        remote_pair = spec.folder is not None and is_url(spec.folder)
        if remote_pair:
            if any(kind != "remote_folder" for kind, _ in kinds):
                raise ConfigError(
                    f"--{spec.kind} {spec.name}={spec.folder}: a pair folder in object storage goes with image prefixes "
                    "in object storage (s3://bucket/images/); give a local pair folder for local images"
                )
            checked.append(PairSpec(spec.name, spec.kind, spec.folder.rstrip("/") + "/"))
            continue
        if spec.folder is not None and any(kind == "remote_folder" for kind, _ in kinds):
            raise ConfigError(
                f"--{spec.kind} {spec.name}={spec.folder}: the images are in object storage, so give the pair folder "
                f"there too ({spec.name}=s3://bucket/{spec.name}/), or use tar shards with members KEY.{spec.name}.<ext>"
            )
        if spec.folder is None and any(kind in ("folder", "remote_folder") for kind, _ in kinds):
            raise ConfigError(
                f"--{spec.kind} {spec.name} has no folder: for image folders give --{spec.kind} {spec.name}=DIR "
                "(DIR/KEY.<ext> is the pair of image KEY); a name alone means tar members KEY.NAME.<ext>"
            )
        if spec.folder is not None and not os.path.isdir(spec.folder):
            raise ConfigError(f"--{spec.kind} {spec.name}={spec.folder}: no such folder")
        checked.append(PairSpec(spec.name, spec.kind, os.path.abspath(spec.folder) if spec.folder else None))
    if checked and any(kind in ("metadata", "remote_metadata") for kind, _ in kinds):
        raise ConfigError(
            "pairs are found next to images (folders) or inside tar shards, not in metadata; index the image folders "
            "or shards with --pair/--mask"
        )
    return checked


def _check_output(output: Path, kinds: list[tuple[str, str]]) -> None:
    """Outputs are never inputs: refuse an ``output`` that is one of the sources, lies inside a source
    folder, or exists as something other than a regular file (``/dev/null``, a FIFO)."""
    if output.exists() and not stat_module.S_ISREG(os.stat(output).st_mode):
        raise IndexingError(
            f"output {output} is not a regular file (a device, FIFO or socket); give a new .parquet file name"
        )
    real = os.path.realpath(output)
    for kind, source in kinds:
        if kind.startswith("remote_"):
            continue  # the output is a local file
        source_real = os.path.realpath(source)
        if real == source_real:
            raise IndexingError(
                f"output {output} is one of the inputs ({source}); writing it would destroy it: choose another -o"
            )
        if kind == "folder" and real.startswith(source_real.rstrip(os.sep) + os.sep):
            raise IndexingError(
                f"output {output} lies inside the input folder {source}; write the manifest next to the folder, "
                f"e.g. -o {Path(source).parent / (Path(source).name + '.parquet')}"
            )


def _drain(items: list) -> list:
    taken = items[:]
    items.clear()
    return taken


def _submit(pool: ProcessPoolExecutor, fn, task: tuple):
    """``pool.submit`` with SIGINT and SIGTERM held until it returns (see :func:`signals_deferred`)."""
    with signals_deferred():
        return pool.submit(fn, task)


def _ordered_map(pool: ProcessPoolExecutor, fn, tasks: Iterator[tuple], depth: int = 16) -> Iterator[tuple]:
    """``pool.map`` with a bounded queue: at most ``depth`` tasks in flight, results in order."""
    from collections import deque

    inflight: deque = deque()
    for task in tasks:
        inflight.append((_submit(pool, fn, task), task))
        if len(inflight) >= depth:
            future, done = inflight.popleft()
            yield future.result(), done
    while inflight:
        future, done = inflight.popleft()
        yield future.result(), done


def _deduplicate_keys(path: Path, rejects_file: Path, summary: IndexSummary) -> None:
    """Keys must be unique across sources: keep the first row of each key, reject the others."""
    keys = pq.read_table(path, columns=["key"]).column("key")
    if pc.count_distinct(keys).as_py() == len(keys):
        return
    table = pq.read_table(path)
    indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by("key").aggregate([("_row", "min")]).column("_row_min")
    mask = pc.is_in(indexed.column("_row"), first)
    dupes = table.filter(pc.invert(mask))
    with open(rejects_file, "a", encoding="utf-8") as fh:
        for key, source in zip(dupes.column("key").to_pylist(), dupes.column("source").to_pylist()):
            fh.write(
                json.dumps(
                    {"source": source, "reason": f"duplicate key {key!r} (kept the first source's)", "key": key},
                    ensure_ascii=False,
                )
                + "\n"
            )
            summary.rejected += 1
            summary.rows -= 1
    summary.reject_reasons["duplicate key"] = summary.reject_reasons.get("duplicate key", 0) + dupes.num_rows
    pq.write_table(table.filter(mask), path, row_group_size=ROWS_PER_GROUP)
