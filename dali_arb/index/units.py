"""Units of indexing work, and the parts of a manifest in parts they become, for both engines.

A **unit** (:class:`Unit`) is one task's sources: a tar shard, a metadata file or a range of its Parquet row groups
(about :data:`PART_ROWS` rows), or a slice of a folder walk or prefix listing (about
:data:`GROUPS_PER_UNIT` groups of ``FILES_PER_TASK`` files). With ``-o DIR/`` each unit writes one part
(:func:`run_unit`), the Ray engine's as a Ray task, the local engine's in its worker processes.

Reusing whole parts (``--update``): each part's index entry records its unit (:func:`unit_record`: kind, source and
``identity``, a digest of every source file's size, mtime and ctime, or object's size, mtime and ETag, and of the
options that shape its rows). On ``--update`` the sources are listed and each unit's identity computed again: one
``stat`` (or HEAD) per file, no Parquet read; a part whose unit has the same identity is kept as it is (same file,
name and fingerprint) and its rows are not read. A folder slice is cut where its files' names say
(:func:`_folder_units`: content-defined, so adding or removing a file changes only the slice that holds it).

De-duplication: keys are made unique across all parts, kept and new, in source order, as a fresh index does (the
first row of a key wins). A kept part never loses rows it should now have: a part that lost rows to
de-duplication is kept only while every part before it in the earlier manifest is kept too (then the rows that took
its keys are still there, and earlier); otherwise its sources are read again. A kept part that loses a row to a new
part before it is rewritten (as a new part). A part's rejects file holds the rejects of its sources and of its rows
de-duplication dropped (so a kept part keeps them); the run's own rejects (the folder walk's, the listings') form
a part of no rows, written each run.

The earlier rows a unit that is not kept reuses per file (``--update`` as before) are read from the earlier
manifest's parts of its source only (:class:`EarlierRows`): keeping every part reads no row.

Not kept (read again, their unchanged rows reused per file): runs with pairs or with captions from ``--captions``, a
caption extension or the file name; metadata with a path column (its images may change under an unchanged file);
metadata in object storage; prefixes in object storage (a prefix's listing gives no identity of its caption
objects).

Imports pyarrow, the standard library, ``data`` (parts, manifest) and the indexer's readers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.manifest import rejects_path
from ..data.pairs import PairSpec
from ..data.parts import ManifestParts, PartInfo, file_fingerprint, remove_stale, write_index, write_part
from ..errors import IndexingError, StorageError
from .folders import FolderWalk, PreviousRows, folder_task
from .readers import empty_folder
from .records import index_schema
from .remote import pair_listings, prefix_tasks, remote_folder_task
from .run import IndexRun, IndexSummary

__all__ = [
    "GROUPS_PER_UNIT",
    "PART_ROWS",
    "Done",
    "PartReuse",
    "Unit",
    "finish_parts",
    "merge_summary",
    "run_unit",
    "units",
]

#: Rows per unit of a Parquet metadata file (whole row groups, at least this many but for the last): what one part
#: of a manifest in parts holds, about 100 MB of Arrow with captions, and one Ray task's share of a big file.
PART_ROWS = 1 << 20
#: Groups of files (of a folder walk or a prefix listing) per unit, on average (a folder slice: about 4096 files).
GROUPS_PER_UNIT = 16
#: Bumped when what a unit's part holds for the same sources changes: parts of another version are not reused.
UNIT_VERSION = 1


@dataclass(frozen=True)
class Unit:
    """One task's work: ``kind`` (a reader's name) on ``source``; for folders and prefixes, ``groups`` (the arguments
    of ``folder_task`` or ``remote_folder_task``); for a shard being updated, ``old`` (its earlier rows); for a range
    of a Parquet metadata file, ``row_groups`` ``[start, stop)``; ``identity``: the digest its part is reused by
    (None: never reused)."""

    number: int
    kind: str
    source: str
    groups: tuple = ()
    old: pa.Table | None = None
    row_groups: tuple[int, int] | None = None
    identity: str | None = None


class InlinePool:
    """What an :class:`IndexRun` submits to inside a Ray task: the task runs in place (Ray spreads the tasks)."""

    def submit(self, fn: Callable, arg: tuple) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(arg))
        except BaseException as exc:  # handed to whoever asks for the result, as a pool would
            future.set_exception(exc)
        return future

    def shutdown(self, *args, **kwargs) -> None:
        pass


# -- the units of a run ---------------------------------------------------------------------------------------------


def units(
    chosen: list,
    *,
    max_pixels: int,
    pairs: list[PairSpec],
    old: pa.Table | None,
    rejects: list,
    counts: IndexSummary,
    identify: bool = False,
    earlier: EarlierRows | None = None,
) -> Iterator[Unit]:
    """The units of ``chosen`` (``(reader, source)``), in source order: one per shard, one per range of a metadata
    file's row groups, one per slice of a folder walk or prefix listing. What the walk and the listings refuse goes
    to ``rejects`` (and its count to ``counts``); IndexingError for a folder with no image files, as locally.

    ``identify``: compute each unit's ``identity`` (a stat or HEAD per source file: what a later ``--update`` reuses
    its part by). ``earlier`` (a manifest in parts being updated, instead of ``old``): gives a prefix's earlier rows,
    read from its parts; a folder's or shard's are added by :meth:`EarlierRows.fill` to the units that are not kept."""
    from .metadata import has_paths, row_group_ranges

    previous = PreviousRows(old) if old is not None else None
    wanted = {s for r, s in chosen if r.name == "shard"}
    shards_old = _rows_by_source(old, wanted) if old is not None and wanted else {}
    walk = FolderWalk([s for r, s in chosen if r.name == "folder"], max_pixels, previous, pairs)
    number = itertools.count()
    identify = identify and not pairs

    def refused(found: list) -> None:
        rejects.extend(found)
        counts.rejected += len(found)
        for reject in found:
            reason = reject["reason"].split(":")[0].split(" (")[0]
            counts.reject_reasons[reason] = counts.reject_reasons.get(reason, 0) + 1

    def digest(*parts) -> str | None:
        return _digest([UNIT_VERSION, max_pixels, *parts]) if identify else None

    heads: Iterator[list] | None = None
    for reader, source in chosen:
        if reader.name == "folder":
            empty, fresh = True, os.path.realpath(source) not in walk.walked
            for groups in _folder_units(walk.tasks(source)):
                empty = False
                files = digest(*_file_identities(groups)) if identify else None
                yield Unit(next(number), "folder", source, tuple(groups), identity=files)
            refused(walk.rejects[:])
            walk.rejects.clear()
            if empty and fresh:
                raise empty_folder(source)
        elif reader.name == "remote_folder":
            unlisted: list = []
            known = earlier.rows(source) if earlier is not None else previous
            try:
                tasks, _ = prefix_tasks(source, max_pixels, known, pair_listings(pairs), unlisted)
            except StorageError as exc:
                raise IndexingError(str(exc)) from None
            refused(unlisted)
            counts.files_seen += len(unlisted)
            for groups in _batched(iter(tasks), GROUPS_PER_UNIT):
                yield Unit(next(number), "remote_folder", source, tuple(groups))
        elif reader.name == "metadata":
            ranges = row_group_ranges(Path(source), PART_ROWS) or [None]
            reusable = identify and not has_paths(Path(source))
            for row_groups in ranges:
                identity = digest(_stat_identity(source), row_groups) if reusable else None
                yield Unit(next(number), "metadata", source, row_groups=row_groups, identity=identity)
        elif reader.name == "shard":
            identity = digest(_stat_identity(source), _stat_identity(os.path.splitext(source)[0] + ".parquet"))
            yield Unit(next(number), "shard", source, old=shards_old.get(source), identity=identity)
        elif reader.name == "remote_shard":
            if identify and heads is None:  # (every shard's HEAD, several at once, when the first is reached)
                heads = _head_identities([s for r, s in chosen if r.name == "remote_shard"])
            yield Unit(next(number), "remote_shard", source, identity=digest(next(heads)) if identify else None)
        else:
            yield Unit(next(number), reader.name, source)


def _folder_units(tasks: Iterator[tuple]) -> Iterator[list[tuple]]:
    """The groups of one folder's walk (``FolderWalk.tasks``) cut into units of about :data:`GROUPS_PER_UNIT` x
    ``FILES_PER_TASK`` files, where the files' names say (content-defined): a unit ends before a file whose path
    hashes to a cut, once it holds a quarter of that, or at twice that; never between files of one stem. The same
    files give the same units, and adding or removing a file changes the unit that holds it (and rarely the next)."""
    from .folders import FILES_PER_TASK  # (read now: a test may set it)

    target = max(1, GROUPS_PER_UNIT * FILES_PER_TASK)
    least, most, spacing = max(1, target // 4), 2 * target, max(1, target - target // 4)
    unit: list[tuple] = []  # (root, rel, caption, known facts or None, max_pixels, pairs) of each file
    last_key = None
    for root, rels, max_pixels, known, captions, pairs in tasks:
        for rel, caption in zip(rels, captions):
            key = os.path.splitext(rel)[0]
            if unit and key != last_key and (len(unit) >= most or (len(unit) >= least and _cut(rel, spacing))):
                yield _regrouped(unit)
                unit = []
            path = os.path.join(root, rel)
            unit.append((root, rel, caption, (known or {}).get(path), max_pixels, pairs))
            last_key = key
    if unit:
        yield _regrouped(unit)


def _cut(rel: str, spacing: int) -> bool:
    """Whether a unit may end before the file ``rel``: one file in ``spacing`` does, by a hash of its path."""
    value = int.from_bytes(hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return value % spacing == 0


def _regrouped(files: list[tuple]) -> list[tuple]:
    """Files of one unit as ``folder_task`` groups of at most ``FILES_PER_TASK`` files of one root (more where files
    of one stem would be split)."""
    from .folders import FILES_PER_TASK

    groups: list[tuple] = []
    start = 0
    while start < len(files):
        end = start + 1
        while (
            end < len(files)
            and files[end][0] == files[start][0]
            and (
                end - start < FILES_PER_TASK
                or os.path.splitext(files[end][1])[0] == os.path.splitext(files[end - 1][1])[0]
            )
        ):
            end += 1
        chunk = files[start:end]
        root, _, _, _, max_pixels, pairs = chunk[0]
        known = {os.path.join(root, f[1]): f[3] for f in chunk if f[3] is not None}
        groups.append((root, [f[1] for f in chunk], max_pixels, known or None, [f[2] for f in chunk], pairs))
        start = end
    return groups


def _file_identities(groups: list[tuple]) -> list:
    """``[path, size, mtime, ctime]`` (or ``[path]`` where it cannot be read) of every file of a folder unit's
    ``groups``: its images and their caption files."""
    found = []
    for root, rels, _, _, captions, _ in groups:
        for rel, caption in zip(rels, captions):
            found.append(_stat_identity(os.path.join(root, rel)))
            if caption:
                found.append(_stat_identity(os.path.join(root, caption)))
    return found


def _stat_identity(path: str) -> list:
    try:
        stat = os.stat(path)
    except OSError:
        return [path]
    return [path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


#: HEAD requests in flight at once while the identities of shards in object storage are read (``--update``'s).
HEADS_IN_FLIGHT = 16


def _head_identities(urls: list[str]) -> Iterator[list]:
    """:func:`_head_identity` of each of ``urls``, in order, read by :data:`HEADS_IN_FLIGHT` threads at once (a
    HEAD is a round trip: one after another, 10,000 shards would take minutes), at most twice that many ahead."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(HEADS_IN_FLIGHT, thread_name_prefix="dali_arb-head") as threads:
        pending: list[Future] = []
        for url in urls:
            pending.append(threads.submit(_head_identity, url))
            if len(pending) >= 2 * HEADS_IN_FLIGHT:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _head_identity(url: str) -> list:
    from ..data.storage import head

    try:
        info = head(url)
    except StorageError as exc:
        raise IndexingError(str(exc)) from None
    return [url, info.size, info.mtime_ns, info.etag]


def _digest(items: list) -> str:
    text = json.dumps(items, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def _rows_by_source(old: pa.Table, wanted: set[str]) -> dict[str, pa.Table]:
    """``{source: its rows}`` of the manifest being updated, for the ``wanted`` sources (shards): one pass over the
    source column (grouped by code), not one filter of the whole table per shard."""
    import numpy as np
    import pyarrow.compute as pc

    codes_array = pc.dictionary_encode(old.column("source").combine_chunks())
    names = codes_array.dictionary.to_pylist()
    codes = pc.fill_null(codes_array.indices, -1).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return {
        name: old.take(pa.array(order[bounds[i] : bounds[i + 1]]))
        for i, name in enumerate(names)
        if name in wanted and bounds[i + 1] > bounds[i]
    }


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(itertools.islice(items, size)):
        yield batch


class EarlierRows:
    """The rows of the manifest in parts being updated (``previous``), read from its parts one source at a time
    (the parts its index records for that source, and those it records no unit for), only for the units that are
    not kept: an update that keeps every part reads no row, and one that changes a folder reads that folder's rows
    (the columns ``--update`` compares), not the whole manifest. A shard whose part lost rows to de-duplication has
    its earlier rows not reused (they miss those rows)."""

    COLUMNS = ("source", "length", "mtime_ns", "width", "height", "ctime_ns", "etag")

    def __init__(self, previous: ManifestParts, *, local_path: Callable[[str], str] = str) -> None:
        self.local_path = local_path  # (a part's path or URL -> a local file: a part in object storage downloaded)
        self.by_source: dict[str, list[str]] = {}
        self.unattributed: list[str] = []
        self.dropped_sources = {p.unit.get("source") for p in previous.parts if p.unit and p.unit.get("dropped")}
        for part in previous.parts:
            if part.rows:
                source = (part.unit or {}).get("source")
                (self.by_source.setdefault(source, []) if source else self.unattributed).append(
                    previous.join(part.path)
                )
        self._last: tuple[str | None, PreviousRows | None] = (None, None)

    def table(self, source: str, columns: tuple | None = None) -> pa.Table | None:
        """The earlier rows of the parts of ``source`` (and of parts without a unit), ``columns`` of them, or None."""
        tables = []
        for path in [*self.by_source.get(source, ()), *self.unattributed]:
            path = self.local_path(path)
            names = pq.read_schema(path).names
            tables.append(pq.read_table(path, columns=[c for c in columns if c in names] if columns else None))
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="permissive")

    def rows(self, source: str) -> PreviousRows | None:
        """The earlier rows of ``source`` grouped by folder (the last source asked for is kept)."""
        if self._last[0] != source:
            table = self.table(source, self.COLUMNS)
            self._last = (source, PreviousRows(table) if table is not None and table.num_rows else None)
        return self._last[1]

    def fill(self, unit: Unit) -> Unit:
        """``unit`` with its files' earlier rows (a folder slice: each group's ``known``; a shard: ``old``)."""
        if unit.kind == "folder":
            previous = self.rows(unit.source)
            if previous is None:
                return unit
            folders: dict[str, dict] = {}
            groups = []
            for root, rels, max_pixels, _, captions, pairs in unit.groups:
                known = {}
                for rel in rels:
                    path = os.path.join(root, rel)
                    directory = os.path.dirname(os.path.normpath(path))
                    if directory not in folders:
                        folders[directory] = previous.folder(directory)
                    if path in folders[directory]:
                        known[path] = folders[directory][path]
                groups.append((root, rels, max_pixels, known or None, captions, pairs))
            return dataclasses.replace(unit, groups=tuple(groups))
        if unit.kind == "shard" and unit.source not in self.dropped_sources:
            table = self.table(unit.source)
            if table is not None and "source" in table.column_names:
                import pyarrow.compute as pc

                table = table.filter(pc.equal(table.column("source"), unit.source))
                return dataclasses.replace(unit, old=table if table.num_rows else None)
        return unit


# -- one unit -------------------------------------------------------------------------------------------------------


def run_unit(
    unit: Unit, folder: str, max_pixels: int, pairs: list[PairSpec], *, pool=None, progress: Callable = lambda n: None
) -> tuple[str, str, IndexSummary]:
    """Index one unit into ``folder/part-NNNNNN.parquet`` and its ``.rejects.jsonl``; returns their paths and what
    it did. Written under private names and renamed into place: a retried unit replaces its part whole. ``pool``:
    where header reading runs (the local engine's worker processes; None: in place, as in a Ray task)."""
    part = Path(folder) / f"part-{unit.number:06d}.parquet"
    rejects = Path(rejects_path(part))
    private = f".{os.getpid()}-{secrets.token_hex(4)}.partial"
    part_tmp, rejects_tmp = part.with_name(part.name + private), rejects.with_name(rejects.name + private)
    summary = IndexSummary(manifest=part)
    writer = pq.ParquetWriter(part_tmp, index_schema(pairs))
    run: IndexRun | None = None
    try:
        with open(rejects_tmp, "w", encoding="utf-8") as fh:
            run = IndexRun(sources=[(unit.kind, unit.source)], max_pixels=max_pixels, pairs=pairs, old=unit.old,
                           pool=pool or InlinePool(), writer=writer, rejects=fh, progress=progress,
                           summary=summary)  # fmt: skip
            _read(run, unit)
            run.finish()  # (ORIGINAL and VIDEO columns in a part whose rows have them only)
    except BaseException:
        IndexRun.abandon(run, writer, part_tmp, rejects_tmp)
        raise
    os.replace(part_tmp, part)
    os.replace(rejects_tmp, rejects)
    return str(part), str(rejects), summary


def _read(run: IndexRun, unit: Unit) -> None:
    """Run ``unit``'s reader into ``run`` (folders and prefixes: its groups of files; a metadata range: its row
    groups; others: the whole source)."""
    from .metadata import metadata_chunks
    from .readers import READERS

    summary = run.summary
    if unit.kind == "folder":
        for (rows, rejects, reused), task in run.ordered_map(folder_task, iter(unit.groups)):
            summary.reused += reused
            run.take(rows, rejects, len(task[1]))
    elif unit.kind == "remote_folder":
        try:
            for (rows, rejects, io), task in run.ordered_map(remote_folder_task, iter(unit.groups)):
                summary.reused += io["reused"]
                summary.remote_requests += io["requests"]
                summary.remote_bytes += io["bytes_read"]
                summary.remote_images += len(task[0])
                run.take(rows, rejects, len(task[0]))
        except StorageError as exc:
            raise IndexingError(str(exc)) from None
    elif unit.kind == "metadata" and unit.row_groups is not None:
        for table, rejects in metadata_chunks(Path(unit.source), row_groups=unit.row_groups):
            run.write_table(table)
            summary.no_source += table.column("source").null_count
            run.take([], rejects, table.num_rows + len(rejects))
    else:
        READERS[unit.kind].read(run, unit.source)


def merge_summary(total: IndexSummary, part: IndexSummary) -> None:
    """Add the counts of ``part`` (one unit's summary) to ``total``."""
    for spec in dataclasses.fields(IndexSummary):
        value = getattr(part, spec.name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(total, spec.name, getattr(total, spec.name) + value)
    for reason, n in part.reject_reasons.items():
        total.reject_reasons[reason] = total.reject_reasons.get(reason, 0) + n


# -- reusing the parts of the manifest being updated ----------------------------------------------------------------


@dataclass
class Done:
    """A unit's outcome: a part ``kept`` from the manifest being updated, or a ``part`` (and its ``rejects``) just
    written into the scratch folder; ``record``: its :func:`unit_record`."""

    record: dict | None
    kept: PartInfo | None = None
    part: Path | None = None
    rejects: Path | None = None


def unit_record(unit: Unit, summary: IndexSummary | None = None) -> dict | None:
    """What a part's index entry records of its unit (None for a unit that is never reused)."""
    if unit.identity is None:
        return None
    record = {"kind": unit.kind, "source": unit.source, "identity": unit.identity, "dropped": 0}
    if summary is not None:
        record.update(videos=summary.videos, no_source=summary.no_source)
    return record


class PartReuse:
    """Which parts of the manifest being updated (``previous``; None: nothing is reused) a run keeps whole.

    :meth:`find` is asked for each unit in order; a part is kept when its recorded unit has the unit's kind, source
    and identity, and, if de-duplication took rows from it, every earlier part of the earlier manifest (with rows)
    has been kept before it."""

    def __init__(self, previous: ManifestParts | None) -> None:
        self.previous = previous
        self.by_unit: dict[tuple, tuple[int, PartInfo]] = {}
        self.with_rows = [bool(part.rows) for part in (previous.parts if previous else ())]
        self.matched: set[int] = set()  # positions in the earlier index of the parts kept so far
        for position, part in enumerate(previous.parts if previous else ()):
            record = part.unit or {}
            if record.get("identity"):
                self.by_unit[(record.get("kind"), record.get("source"), record["identity"])] = (position, part)

    def find(self, unit: Unit) -> PartInfo | None:
        """The earlier part to keep for ``unit``, or None (its sources are read)."""
        if unit.identity is None:
            return None
        hit = self.by_unit.get((unit.kind, unit.source, unit.identity))
        if hit is None:
            return None
        position, part = hit
        if position in self.matched:  # (one source given twice: its second unit is indexed)
            return None
        if (part.unit or {}).get("dropped") and not all(
            i in self.matched for i in range(position) if self.with_rows[i]
        ):
            return None
        self.matched.add(position)
        return part


#: How de-duplication's reason (``dedupe.REASON``) ends.
DUPLICATE_TAIL = "(kept the first source's)"


def reused_summary(summary: IndexSummary, part: PartInfo, folder: Path | str) -> None:
    """Count a kept ``part`` (its rows, rejects and their reasons, videos) in ``summary``; ``folder``: the manifest's
    local folder or object-storage prefix (ending in ``/``)."""
    record = part.unit or {}
    summary.rows += part.rows
    summary.reused += part.rows
    summary.rejected += part.rejected
    summary.videos += record.get("videos", 0)
    summary.no_source += record.get("no_source", 0)
    summary.parts_reused += 1
    if part.rejects and part.rejected:
        if isinstance(folder, str):  # (an object-storage prefix)
            from ..data.storage import get_bytes

            lines = get_bytes(folder + part.rejects).decode("utf-8").splitlines()
        else:
            lines = (folder / part.rejects).read_text(encoding="utf-8").splitlines()
        for line in lines:
            if line.strip():
                text = json.loads(line)["reason"]
                # (counted as the run counts them: de-duplication's under one name, the others by their first words)
                reason = "duplicate key" if text.endswith(DUPLICATE_TAIL) else text.split(":")[0].split(" (")[0]
                summary.reject_reasons[reason] = summary.reject_reasons.get(reason, 0) + 1


# -- de-duplication and installing the parts ------------------------------------------------------------------------


def finish_parts(
    done: list[Done],
    *,
    scratch: Path,
    folder: Path,
    run_rejects: list[dict],
    summary: IndexSummary,
    unique: str,
    sources: list[str],
    engine: str,
    pairs: list[PairSpec],
    previous: ManifestParts | None,
    map_fn: Callable = map,
) -> str:
    """Make keys unique across the units' parts (``done``, in source order: kept and new), then install them in
    ``folder`` as a manifest in parts: kept parts stay as they are, new ones are moved in as ``part-UNIQUE-NNNNN``,
    the run's own rejects (``run_rejects``: the walk's and the listings') form a part of no rows, the index is
    written, and the earlier manifest's parts no longer listed are removed. Returns where the rejects are listed."""
    if any(d.kept is None for d in done):  # (kept parts alone hold unique keys: they did in the earlier manifest)
        _deduplicate(done, scratch, folder, summary, map_fn)
    if summary.rows == 0 and previous is not None:  # nothing usable: the manifest there now stays as it was
        return _left_previous(done, run_rejects, folder, summary)
    infos: list[PartInfo] = []
    for number, item in enumerate(done):
        if item.kept is not None:
            infos.append(item.kept)
            continue
        name = f"part-{unique}-{number:05d}"
        path = folder / f"{name}.parquet"
        rejected = sum(1 for _ in open(item.rejects, "rb")) if item.rejects else 0
        os.replace(item.part, path)
        rejects_name = None
        if item.rejects is not None:
            rejects_name = f"{name}.rejects.jsonl"
            os.replace(item.rejects, folder / rejects_name)
        infos.append(PartInfo(path=path.name, rows=pq.read_metadata(path).num_rows, fingerprint=file_fingerprint(path),
                              rejects=rejects_name, rejected=rejected, size=path.stat().st_size,
                              unit=item.record))  # fmt: skip
        summary.parts_written += 1
    if run_rejects:
        infos.append(write_part(folder, f"part-{unique}-rejects", index_schema(pairs).empty_table(), run_rejects))
    write_index(folder, infos, extra={"engine": engine, "sources": list(sources)})
    remove_stale(previous, infos)
    return str(folder / "*.rejects.jsonl")


def _deduplicate(done: list[Done], scratch: Path, folder: Path, summary: IndexSummary, map_fn: Callable) -> None:
    """Keys unique across the parts of ``done`` (``dedupe``; kept parts through a link in ``scratch``, so the file
    the earlier index lists is never changed): a part that loses rows is written anew, the rejects of its dropped
    rows added to its own rejects (so they stay with it when it is kept later); a kept part that loses rows becomes a
    new part (its earlier rejects copied)."""
    from .dedupe import PARTITION_BYTES, deduplicate, write_rejects
    from .run import ROWS_PER_GROUP

    files = []
    for number, item in enumerate(done):
        if item.kept is None:
            files.append(Path(item.part))
            continue
        link = scratch / f"kept-{number:06d}.parquet"
        try:
            os.link(folder / item.kept.path, link)
        except OSError:
            shutil.copyfile(folder / item.kept.path, link)
        files.append(link)
    found_rejects: list[list[dict]] = []  # (deduplicate reports each file's rejects in file order: per_file's)
    found = deduplicate(files, scratch / "dedupe", rejects=found_rejects.append, map_fn=map_fn,
                        partition_bytes=PARTITION_BYTES, chunk_rows=ROWS_PER_GROUP)  # fmt: skip
    summary.rows -= found.dropped
    summary.rejected += found.dropped
    if found.dropped:
        summary.reject_reasons["duplicate key"] = summary.reject_reasons.get("duplicate key", 0) + found.dropped
    for (index, dropped), dropped_rejects in zip(found.per_file.items(), found_rejects):
        item = done[index]
        if item.kept is not None:  # rewritten: a new part, with the earlier part's own rejects
            kept = item.kept
            item.part, item.record, item.kept = files[index], dict(kept.unit) if kept.unit else None, None
            item.rejects = scratch / f"kept-{index:06d}.rejects.jsonl"
            if kept.rejects:
                shutil.copyfile(folder / kept.rejects, item.rejects)
            summary.parts_reused -= 1
            summary.reused -= kept.rows
        if item.rejects is None:
            item.rejects = scratch / f"dropped-{index:06d}.rejects.jsonl"
        with open(item.rejects, "a", encoding="utf-8") as fh:
            write_rejects(fh, dropped_rejects)
        if item.record is not None:
            item.record = {**item.record, "dropped": item.record.get("dropped", 0) + dropped}
    for link in scratch.glob("kept-*.parquet"):
        if not any(d.part == link for d in done):
            link.unlink(missing_ok=True)


def _left_previous(done: list[Done], run_rejects: list[dict], folder: Path, summary: IndexSummary) -> str:
    """A run with no usable row over the manifest in parts at ``folder``: nothing installed, every reject of the
    run listed in ``run.empty_run_rejects(folder)`` (beside the folder, which holds only the manifest's files).
    Returns that path."""
    from .run import empty_run_rejects

    target = empty_run_rejects(folder)
    with open(target, "w", encoding="utf-8") as out:
        for item in done:
            if item.kept is None and item.rejects is not None:
                with open(item.rejects, encoding="utf-8") as fh:
                    shutil.copyfileobj(fh, out)
        for reject in run_rejects:
            out.write(json.dumps(reject, ensure_ascii=False) + "\n")
    summary.left_previous = True
    return str(target)
