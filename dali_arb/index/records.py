"""The row the indexer writes: one record per sample, its fields named as the manifest's columns."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from ..data.manifest import IDENTITY, ORIGINAL, SCHEMA, VIDEO
from ..data.pairs import PairSpec, pair_schema
from ..data.videofacts import VideoFacts
from ..errors import IndexingError

__all__ = [
    "INT32_MAX",
    "NOT_IMAGES",
    "PairFacts",
    "Reject",
    "Row",
    "has_original",
    "index_schema",
    "original_sizes",
    "rows_to_table",
    "video_columns",
    "whole_numbers",
    "with_identity",
]

#: Files next to images that are not samples: never indexed, never rejected (folders, shards, prefixes, pairs).
NOT_IMAGES = frozenset(
    ".txt .caption .json .jsonl .csv .tsv .parquet .md .yaml .yml .npy .npz .pt .pth .safetensors "
    ".db .tags .xmp .log .cls .rejects".split()
)

#: Where a pair's bytes are and its displayed size: ``(source, offset, length, width, height)``.
PairFacts = tuple


class Row(NamedTuple):
    """One manifest row: the columns of ``manifest.SCHEMA`` (same names, same order), its pairs' facts in the order
    of the index run's pairs (``pair_columns`` names their columns), then the rest of its source's identity
    (``manifest.IDENTITY``; None where unknown)."""

    key: str
    width: int
    height: int
    caption: str | None
    source: str | None
    offset: int | None
    length: int | None
    mtime_ns: int | None
    pairs: tuple[PairFacts, ...] = ()
    ctime_ns: int | None = None
    source_size: int | None = None
    etag: str | None = None
    video: VideoFacts | None = None  # a video's facts (the manifest's VIDEO columns), None for an image
    original_width: int | None = None
    original_height: int | None = None


_BASE = len(SCHEMA)
assert Row._fields[:_BASE] == tuple(SCHEMA.names), "Row must name the manifest's columns in order"
assert Row._fields[_BASE + 1 : _BASE + 1 + len(IDENTITY)] == tuple(IDENTITY.names), (
    "Row must end with the identity columns in order"
)
assert Row._fields[-len(ORIGINAL) :] == tuple(ORIGINAL.names), "Row must end with the original-size columns"

#: A refused source: at least ``{"source": ..., "reason": ...}`` (and ``"key"`` where one is known).
Reject = dict


def index_schema(pairs: list[PairSpec] | tuple = (), *, original: bool = False) -> pa.Schema:
    """What the indexer writes: ``SCHEMA``, the identity columns, the columns of ``pairs`` then, with ``original``,
    the ``ORIGINAL`` columns (the ``VIDEO`` columns are added after them, where a row is a video)."""
    schema = SCHEMA
    for field in IDENTITY:
        schema = schema.append(field)
    schema = pair_schema(schema, list(pairs))
    for field in ORIGINAL if original else ():
        schema = schema.append(field)
    return schema


def rows_to_table(rows: list[Row], pairs: list[PairSpec] | tuple = (), *, original: bool = False) -> pa.Table:
    """``rows`` as a table of :func:`index_schema` (``original``: with the ``ORIGINAL`` columns)."""
    schema = index_schema(pairs, original=original)
    fields = list(zip(*rows)) if rows else [()] * len(Row._fields)
    columns = [list(fields[Row._fields.index(name)]) for name in (*SCHEMA.names, *IDENTITY.names)]
    for i in range(len(pairs)):
        facts = [row.pairs[i] for row in rows]
        columns += [[f[j] for f in facts] for j in range(5)]
    if original:
        columns += [list(fields[Row._fields.index(name)]) for name in ORIGINAL.names]
    return pa.Table.from_arrays([pa.array(c, schema.field(j).type) for j, c in enumerate(columns)], schema=schema)


#: The largest size a manifest holds (its columns are int32).
INT32_MAX = 2**31 - 1


def original_sizes(width: pa.Array, height: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The ``ORIGINAL`` columns (``int32``) of ``(n,)`` integer ``width`` and ``height`` values as a source gives
    them: a row keeps both where both are whole numbers from 1 to ``2**31 - 1``, else neither (null: the row's own
    size stands)."""
    import pyarrow.compute as pc

    def usable(column: pa.Array) -> pa.Array:
        return pc.fill_null(pc.and_(pc.greater(column, 0), pc.less_equal(column, 2**31 - 1)), False)

    width, height = pc.cast(width, pa.int64()), pc.cast(height, pa.int64())
    both = pc.and_(usable(width), usable(height))
    return tuple(pc.cast(pc.if_else(both, c, pa.scalar(None, pa.int64())), pa.int32()) for c in (width, height))


def whole_numbers(column: pa.ChunkedArray, name: str, path: str | os.PathLike) -> tuple[pa.Array, pa.Array]:
    """``(values as int64, bad)`` of a size column ``name`` of metadata ``path`` (img2dataset's, or the Parquet beside a
    shard), ``(n,)`` each: ``bad`` marks values that are not whole numbers in ``1..INT32_MAX`` (text that is not a
    number, fractions, NaN, values that would wrap in int32, nulls). An IndexingError for a column of another kind
    (dates, lists)."""
    import pyarrow.compute as pc

    column = column.combine_chunks()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        digits = pc.fill_null(pc.match_substring_regex(column, r"^\s*\d{1,10}(\.0*)?\s*$"), False)
        whole = pc.replace_substring_regex(pc.utf8_trim_whitespace(column), r"\.0*$", "")
        column = pc.if_else(digits, whole, pa.scalar(None, pa.string()))
        column = pc.cast(column, pa.int64())
    elif pa.types.is_floating(kind):
        whole = pc.fill_null(pc.and_(pc.is_finite(column), pc.equal(pc.floor(column), column)), False)
        column = pc.if_else(pc.and_(whole, pc.less_equal(pc.abs(column), float(INT32_MAX))), column, None)
        column = pc.cast(column, pa.int64())
    elif pa.types.is_integer(kind):
        if kind == pa.uint64():  # (values past int64 would not cast: out of range like any other too large)
            column = pc.if_else(pc.less_equal(column, pa.scalar(INT32_MAX, kind)), column, None)
        column = pc.cast(column, pa.int64())
    elif not pa.types.is_null(kind):
        raise IndexingError(
            f"metadata {path}: column {name!r} holds {kind}, not numbers; it needs image sizes in pixels"
        )
    else:
        column = pa.nulls(len(column), pa.int64())
    good = pc.fill_null(pc.and_(pc.greater(column, 0), pc.less_equal(column, INT32_MAX)), False)
    return pc.if_else(good, column, None), pc.invert(good)


def has_original(table: pa.Table | pa.RecordBatch) -> bool:
    """Whether some row of ``table`` has an original size (both ``ORIGINAL`` columns set)."""
    names = table.schema.names
    if not all(name in names for name in ORIGINAL.names):
        return False
    import pyarrow.compute as pc

    both = pc.and_(pc.is_valid(table.column("original_width")), pc.is_valid(table.column("original_height")))
    return bool(pc.any(both).as_py())


def video_columns(facts: list[VideoFacts | None]) -> list[pa.Array]:
    """The manifest's ``VIDEO`` columns (in its order) for rows whose facts are ``facts`` (None: an image)."""
    frame_times = [None if f is None or f.frame_times is None else [float(t) for t in f.frame_times] for f in facts]
    values = {
        "frames": [None if f is None else f.frames for f in facts],
        "fps": [None if f is None else f.fps for f in facts],
        "duration": [None if f is None else f.duration for f in facts],
        "codec": [None if f is None else f.codec for f in facts],
        "vfr": [None if f is None else f.vfr for f in facts],
        "frame_times": frame_times,
    }
    return [pa.array(values[field.name], field.type) for field in VIDEO]


def table_videos(table: pa.Table) -> list[VideoFacts | None]:
    """The video facts of each row of ``table`` (rows of an earlier manifest, metadata) from its ``VIDEO`` columns,
    None for an image (every row of a table without ``frames``)."""
    if "frames" not in table.column_names:
        return [None] * table.num_rows
    data = {name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
            for name in ("width", "height", *VIDEO.names)}  # fmt: skip
    out: list[VideoFacts | None] = []
    for i, frames in enumerate(data["frames"]):
        if frames is None:
            out.append(None)
            continue
        times = data["frame_times"][i]
        out.append(VideoFacts(width=data["width"][i], height=data["height"][i], frames=int(frames),
                              fps=float(data["fps"][i] or 0.0), duration=float(data["duration"][i] or 0.0),
                              codec=data["codec"][i] or "", vfr=bool(data["vfr"][i]),
                              frame_times=None if times is None else np.asarray(times, np.float32)))  # fmt: skip
    return out


def with_identity(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` (metadata rows, rows of an older manifest) in ``schema``'s columns, the identity and original-size
    columns it lacks null (unknown)."""
    for field in (*IDENTITY, *ORIGINAL):
        if field.name in schema.names and field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)
