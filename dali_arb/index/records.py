"""The row the indexer writes: one record per sample, its fields named as the manifest's columns."""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa

from ..manifest import SCHEMA

__all__ = ["Reject", "Row", "rows_to_table"]


class Row(NamedTuple):
    """One manifest row (``manifest.SCHEMA``, same names, same order)."""

    key: str
    width: int
    height: int
    caption: str | None
    source: str | None
    offset: int | None
    length: int | None
    mtime_ns: int | None


assert Row._fields == tuple(SCHEMA.names), "Row must name the manifest's columns in order"

#: A refused source: at least ``{"source": ..., "reason": ...}`` (and ``"key"`` where one is known).
Reject = dict


def rows_to_table(rows: list[Row]) -> pa.Table:
    """``rows`` as a table of the manifest schema."""
    columns = list(zip(*rows)) if rows else [[] for _ in Row._fields]
    return pa.Table.from_arrays(
        [pa.array(column, SCHEMA.field(name).type) for name, column in zip(Row._fields, columns)], schema=SCHEMA
    )
