"""img2dataset-style metadata (Parquet or CSV with ``key``, ``width``, ``height``; optional ``caption``,
``path``, ``status``): rows taken as they are, in Arrow."""

from __future__ import annotations

import os
from pathlib import Path
from stat import S_ISREG

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.manifest import IDENTITY, SCHEMA, VIDEO
from ..errors import IndexingError
from .records import Reject

__all__ = ["metadata_rows"]


def metadata_rows(path: Path, *, base_url: str | None = None) -> tuple[pa.Table, list[Reject]]:
    """Rows from img2dataset-style Parquet/CSV metadata with ``key``, ``width``, ``height`` columns.

    ``base_url``: the metadata came from object storage (``path`` is a local copy); relative paths in it are
    taken relative to this URL prefix. Rows naming objects in storage get their size and modification time from
    the store (:func:`_locations`)."""
    import pyarrow.csv as pacsv

    try:
        if path.suffix.lower() == ".csv":
            table = pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(column_types={"key": pa.string(), "caption": pa.string()})
            )
        else:
            _check_unique(pq.read_schema(path).names, path)
            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise IndexingError(f"cannot read metadata {path}: {str(exc).splitlines()[0]}") from None
    _check_unique(table.column_names, path)
    names = set(table.column_names)
    missing = [c for c in ("key", "width", "height") if c not in names]
    if missing:
        raise IndexingError(
            f"metadata {path} lacks column(s) {', '.join(missing)} (has: {', '.join(table.column_names)}); "
            "it needs key, width and height (img2dataset's parquet output has them)"
        )
    rejects: list[Reject] = []
    n = table.num_rows
    if n == 0:
        raise IndexingError(f"metadata {path} has no rows (only a header?); give metadata with one row per image")
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
    width, bad_width = _whole_numbers(table.column("width"), "width", path)
    height, bad_height = _whole_numbers(table.column("height"), "height", path)
    for row in pc.indices_nonzero(pc.and_(keep, pc.or_(bad_width, bad_height))).to_pylist():
        shown = f"{table.column('width')[row].as_py()!r} x {table.column('height')[row].as_py()!r}"
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
    path_column = next((c for c in ("path", "filepath", "file", "image_path") if c in names), None)
    mtime = pa.nulls(n, pa.int64())
    source_size, etag = pa.nulls(n, pa.int64()), pa.nulls(n, pa.string())
    if path_column:
        paths = pc.cast(table.column(path_column), pa.string()).to_pylist()
        sources, lengths, sizes, mtimes, etags, problems = _locations(paths, path, base_url, keep.to_pylist())
        for row, (where, reason) in sorted(problems.items()):
            rejects.append({"source": where or f"{path}#{key[row].as_py()}", "reason": reason, "key": key[row].as_py()})
        keep = pc.and_(keep, pa.array([row not in problems for row in range(n)]))
        source = pa.array(sources, pa.string())
        length = pa.array(lengths, pa.int64())
        mtime = pa.array(mtimes, pa.int64())
        # the source's identity, checked by the loader as for rows of folders and prefixes
        source_size = pa.array(sizes, pa.int64())
        etag = pa.array(etags, pa.string())
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
            "mtime_ns": mtime,
        },
        schema=SCHEMA,
    )
    out = out.append_column(IDENTITY.field("source_size"), source_size).append_column(IDENTITY.field("etag"), etag)
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


INT32_MAX = 2**31 - 1
#: A folder of object storage with at least this many rows of metadata is listed (1000 objects per request);
#: the objects of a folder with fewer are asked for one by one (HEAD), so a handful of rows never lists a big folder.
LIST_FROM = 64
#: HEAD requests in flight at once.
CONCURRENT_HEADS = 32


def _locations(
    paths: list[str | None], metadata: Path, base_url: str | None, wanted: list[bool]
) -> tuple[list, list, list, list, list, dict[int, tuple[str | None, str]]]:
    """``(sources, lengths, sizes, mtimes, etags, problems)`` of the ``paths`` column: each path resolved (relative to the
    metadata's folder, or to ``base_url`` when the metadata came from object storage), and ``{row: (source,
    reason)}`` for the ``wanted`` rows that cannot be served. A local file has length -1 (read whole), its size
    and modification time (``os.stat`` now) its identity; an object in storage gets its size, modification time and
    ETag from the store now, so that the loader reads it whole and
    checks it (a missing object is a problem; a failing store a StorageError)."""
    from ..data.storage import is_url

    sources: list[str | None] = []
    problems: dict[int, tuple[str | None, str]] = {}
    local: dict[int, os.stat_result] = {}  # a local file's identity at indexing, checked by the loader
    for row, p in enumerate(paths):
        if p is None or is_url(p) or os.path.isabs(p):
            source = p
        elif base_url:
            source = _joined(base_url, p)
        else:
            source = str(metadata.parent / p)
        sources.append(source)
        if not wanted[row]:
            continue
        if source is None:
            problems[row] = (None, "file named in metadata does not exist")
        elif not is_url(source):
            try:
                stat = os.stat(source)
            except OSError:
                stat = None
            if stat is None or not S_ISREG(stat.st_mode):
                problems[row] = (source, "file named in metadata does not exist")
            else:
                local[row] = stat
        elif is_url(source) and _bad_key(source):
            problems[row] = (source, "path has an empty, '.' or '..' segment, which object storage paths cannot hold")
    found = _object_infos(
        [s for row, s in enumerate(sources) if wanted[row] and row not in problems and s and is_url(s)]
    )
    lengths, sizes, mtimes, etags = [], [], [], []
    for row, source in enumerate(sources):
        info = found.get(source) if source else None
        if source in found and info is None and wanted[row] and row not in problems:
            problems[row] = (source, "object named in metadata does not exist")
        stat = local.get(row)
        lengths.append(info.size if info else (-1 if source else None))
        sizes.append(info.size if info else (stat.st_size if stat else None))
        mtimes.append(info.mtime_ns if info else (stat.st_mtime_ns if stat else None))
        etags.append(info.etag if info else None)
    return sources, lengths, sizes, mtimes, etags, problems


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


def _whole_numbers(column: pa.ChunkedArray, name: str, path: Path) -> tuple[pa.Array, pa.Array]:
    """``(values as int64, bad)`` of a size column: ``bad`` marks values that are not whole numbers in
    ``1..INT32_MAX`` (text that is not a number, fractions, NaN, values that would wrap in int32, nulls)."""
    column = column.combine_chunks()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        digits = pc.fill_null(pc.match_substring_regex(column, r"^\s*\d{1,10}\s*$"), False)
        column = pc.if_else(digits, pc.utf8_trim_whitespace(column), pa.scalar(None, pa.string()))
        column = pc.cast(column, pa.int64())
    elif pa.types.is_floating(kind):
        whole = pc.fill_null(pc.and_(pc.is_finite(column), pc.equal(pc.floor(column), column)), False)
        column = pc.if_else(pc.and_(whole, pc.less_equal(pc.abs(column), float(INT32_MAX))), column, None)
        column = pc.cast(column, pa.int64())
    elif pa.types.is_integer(kind):
        column = pc.cast(column, pa.int64())
    elif not pa.types.is_null(kind):
        raise IndexingError(
            f"metadata {path}: column {name!r} holds {kind}, not numbers; it needs image sizes in pixels"
        )
    else:
        column = pa.nulls(len(column), pa.int64())
    good = pc.fill_null(pc.and_(pc.greater(column, 0), pc.less_equal(column, INT32_MAX)), False)
    return pc.if_else(good, column, None), pc.invert(good)


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
