"""img2dataset-style metadata (Parquet or CSV with ``key``, ``width``, ``height``; optional ``caption``,
``path``, ``status``, ``original_width``/``original_height``): rows taken as they are, in Arrow, a chunk at a time.

Metadata of any size is read in chunks (:data:`CHUNK_ROWS` rows of Parquet, :data:`CSV_BLOCK_BYTES` of CSV), each
checked and written before the next is read: memory is set by the chunk, not by the file (about 1 KB per row of
img2dataset's columns at most, so a few hundred MB per chunk). Sizes, statuses and captions are checked with Arrow's
vectorised kernels; a ``path`` column is resolved with them too, and the local files it names are looked up with
``os.stat`` in a pool of threads (:data:`STAT_THREADS`: the calls overlap where a network file system makes each
slow), objects in storage by listing or concurrent HEADs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from stat import S_ISREG

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.manifest import IDENTITY, ORIGINAL, SCHEMA, VIDEO
from ..errors import IndexingError
from .records import INT32_MAX, Reject, original_sizes, whole_numbers

__all__ = ["CHUNK_ROWS", "has_paths", "metadata_chunks", "metadata_rows", "row_group_ranges"]

#: Rows of Parquet metadata read and checked at once.
CHUNK_ROWS = 1 << 20
#: Bytes of CSV metadata read and checked at once (about a million rows of img2dataset's CSV columns).
CSV_BLOCK_BYTES = 64 << 20
#: Threads looking up the local files a ``path`` column names.
STAT_THREADS = 8
#: The column naming each image's file, by the names img2dataset and other tools use (the first present).
PATH_COLUMNS = ("path", "filepath", "file", "image_path")


def metadata_rows(path: Path, *, base_url: str | None = None) -> tuple[pa.Table, list[Reject]]:
    """All rows of the metadata at ``path`` at once (:func:`metadata_chunks`, concatenated): for small files and
    tests; the indexer streams the chunks."""
    tables, rejects = [], []
    for table, found in metadata_chunks(path, base_url=base_url):
        tables.append(table)
        rejects += found
    return pa.concat_tables(tables), rejects


def metadata_chunks(
    path: Path,
    *,
    base_url: str | None = None,
    chunk_rows: int | None = None,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[tuple[pa.Table, list[Reject]]]:
    """``(rows, rejects)`` of img2dataset-style Parquet/CSV metadata with ``key``, ``width``, ``height`` columns, a
    chunk of at most ``chunk_rows`` (default :data:`CHUNK_ROWS`) rows (Parquet) or :data:`CSV_BLOCK_BYTES` (CSV) at a time, in file order.
    ``row_groups``: only the Parquet row groups ``[start, stop)`` (a range of :func:`row_group_ranges`).

    ``base_url``: the metadata came from object storage (``path`` is a local copy); relative paths in it are
    taken relative to this URL prefix. Rows naming objects in storage get their size and modification time from
    the store (:func:`_locations`). An IndexingError for metadata that cannot serve (no such columns, no rows)."""
    total = 0
    for table in _read_chunks(path, chunk_rows or CHUNK_ROWS, row_groups):
        total += table.num_rows
        if table.num_rows:
            yield _checked_rows(table, path, base_url)
    if total == 0 and row_groups is None:
        raise IndexingError(f"metadata {path} has no rows (only a header?); give metadata with one row per image")


def row_group_ranges(path: Path, rows: int) -> list[tuple[int, int]]:
    """The Parquet metadata at ``path`` split into ranges of whole row groups ``[start, stop)`` of about ``rows``
    rows each (at least ``rows``, but for the last; a row group is never split), from its footer alone; ``[]`` for a
    CSV file (a quoted caption may hold a line break, so a byte offset is not known to start a row without reading
    from the start), a file of one range, or one that cannot be read (its reader names the problem)."""
    if path.suffix.lower() == ".csv":
        return []
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError):
        return []
    ranges: list[tuple[int, int]] = []
    start, held = 0, 0
    for group in range(meta.num_row_groups):
        held += meta.row_group(group).num_rows
        if held >= rows:
            ranges.append((start, group + 1))
            start, held = group + 1, 0
    if start < meta.num_row_groups and held:
        ranges.append((start, meta.num_row_groups))
    return ranges if len(ranges) > 1 else []


def has_paths(path: Path) -> bool:
    """Whether the metadata at ``path`` has a column naming each image's file (:data:`PATH_COLUMNS`): read from a
    Parquet footer or a CSV header line. True when it cannot be read (nothing is promised about it)."""
    import csv

    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8", errors="replace") as fh:
                names = next(csv.reader(fh), [])
        else:
            names = pq.read_schema(path).names
    except (pa.ArrowException, OSError, csv.Error):
        return True
    return any(c in names for c in PATH_COLUMNS)


def _read_chunks(path: Path, chunk_rows: int, row_groups: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """The metadata's rows (of Parquet ``row_groups`` ``[start, stop)`` only, when given), a chunk at a time (Arrow
    tables); one line naming the file when it cannot be read."""
    import pyarrow.csv as pacsv

    try:
        if path.suffix.lower() == ".csv":
            text = {name: pa.string() for name in ("key", "caption", "width", "height", "status", *PATH_COLUMNS,
                                                   *ORIGINAL.names)}  # fmt: skip
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                convert_options=pacsv.ConvertOptions(column_types=text),
            )
            names = reader.schema.names
        else:
            parquet = pq.ParquetFile(path, pre_buffer=False)  # (pre-buffering keeps every row group read: grows)
            names = parquet.schema_arrow.names
        _check_unique(names, path)
        missing = [c for c in ("key", "width", "height") if c not in names]
        if missing:
            raise IndexingError(
                f"metadata {path} lacks column(s) {', '.join(missing)} (has: {', '.join(names)}); "
                "it needs key, width and height (img2dataset's parquet output has them)"
            )
        if path.suffix.lower() == ".csv":
            batches = reader
        else:
            groups = None if row_groups is None else list(range(*row_groups))
            batches = parquet.iter_batches(batch_size=chunk_rows, row_groups=groups)
        for batch in batches:
            yield pa.Table.from_batches([batch])
    except (pa.ArrowException, OSError) as exc:
        raise IndexingError(f"cannot read metadata {path}: {str(exc).splitlines()[0]}") from None


def _checked_rows(table: pa.Table, path: Path, base_url: str | None) -> tuple[pa.Table, list[Reject]]:
    """One chunk of metadata as manifest rows, and the rows refused with their reasons."""
    names = set(table.column_names)
    rejects: list[Reject] = []
    n = table.num_rows
    keep = pa.array(np.ones(n, bool))
    key = pc.cast(table.column("key"), pa.string()).combine_chunks()
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
    width, bad_width = whole_numbers(table.column("width"), "width", path)
    height, bad_height = whole_numbers(table.column("height"), "height", path)
    for row in pc.indices_nonzero(pc.and_(keep, pc.or_(bad_width, bad_height))).to_pylist():
        shown = f"{_shown(table.column('width')[row].as_py())} x {_shown(table.column('height')[row].as_py())}"
        rejects.append(
            {
                "source": f"{path}#{key[row].as_py()}",
                "reason": f"size is not two whole numbers between 1 and {INT32_MAX} ({shown})",
                "key": key[row].as_py(),
            }
        )
    good_size = pc.invert(pc.or_(bad_width, bad_height))
    keep = pc.and_(keep, good_size)
    caption = _text(table.column("caption"), path) if "caption" in names else pa.nulls(n, pa.string())
    caption = pc.if_else(pc.equal(pc.utf8_trim_whitespace(caption), ""), pa.scalar(None, pa.string()), caption)
    path_column = next((c for c in PATH_COLUMNS if c in names), None)
    mtime = pa.nulls(n, pa.int64())
    source_size, etag = pa.nulls(n, pa.int64()), pa.nulls(n, pa.string())
    if path_column:
        paths = pc.cast(table.column(path_column), pa.string()).combine_chunks()
        wanted = keep.to_numpy(zero_copy_only=False)
        source, length, source_size, mtime, etag, problems = _locations(paths, path, base_url, wanted)
        for row, (where, reason) in sorted(problems.items()):
            rejects.append({"source": where or f"{path}#{key[row].as_py()}", "reason": reason, "key": key[row].as_py()})
        if problems:
            served = np.ones(n, bool)
            served[list(problems)] = False
            keep = pc.and_(keep, pa.array(served))
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
            "offset": pa.array(np.zeros(n, np.int64)) if path_column else pa.nulls(n, pa.int64()),
            "length": length,
            "mtime_ns": mtime,
        },
        schema=SCHEMA,
    )
    out = out.append_column(IDENTITY.field("source_size"), source_size).append_column(IDENTITY.field("etag"), etag)
    if all(name in names for name in ORIGINAL.names):  # img2dataset's size before resizing: kept where usable
        sizes = [whole_numbers(table.column(name), name, path)[0] for name in ORIGINAL.names]
        for field, column in zip(ORIGINAL, original_sizes(*sizes)):
            out = out.append_column(field, column)
    if "frames" in names:  # videos: their facts as the metadata gives them (frames, fps; duration, codec, vfr...)
        videos, bad = _video_columns(table, path)
        for row in pc.indices_nonzero(pc.and_(keep, bad)).to_pylist():
            rejects.append({"source": f"{path}#{key[row].as_py()}", "key": key[row].as_py(),
                            "reason": "frame count unknowable: a video row needs frames >= 1 and fps > 0"})  # fmt: skip
        keep = pc.and_(keep, pc.invert(bad))
        for field, column in zip(VIDEO, videos):
            out = out.append_column(field, column)
    return out.filter(keep), rejects


def _video_columns(table: pa.Table, path: Path) -> tuple[list[pa.Array], pa.Array]:
    """The manifest's ``VIDEO`` columns from metadata that has ``frames`` (null: an image), and which rows claim to
    be videos without a usable frame count and rate. ``duration`` defaults to ``frames / fps``, ``vfr`` to False;
    ``frame_times`` are taken only with ``vfr``."""
    n = table.num_rows

    def column(name: str, kind: pa.DataType) -> pa.Array:
        if name not in table.column_names:
            return pa.nulls(n, kind)
        try:
            return pc.cast(table.column(name), kind).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise IndexingError(
                f"metadata {path}: column {name!r} is not {kind} ({str(exc).splitlines()[0]})"
            ) from None

    frames, fps = column("frames", pa.int32()), column("fps", pa.float64())
    video = pc.is_valid(frames)
    usable = pc.and_(pc.greater_equal(frames, 1), pc.greater(fps, 0.0))
    bad = pc.and_(video, pc.invert(pc.fill_null(usable, False)))
    duration = pc.if_else(pc.is_valid(column("duration", pa.float64())), column("duration", pa.float64()),
                          pc.divide(pc.cast(frames, pa.float64()), fps))  # fmt: skip
    vfr = pc.if_else(video, pc.fill_null(column("vfr", pa.bool_()), False), pa.scalar(None, pa.bool_()))
    times = pc.if_else(pc.fill_null(vfr, False), column("frame_times", pa.list_(pa.float32())),
                       pa.nulls(n, pa.list_(pa.float32())))  # fmt: skip
    return [frames, fps, duration, column("codec", pa.string()), vfr, times], bad


#: A folder of object storage with at least this many rows of metadata is listed (1000 objects per request);
#: the objects of a folder with fewer are asked for one by one (HEAD), so a handful of rows never lists a big folder.
LIST_FROM = 64
#: HEAD requests in flight at once.
CONCURRENT_HEADS = 32


def _shown(value: object) -> str:
    """A size value as a reject's reason shows it: a number as written (CSV is read as text), anything else quoted."""
    import re

    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d*)?\s*", value):
        return value.strip()
    return repr(value)


def _locations(
    paths: pa.Array, metadata: Path, base_url: str | None, wanted: np.ndarray
) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array, pa.Array, dict[int, tuple[str | None, str]]]:
    """``(sources, lengths, sizes, mtimes, etags, problems)`` of the ``(n,)`` ``paths`` column: each path resolved
    (relative to the metadata's folder, or to ``base_url`` when the metadata came from object storage), and
    ``{row: (source, reason)}`` for the ``wanted`` rows (``bool (n,)``) that cannot be served. A local file has length
    -1 (read whole), its size and modification time (``os.stat`` now) its identity; an object in storage gets its
    size, modification time and ETag from the store now, so that the loader reads it whole and checks it (a missing
    object is a problem; a failing store a StorageError)."""
    from ..data.storage import URL_PATTERN

    n = len(paths)
    present = paths.is_valid().to_numpy(zero_copy_only=False)
    is_url = pc.fill_null(pc.match_substring_regex(paths, URL_PATTERN), False).to_numpy(zero_copy_only=False)
    absolute = pc.fill_null(pc.starts_with(paths, "/"), False).to_numpy(zero_copy_only=False)
    relative = present & ~is_url & ~absolute
    sources = paths
    if relative.any():
        sources = _resolved(paths, relative, metadata, base_url)
    is_url |= relative & bool(base_url)
    problems: dict[int, tuple[str | None, str]] = {}
    for row in np.flatnonzero(wanted & ~present):
        problems[int(row)] = (None, "file named in metadata does not exist")
    lengths = np.full(n, -1, np.int64)
    sizes = np.zeros(n, np.int64)
    mtimes = np.zeros(n, np.int64)
    known = np.zeros(n, bool)  # rows whose source's identity was found
    etags: list[str | None] = [None] * n if is_url.any() else []
    local_rows = np.flatnonzero(wanted & present & ~is_url)
    if local_rows.size:
        names = sources.take(pa.array(local_rows)).to_pylist()
        for row, name, stat in zip(local_rows.tolist(), names, _stat_many(names)):
            if stat is None or not S_ISREG(stat.st_mode):
                problems[row] = (name, "file named in metadata does not exist")
            else:
                sizes[row], mtimes[row], known[row] = stat.st_size, stat.st_mtime_ns, True
    remote_rows = np.flatnonzero(wanted & present & is_url)
    if remote_rows.size:
        urls = sources.take(pa.array(remote_rows)).to_pylist()
        good = []
        for row, url in zip(remote_rows.tolist(), urls):
            if _bad_key(url):
                problems[row] = (url, "path has an empty, '.' or '..' segment, which object storage paths cannot hold")
            else:
                good.append((row, url))
        found = _object_infos([url for _, url in good])
        for row, url in good:
            info = found.get(url)
            if info is None:
                problems[row] = (url, "object named in metadata does not exist")
                continue
            lengths[row], sizes[row], mtimes[row], known[row] = info.size, info.size, info.mtime_ns, True
            etags[row] = info.etag
    lengths_array = pa.array(lengths, mask=~present)  # (a row without a path has no length)
    return (
        sources,
        lengths_array,
        pa.array(sizes, mask=~known),
        pa.array(mtimes, mask=~known),
        pa.array(etags, pa.string()) if etags else pa.nulls(n, pa.string()),
        problems,
    )


def _resolved(paths: pa.Array, relative: np.ndarray, metadata: Path, base_url: str | None) -> pa.Array:
    """``paths`` with the ``relative`` ones (``bool (n,)``) joined to the metadata's folder (as ``Path`` joins them:
    ``.`` segments, repeated and trailing ``/`` dropped) or, with ``base_url``, to that URL prefix (``..`` resolved)."""
    if base_url:
        out = paths.to_pylist()
        for row in np.flatnonzero(relative).tolist():
            out[row] = _joined(base_url, out[row])
        return pa.array(out, pa.string())
    folder = str(metadata.parent)
    joined = pc.binary_join_element_wise(pa.scalar(folder), paths, "/")
    # the rare paths Path would rewrite ("./a.jpg", "a//b.jpg", "dir/"): joined one by one
    odd = pc.fill_null(pc.match_substring_regex(paths, r"(^|/)\.(/|$)|//|/$|^$"), False).to_numpy(zero_copy_only=False)
    if (odd & relative).any():
        fixed = joined.to_pylist()
        for row in np.flatnonzero(odd & relative).tolist():
            fixed[row] = str(metadata.parent / paths[row].as_py())
        joined = pa.array(fixed, pa.string())
    return pc.if_else(pa.array(relative), joined, paths)


def _stat_many(names: list[str]) -> list[os.stat_result | None]:
    """``os.stat`` of each local path (None where it fails), in :data:`STAT_THREADS` threads, in order."""

    def stat_all(batch: list[str]) -> list[os.stat_result | None]:
        out: list[os.stat_result | None] = []
        for name in batch:
            try:
                out.append(os.stat(name))
            except (OSError, ValueError):
                out.append(None)
        return out

    step = max(256, len(names) // (4 * STAT_THREADS) + 1)
    batches = [names[i : i + step] for i in range(0, len(names), step)]
    if len(batches) == 1:
        return stat_all(batches[0])
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        return [stat for done in pool.map(stat_all, batches) for stat in done]


def _joined(base_url: str, relative: str) -> str:
    """``relative`` (a path) resolved against the folder URL ``base_url`` as a browser resolves it: ``.`` and ``..``
    segments removed (``..`` never above the bucket), empty segments kept."""
    from ..data.storage import split_url

    scheme, bucket, key = split_url(base_url + relative)
    out: list[str] = []
    for part in key.split("/"):
        if part == "..":
            if out:
                out.pop()
        elif part != ".":
            out.append(part)
    return f"{scheme}://{bucket}/" + "/".join(out)


def _bad_key(url: str) -> bool:
    from ..data.storage import split_url

    return any(part in ("", ".", "..") for part in split_url(url)[2].split("/"))


def _object_infos(urls: list[str]) -> dict:
    """``{url: ObjectInfo or None (not there)}`` of objects in storage: the folders holding :data:`LIST_FROM` or
    more of them listed (a request per 1000 objects), the others asked for one by one (HEAD, concurrently)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..data.storage import SCHEMES, split_url
    from ..errors import ObjectMissing
    from .remote import list_objects

    by_folder: dict[str, set[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rsplit("/", 1)[0] + "/", set()).add(url)
    found: dict = {}
    listed: set[str] = set()

    def covered(folder: str) -> bool:  # a folder inside one listed (listings are recursive)
        parts = folder.split("/")
        return any("/".join(parts[:i]) + "/" in listed for i in range(3, len(parts)))

    for folder in sorted(by_folder):  # (a folder sorts after the folders that hold it)
        if not SCHEMES[split_url(folder)[0]].can_list or len(by_folder[folder]) < LIST_FROM or covered(folder):
            continue
        listed.add(folder)
        for info in list_objects(folder, []):
            found[info.url] = info
    wanted = sorted(url for folder, urls in by_folder.items() if not covered(folder) for url in urls - found.keys())

    def head_of(url: str):
        from ..data.storage import head

        try:
            return head(url)
        except ObjectMissing:
            return None

    with ThreadPoolExecutor(CONCURRENT_HEADS) as pool:
        found.update(zip(wanted, pool.map(head_of, wanted)))
    for url in urls:
        found.setdefault(url, None)  # in a listed folder, not listed: not there
    return found


def _check_unique(names: list[str], path: Path) -> None:
    """An IndexingError naming the columns of metadata ``path`` that occur more than once."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise IndexingError(
            f"metadata {path} has column(s) {', '.join(map(repr, twice))} more than once; "
            "rename or drop the extra column(s) (each name once)"
        )


def _text(column: pa.ChunkedArray, path: Path) -> pa.Array:
    """Captions as UTF-8 strings: binary values are decoded like caption files (UTF-8, UTF-16 with a BOM,
    else Windows-1252)."""
    from .folders import decode_caption

    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return pa.array([None if v is None else decode_caption(v) for v in column.to_pylist()], pa.string())
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise IndexingError(
            f"metadata {path}: column 'caption' holds {column.type}, not text; write captions as strings"
        ) from None
