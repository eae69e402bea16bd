"""The row the indexer writes: one record per sample, its fields named as the manifest's columns."""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa

from ..manifest import SCHEMA
from ..pairs import PairSpec, pair_schema

__all__ = ["PairFacts", "Reject", "Row", "rows_to_table"]

#: Where a pair's bytes are and its displayed size: ``(source, offset, length, width, height)``.
PairFacts = tuple


class Row(NamedTuple):
    """One manifest row (``manifest.SCHEMA``, same names, same order), and its pairs' facts in the order of
    the index run's pairs (``pair_columns`` names their columns)."""

    key: str
    width: int
    height: int
    caption: str | None
    source: str | None
    offset: int | None
    length: int | None
    mtime_ns: int | None
    pairs: tuple[PairFacts, ...] = ()


assert Row._fields[:-1] == tuple(SCHEMA.names), "Row must name the manifest's columns in order"

#: A refused source: at least ``{"source": ..., "reason": ...}`` (and ``"key"`` where one is known).
Reject = dict


def rows_to_table(rows: list[Row], pairs: list[PairSpec] | tuple = ()) -> pa.Table:
    """``rows`` as a table of the manifest schema with the columns of ``pairs``."""
    schema = pair_schema(SCHEMA, list(pairs))
    base = len(SCHEMA)
    columns = [list(c) for c in zip(*(row[:base] for row in rows))] if rows else [[] for _ in range(base)]
    for i in range(len(pairs)):
        facts = [row.pairs[i] for row in rows]
        columns += [[f[j] for f in facts] for j in range(5)]
    return pa.Table.from_arrays([pa.array(c, schema.field(j).type) for j, c in enumerate(columns)], schema=schema)
