"""Key de-duplication across the Parquet files of one index run, streaming and hash-partitioned.

Keys must be unique in a manifest. The files (a single file's row groups, or the parts of a manifest in parts) are
taken in order as one sequence of rows; the first row of each key in that order is kept and every later one becomes
a reject with the reason ``duplicate key 'K' (kept the first source's)``, as ``build_index`` has always done.

Three stages, each bounded by a chunk size instead of the row count:

1. :func:`scatter`: each file's ``key`` column is read ``chunk_rows`` at a time and each key, with its position
   (file, row), goes to one of ``P`` partition files by a hash of the key (``P`` from the files' key bytes:
   :func:`partition_count`). With ``P == 1`` nothing is written: the keys are read straight in stage 2.
2. :func:`losers`: one partition at a time, the keys are grouped (every copy of a key is in the same partition) and
   the positions of the rows that are not a key's first are returned: 8 bytes per duplicate.
3. :func:`drop_rows`: each file holding a duplicate is rewritten without those rows (streamed, row group by row
   group) and the dropped rows become rejects. A file without duplicates is not touched.

Peak memory: one partition's keys (``partition_bytes`` of key text and positions, 256 MiB by default) and about 25
bytes per key of it (a 64-bit hash, its sort order; only keys whose hash repeats are then sorted as text), or one
chunk of rows, whichever is larger, plus 8 bytes per duplicate; not the row count. Stages 1 and 3
are independent per file and stage 2 per partition: :func:`deduplicate` runs them with any ``map`` (the built-in one
for the local engine, Ray tasks for the Ray engine).

Imports NumPy, pyarrow and the standard library.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "CHUNK_ROWS",
    "PARTITION_BYTES",
    "Duplicates",
    "deduplicate",
    "drop_rows",
    "key_hashes",
    "losers",
    "partition_count",
    "scatter",
]

#: Rows read at once from a file (keys in stage 1, whole rows in stage 3).
CHUNK_ROWS = 65536
#: Key text (bytes) per partition: sets the number of partitions and so the peak memory of stage 2.
PARTITION_BYTES = 256 * 2**20
#: A row's position: ``file << ROW_BITS | row`` (2**40 rows per file, 2**23 files).
ROW_BITS = 40
REASON = "duplicate key {key!r} (kept the first source's)"


@dataclass
class Duplicates:
    """What :func:`deduplicate` did: ``dropped`` rows in all, per file (``{file index: rows dropped}``)."""

    dropped: int = 0
    per_file: dict[int, int] = field(default_factory=dict)


def key_hashes(keys: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string of ``keys`` (``uint64[N]``), the same on every machine and run (Python's
    ``hash`` of a str is salted per process): a polynomial over the UTF-8 bytes, then a 64-bit finaliser, computed
    with NumPy on Arrow's buffers (no Python object per key)."""
    if len(keys) > CHUNK_ROWS:  # its temporaries take 8 bytes per byte of key text: a chunk at a time
        return np.concatenate([key_hashes(keys.slice(i, CHUNK_ROWS)) for i in range(0, len(keys), CHUNK_ROWS)])
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    keys = pc.fill_null(pc.cast(keys, pa.large_string()), "")
    n = len(keys)
    _, offsets_buffer, data_buffer = keys.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64)[keys.offset : keys.offset + n + 1]
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    data = data[offsets[0] : offsets[-1]]
    start = offsets[:-1] - offsets[0]
    lengths = np.diff(offsets)
    h = np.zeros(n, np.uint64)
    if len(data):
        position = np.arange(len(data), dtype=np.int64) - np.repeat(start, lengths)
        longest = int(lengths.max())
        with np.errstate(over="ignore"):
            powers = np.cumprod(np.full(longest, 1099511628211, np.uint64), dtype=np.uint64)
            terms = (data.astype(np.uint64) + np.uint64(1)) * powers[position]
            nonempty = lengths > 0
            h[nonempty] = np.add.reduceat(terms, start[nonempty])
    with np.errstate(over="ignore"):
        h ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h


def partition_count(files: list[Path], *, partition_bytes: int = PARTITION_BYTES) -> int:
    """How many hash partitions the keys of ``files`` need so that one holds about ``partition_bytes`` of key text
    (read from the files' Parquet footers: nothing else is read)."""
    total = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.names.index("key")
        for group in range(meta.num_row_groups):
            chunk = meta.row_group(group)
            # uncompressed key bytes, plus the position each key travels with
            total += chunk.column(column).total_uncompressed_size + 8 * chunk.num_rows
    return max(1, math.ceil(total / partition_bytes))


def _key_batches(path: Path, chunk_rows: int) -> Iterator[pa.Array]:
    # (pre_buffer=False: pyarrow's pre-buffering keeps every row group read, so memory grew with the rows)
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=chunk_rows, columns=["key"]):
        keys = batch.column(0)
        yield keys if keys.type == pa.string() else pc.cast(keys, pa.string())  # (large_string, dictionary)


def scatter(index: int, path: Path, scratch: Path, partitions: int, chunk_rows: int = CHUNK_ROWS) -> list[Path]:
    """Stage 1 for file number ``index``: its keys and positions into ``partitions`` Arrow files in ``scratch``
    (``{index}-{p}.arrow``; a partition with no keys of this file gets none). Returns the files written."""
    schema = pa.schema([("key", pa.string()), ("pos", pa.int64())])
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    row = 0
    try:
        for keys in _key_batches(path, chunk_rows):
            n = len(keys)
            pos = (np.int64(index) << np.int64(ROW_BITS)) + np.arange(row, row + n, dtype=np.int64)
            row += n
            part = (key_hashes(keys) % np.uint64(partitions)).astype(np.int64)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(partitions + 1))
            batch = pa.record_batch([keys, pa.array(pos)], schema=schema).take(pa.array(order))
            for p in range(partitions):
                if bounds[p] == bounds[p + 1]:
                    continue
                if p not in writers:
                    writers[p] = pa.ipc.new_file(scratch / f"{index}-{p}.arrow", schema)
                writers[p].write_batch(batch.slice(bounds[p], bounds[p + 1] - bounds[p]))
    finally:
        for writer in writers.values():
            writer.close()
    return [scratch / f"{index}-{p}.arrow" for p in sorted(writers)]


def losers(sources: list[Path], *, from_files: list[tuple[int, Path]] | None = None) -> np.ndarray:
    """Stage 2 for one partition: the positions (``int64``, sorted) of rows whose key came earlier.

    ``sources``: the partition's Arrow files from :func:`scatter`; or, with ``from_files`` (``(index, path)`` of
    every file: the one-partition case), the keys are read from the files themselves."""
    if from_files is not None:
        tables = []
        for index, path in from_files:
            keys = pq.read_table(path, columns=["key"]).column("key")
            base = np.int64(index) << np.int64(ROW_BITS)
            tables.append(pa.table({"key": pc.cast(keys, pa.string()), "pos": base + np.arange(len(keys))}))
    else:
        tables = [pa.ipc.open_file(path).read_all() for path in sources]
    if not tables:
        return np.zeros(0, np.int64)
    table = pa.concat_tables(tables)
    # rows whose key hash occurs once cannot be duplicates (most of them): only the others are compared as text
    hashes = key_hashes(table.column("key"))
    order = np.argsort(hashes)
    repeated = hashes[order[1:]] == hashes[order[:-1]]
    candidate = np.zeros(len(hashes), bool)
    candidate[order[1:][repeated]] = True
    candidate[order[:-1][repeated]] = True
    del hashes, order, repeated
    if not candidate.any():
        return np.zeros(0, np.int64)
    rows = table.filter(pa.array(candidate))
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("key", "ascending"), ("pos", "ascending")]))
    keys, positions = rows.column("key").combine_chunks(), rows.column("pos").to_numpy()
    later = pc.equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)  # a key equal to the one before: not first
    return np.sort(positions[1:][later])


def drop_rows(path: Path, rows: np.ndarray, out: Path, chunk_rows: int = CHUNK_ROWS) -> list[dict]:
    """Stage 3 for one file: ``path`` without ``rows`` (sorted row numbers) written to ``out`` (row groups of
    ``chunk_rows``), and the rejects of the dropped rows in their order."""
    source = pq.ParquetFile(path, pre_buffer=False)  # (pre-buffering keeps every row group read: grows)
    rejects: list[dict] = []
    start = 0
    with pq.ParquetWriter(out, source.schema_arrow) as writer:
        for batch in source.iter_batches(batch_size=chunk_rows):
            end = start + batch.num_rows
            lo, hi = np.searchsorted(rows, [start, end])
            here = rows[lo:hi] - start
            if len(here):
                keep = np.ones(batch.num_rows, bool)
                keep[here] = False
                dropped = batch.take(pa.array(here))
                keys = dropped.column("key").to_pylist()
                where = dropped.column("source").to_pylist() if "source" in batch.schema.names else [None] * len(keys)
                rejects += [{"source": s, "reason": REASON.format(key=k), "key": k} for k, s in zip(keys, where)]
                batch = batch.filter(pa.array(keep))
            writer.write_batch(batch)
            start = end
    return rejects


def _starmap(map_fn: Callable, fn: Callable, args: Iterable[tuple]) -> list:
    return list(map_fn(lambda a: fn(*a), list(args)))


def deduplicate(
    files: list[Path],
    scratch: Path,
    *,
    rejects: Callable[[list[dict]], None],
    map_fn: Callable[[Callable, list], Iterable] = map,
    partition_bytes: int = PARTITION_BYTES,
    chunk_rows: int = CHUNK_ROWS,
) -> Duplicates:
    """Drop the rows of ``files`` (in order: one sequence of rows) whose key an earlier row holds; each file holding
    one is rewritten in place. ``rejects`` is called with each file's rejects, in file order; ``scratch`` is a folder
    for the partitions (emptied of them at the end); ``map_fn(fn, items)`` runs ``fn`` over ``items`` (the built-in
    ``map``, or one that runs them as Ray tasks) and returns the results in order."""
    files = [Path(f) for f in files]
    partitions = partition_count(files, partition_bytes=partition_bytes)
    scratch.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        if partitions == 1:
            found = [losers([], from_files=list(enumerate(files)))]
        else:
            scattered = _starmap(
                map_fn, scatter, [(i, f, scratch, partitions, chunk_rows) for i, f in enumerate(files)]
            )
            written = [p for paths in scattered for p in paths]
            by_partition: dict[int, list[Path]] = {}
            for path in written:
                by_partition.setdefault(int(path.stem.split("-")[1]), []).append(path)
            found = _starmap(map_fn, losers, [(paths,) for _, paths in sorted(by_partition.items())])
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    positions = np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
    result = Duplicates(dropped=len(positions))
    if not len(positions):
        return result
    file_of = positions >> np.int64(ROW_BITS)
    row_of = positions & np.int64((1 << ROW_BITS) - 1)
    jobs = []
    for index in np.unique(file_of).tolist():
        rows = row_of[file_of == index]
        result.per_file[index] = len(rows)
        jobs.append((files[index], rows, scratch / f"dedupe-{index}-{os.getpid()}.parquet", chunk_rows))
    outcomes = _starmap(map_fn, drop_rows, jobs)
    for (path, _, out, _), found_rejects in zip(jobs, outcomes):
        os.replace(out, path)
        rejects(found_rejects)
    return result


def write_rejects(fh, found: list[dict]) -> None:
    """Append ``found`` rejects to the open rejects file ``fh`` (JSON Lines)."""
    for reject in found:
        fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
