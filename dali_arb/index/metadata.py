"""img2dataset-style metadata (Parquet or CSV with ``key``, ``width``, ``height``; optional ``caption``,
``path``, ``status``): rows taken as they are, in Arrow."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import IndexingError
from ..manifest import SCHEMA
from .records import Reject

__all__ = ["metadata_rows"]


def metadata_rows(path: Path) -> tuple[pa.Table, list[Reject]]:
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
    rejects: list[Reject] = []
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
