"""Build a manifest from image folders, webdataset tar shards, or Parquet/CSV metadata.

Sizes come from file headers (Pillow's lazy open decodes no pixels) and are EXIF-upright.
Files that cannot be trained on are refused with a reason (``MANIFEST.rejects.jsonl``); files
that are not images at all (captions, JSON, hidden files) are neither samples nor rejects.
Work is spread over processes; rows stream to Parquet in row groups.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import ConfigError, IndexingError
from .imagefacts import DEFAULT_MAX_PIXELS, inspect_image
from .manifest import SCHEMA, Manifest, rejects_path

__all__ = ["DEFAULT_MAX_PIXELS", "IndexSummary", "build_index", "inspect_image"]

#: Files next to images that are not samples: never indexed, never rejected.
NOT_IMAGES = frozenset(
    ".txt .caption .json .jsonl .csv .tsv .parquet .md .yaml .yml .npy .npz .pt .pth .safetensors "
    ".db .tags .xmp .log .cls .rejects".split()
)
CAPTION_EXTS = (".txt", ".caption")
_ROWS_PER_GROUP = 65536
_FILES_PER_TASK = 256

Row = tuple  # (key, width, height, caption, source, offset, length, mtime_ns)


@dataclass
class IndexSummary:
    """What one ``build_index`` call did."""

    manifest: Path
    rows: int = 0
    rejected: int = 0
    reused: int = 0
    files_seen: int = 0
    seconds: float = 0.0
    reject_reasons: dict[str, int] = field(default_factory=dict)

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
            text += f" ({reasons}), listed in {rejects_path(self.manifest)}"
        return text


# -- workers -------------------------------------------------------------------------------------


def _read_caption(stem_path: str) -> str | None:
    for ext in CAPTION_EXTS:
        try:
            with open(stem_path + ext, encoding="utf-8", errors="replace") as fh:
                return fh.read().strip()
        except OSError:
            continue
    return None


def _folder_task(args: tuple) -> tuple[list[Row], list[dict], int]:
    """Inspect a group of files of one folder: ``(root, [relative paths], max_pixels, known)``.

    Returns rows, rejects, and how many rows were reused from ``known`` (unchanged size and mtime).
    """
    root, relpaths, max_pixels, known = args
    reused = 0
    rows: list[Row] = []
    rejects: list[dict] = []
    kept_by_key: dict[str, str] = {}
    for rel in relpaths:
        path = os.path.join(root, rel)
        key = os.path.splitext(rel)[0].replace(os.sep, "/")
        if key in kept_by_key:
            rejects.append({"source": path, "reason": f"duplicate key {key!r} (kept {kept_by_key[key]})", "key": key})
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            rejects.append({"source": path, "reason": f"unreadable ({exc.strerror or exc})", "key": key})
            continue
        previous = known.get(path) if known else None
        if previous is not None and previous[0] == stat.st_size and previous[1] == stat.st_mtime_ns:
            width, height = previous[2], previous[3]
            reused += 1
        else:
            result = inspect_image(path, max_pixels=max_pixels)
            if isinstance(result, str):
                rejects.append({"source": path, "reason": result, "key": key})
                continue
            width, height = result
        kept_by_key[key] = path
        caption = _read_caption(os.path.splitext(path)[0])
        rows.append((key, width, height, caption, path, 0, stat.st_size, stat.st_mtime_ns))
    return rows, rejects, reused


def _member_key(name: str) -> tuple[str, str]:
    """webdataset convention: key is the path up to the first dot of the base name."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ("." + ext.lower() if dot else "")


def _shard_task(args: tuple) -> tuple[list[Row], list[dict]]:
    """Inspect every sample of one tar shard: ``(shard path, max_pixels)``."""
    shard, max_pixels = args
    rows: list[Row] = []
    rejects: list[dict] = []
    samples: dict[str, dict] = {}
    try:
        with open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _member_key(member.name)
                if key.startswith(".") or os.path.basename(key).startswith("._"):
                    continue
                sample = samples.setdefault(key, {})
                if ext in (".txt", ".caption", ".json"):
                    data = tar.extractfile(member).read()
                    sample[ext] = data.decode("utf-8", errors="replace")
                elif ext in NOT_IMAGES:
                    continue
                elif "image" in sample:
                    rejects.append(
                        {
                            "source": f"{shard}:{member.name}",
                            "reason": f"duplicate key {key!r} (kept {sample['image'][0]})",
                            "key": key,
                        }
                    )
                else:
                    raw.seek(member.offset_data)
                    data = raw.read(member.size)
                    sample["image"] = (member.name, member.offset_data, member.size, data)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [], [{"source": shard, "reason": f"unreadable tar shard ({exc})"}]
    mtime = os.stat(shard).st_mtime_ns
    for key, sample in samples.items():
        if "image" not in sample:
            continue
        name, offset, length, data = sample.pop("image")
        result = inspect_image(data, max_pixels=max_pixels)
        if isinstance(result, str):
            rejects.append({"source": f"{shard}:{name}", "reason": result, "key": key})
            continue
        caption = sample.get(".txt", sample.get(".caption"))
        if caption is None and ".json" in sample:
            try:
                meta = json.loads(sample[".json"])
                caption = meta.get("caption") if isinstance(meta, dict) else None
            except ValueError:
                caption = None
        rows.append((key, result[0], result[1], caption.strip() if caption else caption, shard, offset, length, mtime))
    return rows, rejects


# -- sources -------------------------------------------------------------------------------------


class PreviousRows:
    """Rows of an earlier manifest for ``--update``, kept in Arrow and grouped by folder.

    Only the folder being walked becomes Python objects, so a manifest of 10M files does not turn
    into 10M Python objects at once.
    """

    def __init__(self, table: pa.Table) -> None:
        table = table.filter(pc.and_(pc.is_valid(table.column("source")), pc.is_valid(table.column("mtime_ns"))))
        folder = pc.replace_substring_regex(table.column("source"), pattern="/[^/]*$", replacement="")
        table = table.append_column("_folder", folder).sort_by("_folder")
        self.table = table.select(["source", "length", "mtime_ns", "width", "height"])
        folders = table.column("_folder").combine_chunks()
        if len(folders):
            change = pc.not_equal(folders[1:], folders[:-1]).to_numpy(zero_copy_only=False)
            starts = [0, *(int(i) + 1 for i in change.nonzero()[0])]
            ends = [*starts[1:], len(folders)]
            self.slices = {folders[s].as_py(): (s, e) for s, e in zip(starts, ends)}  # one entry per folder
        else:
            self.slices = {}

    def folder(self, directory: str) -> dict[str, tuple]:
        """``{path: (length, mtime_ns, width, height)}`` for the files indexed in ``directory``."""
        if directory not in self.slices:
            return {}
        start, end = self.slices[directory]
        part = self.table.slice(start, end - start).to_pydict()
        return {
            src: (length, mtime, w, h)
            for src, length, mtime, w, h in zip(
                part["source"], part["length"], part["mtime_ns"], part["width"], part["height"]
            )
        }


def _folder_tasks(root: str, max_pixels: int, previous: PreviousRows | None) -> Iterator[tuple]:
    """Groups of image candidates of one folder tree, same-stem files kept in one group."""
    for directory, dirnames, filenames in os.walk(root, onerror=None):
        known = previous.folder(os.path.normpath(directory)) if previous else {}
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(
            f for f in filenames if not f.startswith(".") and os.path.splitext(f)[1].lower() not in NOT_IMAGES
        )
        rel_dir = os.path.relpath(directory, root)
        rels = [n if rel_dir == "." else os.path.join(rel_dir, n) for n in names]
        start = 0
        while start < len(rels):
            end = min(start + _FILES_PER_TASK, len(rels))
            while end < len(rels) and os.path.splitext(rels[end])[0] == os.path.splitext(rels[end - 1])[0]:
                end += 1  # never split files with one stem across tasks
            chunk = rels[start:end]
            subset = {p: known[p] for p in (os.path.join(root, r) for r in chunk) if p in known} if known else None
            yield (root, chunk, max_pixels, subset)
            start = end


def _metadata_rows(path: Path) -> tuple[pa.Table, list[dict]]:
    """Rows from img2dataset-style Parquet/CSV metadata with ``key``, ``width``, ``height`` columns."""
    import pyarrow.csv as pacsv

    try:
        if path.suffix.lower() == ".csv":
            table = pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(column_types={"key": pa.string(), "caption": pa.string()})
            )
        else:
            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise IndexingError(f"cannot read metadata {path}: {str(exc).splitlines()[0]}") from None
    names = set(table.column_names)
    missing = [c for c in ("key", "width", "height") if c not in names]
    if missing:
        raise IndexingError(
            f"metadata {path} lacks column(s) {', '.join(missing)} (has: {', '.join(table.column_names)}); "
            "it needs key, width and height (img2dataset's parquet output has them)"
        )
    rejects: list[dict] = []
    n = table.num_rows
    keep = pa.array([True] * n)
    key = pc.cast(table.column("key"), pa.string())
    if "status" in names:
        ok = pc.equal(pc.cast(table.column("status"), pa.string()), "success")
        ok = pc.fill_null(ok, False)
        for row in pc.indices_nonzero(pc.invert(ok)).to_pylist():
            rejects.append(
                {
                    "source": f"{path}#{key[row].as_py()}",
                    "reason": f"status {table.column('status')[row].as_py()!r} is not 'success'",
                    "key": key[row].as_py(),
                }
            )
        keep = pc.and_(keep, ok)
    width = pc.cast(table.column("width"), pa.int64(), safe=False)
    height = pc.cast(table.column("height"), pa.int64(), safe=False)
    good_size = pc.fill_null(pc.and_(pc.greater(width, 0), pc.greater(height, 0)), False)
    bad_size = pc.and_(keep, pc.invert(good_size))
    for row in pc.indices_nonzero(bad_size).to_pylist():
        rejects.append(
            {
                "source": f"{path}#{key[row].as_py()}",
                "reason": f"missing or non-positive size {width[row].as_py()}x{height[row].as_py()}",
                "key": key[row].as_py(),
            }
        )
    keep = pc.and_(keep, good_size)
    caption = pc.cast(table.column("caption"), pa.string()) if "caption" in names else pa.nulls(n, pa.string())
    caption = pc.if_else(pc.equal(pc.utf8_trim_whitespace(caption), ""), pa.scalar(None, pa.string()), caption)
    path_column = next((c for c in ("path", "filepath", "file", "image_path") if c in names), None)
    if path_column:
        base = path.parent
        sources = [
            None if p is None else str(p if os.path.isabs(p) else base / p)
            for p in pc.cast(table.column(path_column), pa.string()).to_pylist()
        ]
        exists = [s is not None and os.path.isfile(s) for s in sources]
        for row, (s, ok) in enumerate(zip(sources, exists)):
            if not ok and keep[row].as_py():
                rejects.append(
                    {
                        "source": s or f"{path}#{key[row].as_py()}",
                        "reason": "file named in metadata does not exist",
                        "key": key[row].as_py(),
                    }
                )
        keep = pc.and_(keep, pa.array(exists))
        source = pa.array(sources, pa.string())
        length = pa.array([-1] * n, pa.int64())
    else:
        source = pa.nulls(n, pa.string())
        length = pa.nulls(n, pa.int64())
    out = pa.table(
        {
            "key": key,
            "width": pc.cast(width, pa.int32(), safe=False),
            "height": pc.cast(height, pa.int32(), safe=False),
            "caption": caption,
            "source": source,
            "offset": pa.array([0] * n, pa.int64()) if path_column else pa.nulls(n, pa.int64()),
            "length": length,
            "mtime_ns": pa.nulls(n, pa.int64()),
        },
        schema=SCHEMA,
    )
    return out.filter(keep), rejects


# -- the driver ----------------------------------------------------------------------------------


def _classify(source: str) -> str:
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
) -> IndexSummary:
    """Index ``sources`` into the manifest ``output`` and its rejects file; returns a summary.

    Args:
        sources: image folders (recursive), ``.tar`` shards (webdataset layout), or Parquet/CSV
            metadata with ``key``, ``width``, ``height`` (optional ``caption``, ``path``, ``status``).
        max_pixels: refuse images with more pixels (decompression bombs).
        workers: processes for header reading (default: all cores).
        update: reuse rows of an existing ``output`` whose file size and mtime are unchanged.
        progress: show a progress bar (default: when stderr is a terminal).
    """
    if not sources:
        raise ConfigError("give at least one source to index")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    output = Path(output)
    if output.exists() and output.is_dir():
        raise IndexingError(f"output {output} is a folder; give a file name such as {output / 'manifest.parquet'}")
    if not output.parent.exists():
        raise IndexingError(f"folder {output.parent} does not exist; create it or choose another -o")
    kinds = [(_classify(s), os.path.abspath(s)) for s in sources]  # rows must resolve from any working directory
    previous: PreviousRows | None = None
    known_shards: dict[str, pa.Table] = {}
    summary = IndexSummary(manifest=output)
    if update and output.exists():
        old = Manifest.read(output).table
        if "mtime_ns" in old.column_names and "source" in old.column_names:
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
    tmp = output.with_name(output.name + ".partial")
    rejects_tmp = Path(str(rejects_path(output)) + ".partial")
    writer = pq.ParquetWriter(tmp, SCHEMA)
    pending: list[Row] = []

    def flush() -> None:
        if pending:
            columns = list(zip(*pending))
            writer.write_table(
                pa.Table.from_arrays([pa.array(c, t) for c, t in zip(columns, SCHEMA.types)], schema=SCHEMA)
            )
            pending.clear()

    def take(rows: list[Row], rejects: list[dict], files: int) -> None:
        pending.extend(rows)
        summary.rows += len(rows)
        summary.files_seen += files
        for reject in rejects:
            rejects_fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
            summary.rejected += 1
            reason = reject["reason"].split(":")[0].split(" (")[0]
            summary.reject_reasons[reason] = summary.reject_reasons.get(reason, 0) + 1
        if len(pending) >= _ROWS_PER_GROUP:
            flush()

    try:
        with (
            open(rejects_tmp, "w", encoding="utf-8") as rejects_fh,
            tqdm(disable=not progress, unit=" files", desc="indexing", dynamic_ncols=True) as bar,
            ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool,
        ):
            for kind, source in kinds:
                if kind == "metadata":
                    table, rejects = _metadata_rows(Path(source))
                    flush()
                    writer.write_table(table)
                    summary.rows += table.num_rows
                    take([], rejects, table.num_rows + len(rejects))
                    bar.update(table.num_rows + len(rejects))
                elif kind == "shard":
                    stat = os.stat(source)
                    reuse = known_shards.get(source)
                    if reuse is not None and reuse.column("mtime_ns")[0].as_py() == stat.st_mtime_ns:
                        flush()
                        writer.write_table(reuse.cast(SCHEMA))
                        summary.rows += reuse.num_rows
                        summary.reused += reuse.num_rows
                        continue
                    rows, rejects = pool.submit(_shard_task, (source, max_pixels)).result()
                    take(rows, rejects, len(rows) + len(rejects))
                    bar.update(len(rows) + len(rejects))
                else:
                    tasks = _folder_tasks(source, max_pixels, previous)
                    empty = True
                    for (rows, rejects, reused), task in _ordered_map(pool, _folder_task, tasks):
                        empty = False
                        summary.reused += reused
                        take(rows, rejects, len(task[1]))
                        bar.update(len(task[1]))
                    if empty:
                        raise IndexingError(f"no image files found in folder {source}")
            flush()
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        rejects_tmp.unlink(missing_ok=True)
        raise
    _deduplicate_keys(tmp, rejects_tmp, summary)
    os.replace(tmp, output)
    os.replace(rejects_tmp, rejects_path(output))
    summary.seconds = time.perf_counter() - started
    if summary.rows == 0:
        raise IndexingError(
            f"no usable images in {', '.join(sources)} ({summary.rejected} rejected, see {rejects_path(output)})"
        )
    return summary


def _ordered_map(pool: ProcessPoolExecutor, fn, tasks: Iterator[tuple], depth: int = 16) -> Iterator[tuple]:
    """``pool.map`` with a bounded queue: at most ``depth`` tasks in flight, results in order."""
    from collections import deque

    inflight: deque = deque()
    for task in tasks:
        inflight.append((pool.submit(fn, task), task))
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
    pq.write_table(table.filter(mask), path, row_group_size=_ROWS_PER_GROUP)
