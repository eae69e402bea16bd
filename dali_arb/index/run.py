"""One ``build_index`` call as the readers see it: :class:`IndexRun` (where a reader puts rows and rejects, the
worker pool it submits header reading to) and :class:`IndexSummary` (what the call did).

Imports pyarrow, the standard library, ``data.manifest``, ``data.pairs``, ``processes``, ``records`` and ``folders``
(the folder walk and the rows of an earlier manifest).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.manifest import VIDEO, rejects_name
from ..data.pairs import PairSpec
from ..data.videofacts import VideoFacts
from ..errors import IndexingError
from ..processes import signals_deferred
from .folders import FolderWalk, PreviousRows
from .records import (
    Reject,
    Row,
    has_original,
    index_schema,
    rows_to_table,
    table_videos,
    video_columns,
    with_identity,
)

__all__ = ["ROWS_PER_GROUP", "IndexRun", "IndexSummary", "finished"]

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
    #: shards in object storage walked header by header (img2dataset's Parquet beside them): shards, requests and
    #: bytes read (the Parquets' included), the shards' bytes
    shard_walks: int = 0
    shard_walk_requests: int = 0
    shard_walk_bytes: int = 0
    shard_walk_size: int = 0
    #: shards and metadata fetched whole from object storage: objects, bytes
    fetched_objects: int = 0
    fetched_bytes: int = 0
    #: videos indexed: how many, how many had their frames counted by demuxing, bytes read for them
    videos: int = 0
    videos_counted: int = 0
    video_bytes_read: int = 0
    #: rows with no path to their image (metadata without a path column): sizes that ``buckets`` and ``plan`` use, but
    #: nothing the loader can read
    no_source: int = 0
    #: where the rejects are listed when not beside the manifest (``MANIFEST.rejects.jsonl``): a manifest in parts'
    rejects_at: str | None = None
    #: a manifest in parts (``-o DIR/``): parts kept whole from the manifest being updated, parts written
    parts_reused: int = 0
    parts_written: int = 0
    #: a run with no usable row left the manifest already at its output as it was (its rejects listed apart)
    left_previous: bool = False

    @property
    def files_per_s(self) -> float:
        return self.files_seen / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        reasons = ", ".join(
            f"{n} {r.split(' (')[0]}" for r, n in sorted(self.reject_reasons.items(), key=lambda x: -x[1])
        )
        text = (
            f"indexed {self.rows - self.videos} images"
            + (f" and {self.videos} videos" if self.videos else "")
            + f" into {self.manifest} "
            f"({self.files_seen} files in {self.seconds:.1f} s, {self.files_per_s:.0f} files/s"
            + (f", {self.reused} unchanged reused" if self.reused else "")
            + (
                f"; parts: {self.parts_reused} unchanged kept, {self.parts_written} written"
                if self.parts_reused or self.parts_written
                else ""
            )
            + f"); rejected {self.rejected}"
        )

        if self.rejected:
            text += f" ({reasons}), listed in {self.rejects_at or rejects_name(self.manifest)}"
        if self.remote_images:
            text += (
                f"; from object storage: {self.remote_requests / self.remote_images:.2f} requests and "
                f"{self.remote_bytes / self.remote_images / 1024:.0f} KiB per image (headers only)"
            )
        if self.videos:
            text += (
                f"; videos: {self.videos - self.videos_counted} from their header and first frame, "
                f"{self.videos_counted} counted by demuxing, {self.video_bytes_read / self.videos / 1024:.0f} KiB "
                "read per video"
            )
        if self.no_source:
            text += (
                f"; {'all ' if self.no_source == self.rows else ''}{self.no_source} of them have no path to their image "
                "(metadata without a path column): `dali-arb buckets` and `plan` can use them, the loader cannot serve "
                "them; add a column path (or filepath, file, image_path) naming each image's file or URL, or index the "
                "images or tar shards themselves"
            )
        if self.shard_walks:
            text += (
                f"; {self.shard_walks} shard(s) in object storage read header-only (img2dataset's Parquet beside "
                f"them): {self.shard_walk_requests / self.shard_walks:.1f} requests and "
                f"{self.shard_walk_bytes / self.shard_walks / 1024:.0f} KiB per shard, "
                f"{100 * self.shard_walk_bytes / max(1, self.shard_walk_size):.1f}% of their "
                f"{self.shard_walk_size / 2**20:.1f} MiB"
            )
        if self.fetched_objects:
            text += f"; {self.fetched_objects} shard/metadata object(s) fetched whole ({self.fetched_bytes / 2**20:.1f} MiB)"
        return text


class IndexRun:
    """Where the readers of one ``build_index`` call put what they read.

    A reader (``readers.READERS``) indexes one source by calling :meth:`take` with rows and rejects (rows are
    buffered and written in row groups of :data:`ROWS_PER_GROUP`) or :meth:`write_table` with a whole table, and
    runs header reading in worker processes with :meth:`submit` or :meth:`ordered_map`. The caller ends it with
    :meth:`finish` (or :meth:`discard` on failure).

    The ``ORIGINAL`` columns (``data.manifest``) are written from the first row that has an original size on: the
    file written until then is moved aside and joined in front of the rest, streamed, by :meth:`finish`; a run
    where no source gives them writes none (and a run whose first rows have them rewrites nothing).

    Args:
        sources: ``(reader name, source)`` of the whole call, in order (a source: an absolute path or a URL).
        max_pixels, pairs: the call's options.
        old: rows of the manifest being updated (``--update``), or None.
        pool: the worker processes; writer: the temporary Parquet file; rejects: the temporary rejects file (text).
        progress: called with the number of files each :meth:`take` accounts for (a progress bar's ``update``).
        summary: counts, updated as rows and rejects come.
    """

    def __init__(
        self,
        *,
        sources: list[tuple[str, str]],
        max_pixels: int,
        pairs: list[PairSpec],
        old: pa.Table | None,
        pool: ProcessPoolExecutor,
        writer: pq.ParquetWriter,
        rejects: IO[str],
        progress: Callable[[int], Any],
        summary: IndexSummary,
    ) -> None:
        self.sources = sources
        self.max_pixels = max_pixels
        self.pairs = pairs
        self.old = old
        self.pool = pool
        self.writer = writer
        self.rejects = rejects
        self.progress = progress
        self.summary = summary
        self.pending: list[Row] = []
        self.written = 0  # rows written to the manifest so far
        #: the rows written before the ORIGINAL columns began (in a file beside the writer's), or None
        self.narrow: Path | None = None
        #: ``(row position in the manifest, facts)`` of each video row: the VIDEO columns added at the end
        self.videos: list[tuple[int, VideoFacts]] = []
        #: header reading submitted ahead of its reader (:meth:`ahead`), by key
        self._ahead: dict[Any, Future] = {}

    @property
    def schema(self) -> pa.Schema:
        """The manifest's schema (``records.index_schema`` of the pairs, with the ORIGINAL columns once begun)."""
        return self.writer.schema

    @property
    def original(self) -> bool:
        """Whether the ``ORIGINAL`` columns are being written (some row had an original size)."""
        return "original_width" in self.writer.schema.names

    def _widen(self) -> None:
        """Write the ``ORIGINAL`` columns from now on: the rows written so far (without them) are moved aside, to be
        joined in front by :meth:`finish`, and a new writer with them continues at the same path."""
        path = Path(self.writer.where)
        self.writer.close()
        if self.written:
            self.narrow = path.with_name(f"{path.name}.narrow")
            os.replace(path, self.narrow)
        self.writer = pq.ParquetWriter(path, index_schema(self.pairs, original=True))

    @cached_property
    def previous(self) -> PreviousRows | None:
        """The rows of the manifest being updated, grouped by folder (None without ``--update``)."""
        return PreviousRows(self.old) if self.old is not None else None

    @cached_property
    def walk(self) -> FolderWalk:
        """The walk over every folder source of the call (each real folder once)."""
        return FolderWalk(
            [s for kind, s in self.sources if kind == "folder"], self.max_pixels, self.previous, self.pairs
        )

    @cached_property
    def _old_by_source(self) -> dict[str, pa.Table]:
        if self.old is None:
            return {}
        wanted = [s for _, s in self.sources]
        old = self.old.filter(pc.is_in(self.old.column("source"), pa.array(wanted, pa.string())))
        parts = {s: old.filter(pc.equal(old.column("source"), s)) for s in dict.fromkeys(wanted)}
        return {s: part for s, part in parts.items() if part.num_rows}

    def old_rows(self, source: str) -> pa.Table | None:
        """The rows the manifest being updated holds with ``source`` as their source (a shard's), or None."""
        return self._old_by_source.get(source)

    def take(self, rows: list[Row], rejects: list[Reject], files: int) -> None:
        """Add ``rows`` and ``rejects``, found in ``files`` files (their count goes to the summary and progress)."""
        if not self.original and any(row.original_width is not None for row in rows):
            self.flush()
            self._widen()
        self.pending.extend(rows)
        for row in rows:
            if row.video is not None:
                self.summary.videos += 1
                self.summary.videos_counted += row.video.counted
                self.summary.video_bytes_read += row.video.bytes_read
        self.summary.rows += len(rows)
        self.summary.files_seen += files
        for reject in rejects:
            self.rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
            self.summary.rejected += 1
            reason = reject["reason"].split(":")[0].split(" (")[0]
            self.summary.reject_reasons[reason] = self.summary.reject_reasons.get(reason, 0) + 1
        if files:
            self.progress(files)
        if len(self.pending) >= ROWS_PER_GROUP:
            self.flush()

    def write_table(self, table: pa.Table, *, reused: bool = False) -> None:
        """Write a whole table of rows (metadata, reused rows of an earlier manifest) after the pending rows;
        identity columns it lacks are null. Counts its rows (as reused ones with ``reused``), not files."""
        self.flush()
        if not self.original and has_original(table):
            self._widen()
        for i, video in enumerate(table_videos(table)):  # (reused rows of a shard of videos; metadata with facts)
            if video is not None:
                self.videos.append((self.written + i, video))
                self.summary.videos += 1
        self.writer.write_table(with_identity(table, self.schema))
        self.written += table.num_rows
        self.summary.rows += table.num_rows
        if reused:
            self.summary.reused += table.num_rows

    def flush(self) -> None:
        """Write the pending rows as one row group."""
        if self.pending:
            self.videos += [
                (self.written + i, row.video) for i, row in enumerate(self.pending) if row.video is not None
            ]
            self.writer.write_table(rows_to_table(self.pending, self.pairs, original=self.original))
            self.written += len(self.pending)
            self.pending.clear()

    def finish(self) -> Path:
        """Write the pending rows, close the file, join the rows written before the ``ORIGINAL`` columns began in
        front (streamed: a row group at a time) and add the ``VIDEO`` columns (:meth:`add_video_columns`); the path of
        the file."""
        self.flush()
        self.writer.close()
        path = Path(self.writer.where)
        if self.narrow is not None:
            joined = path.with_name(f"{path.name}.joined")
            try:
                with pq.ParquetWriter(joined, self.writer.schema) as out:
                    for part in (self.narrow, path):
                        with pq.ParquetFile(part, pre_buffer=False) as rows:  # (pre-buffering keeps what it read)
                            for batch in rows.iter_batches(batch_size=ROWS_PER_GROUP):
                                out.write_table(with_identity(pa.Table.from_batches([batch]), out.schema))
                os.replace(joined, path)
            finally:
                joined.unlink(missing_ok=True)
                self.narrow.unlink(missing_ok=True)
                self.narrow = None
        self.add_video_columns(path)
        return path

    def discard(self) -> None:
        """Close the writer after a failure and remove the rows moved aside (the caller removes the file)."""
        with contextlib.suppress(Exception):  # (a writer interrupted mid-write may refuse to close)
            self.writer.close()
        if self.narrow is not None:
            self.narrow.unlink(missing_ok=True)

    @staticmethod
    def abandon(run: IndexRun | None, writer: pq.ParquetWriter, *files: Path) -> None:
        """After a failed run into ``writer`` (``run``: None where it never started): discard the run (or close the
        writer) and remove its ``files``."""
        if run is not None:
            run.discard()
        else:
            with contextlib.suppress(Exception):
                writer.close()
        for file in files:
            file.unlink(missing_ok=True)

    def add_video_columns(self, path: Path) -> None:
        """Add the manifest's ``VIDEO`` columns to the closed file at ``path`` when any row is a video (an
        image-only manifest stays without them: only a manifest with videos is rewritten)."""
        if not self.videos:
            return
        facts: list[VideoFacts | None] = [None] * self.written
        for position, video in self.videos:
            facts[position] = video
        table = pq.read_table(path)
        for video_field, column in zip(VIDEO, video_columns(facts)):
            table = table.append_column(video_field, column)
        pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)

    def submit(self, fn: Callable, task: tuple) -> Future:
        """``pool.submit`` with SIGINT and SIGTERM held until it returns (see :func:`signals_deferred`)."""
        with signals_deferred():
            return self.pool.submit(fn, task)

    def ahead(self, key: Any, fn: Callable, task: tuple) -> None:
        """Submit ``fn(task)`` now, for the reader that asks :meth:`result` for ``key`` later (a shard read ahead
        while earlier sources are read: results are still taken in source order)."""
        if key not in self._ahead:  # (a source given twice: its second reading submits its own)
            self._ahead[key] = self.submit(fn, task)

    @property
    def pending_ahead(self) -> int:
        """How many tasks submitted by :meth:`ahead` no reader has asked for yet."""
        return len(self._ahead)

    def result(self, key: Any, fn: Callable, task: tuple) -> Any:
        """``fn(task)``, run in the pool: the one submitted ahead for ``key``, else submitted now; waited for."""
        future = self._ahead.pop(key, None)
        return (future if future is not None else self.submit(fn, task)).result()

    def ordered_map(self, fn: Callable, tasks: Iterator[tuple], depth: int = 16) -> Iterator[tuple]:
        """``(fn(task), task)`` for each task, run in the pool with at most ``depth`` in flight, in order."""
        inflight: deque = deque()
        for task in tasks:
            inflight.append((self.submit(fn, task), task))
            if len(inflight) >= depth:
                future, done = inflight.popleft()
                yield future.result(), done
        while inflight:
            future, done = inflight.popleft()
            yield future.result(), done


def finished(summary: IndexSummary, sources: list[str], started: float, rejects_at: str | Path) -> IndexSummary:
    """``summary`` with its time since ``started`` (``time.perf_counter``); an IndexingError naming the sources and
    where the rejects are (``rejects_at``) when no row was written (either engine)."""
    import time

    summary.seconds = time.perf_counter() - started
    if summary.rows == 0:
        left = f"; {summary.manifest} is left as it was" if summary.left_previous else ""
        raise IndexingError(
            f"no usable images or videos in {', '.join(sources)} ({summary.rejected} rejected, see {rejects_at}){left}"
        )
    return summary


def empty_run_rejects(output: str | Path) -> Path:
    """Where a run with no usable row lists its rejects when a manifest is already at ``output`` (a file or a
    folder of parts): beside it, so that the manifest and its own rejects stay as they were."""
    output = Path(output)
    return output.with_name(f"{output.name}.empty-run.rejects.jsonl")
