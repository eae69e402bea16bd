"""The ``ray`` engine writing a manifest in parts straight into object storage: ``-o s3://bucket/prefix/ --engine
ray`` (and ``gs://``), so a cluster of several machines needs no shared file system.

Each unit's Ray task (:func:`run_unit_to_store`) indexes as :func:`.ray.run_unit` does into a temporary folder of its
own node, then uploads its part and rejects under their final names (``PREFIX/part-RUN-NNNNN.parquet`` and
``.rejects.jsonl``: listed by no index yet, so no reader sees them) and its keys (the part's ``key`` column, a small
Parquet) into a scratch prefix ``PREFIX/.RUN.ray/``. A retried task uploads the same names again: each put is atomic,
so a part is whole and never doubled.

Keys are then made unique across the parts with ``dedupe``'s stages, run as Ray tasks that read and write through
the store (every input downloaded to the task's node, every output uploaded): the keys' partition files by hash
(:func:`_scatter`, one task per part, skipped when one partition holds every key), the repeated keys per partition
(:func:`_losers`), and the rewrite of each part that holds a duplicate (:func:`_drop`, the dropped rows' rejects
added to that part's rejects). The run's own rejects (the walks') form a part of no rows, as the local engine's;
then ``_manifest.json`` is written, last. The scratch prefix is deleted at the end; parts of the run that failed are
deleted (best effort).

``--update`` keeps parts whole as the local engine does (``units.PartReuse``: the same ``unit`` records in the
index): a kept part's unit is not run and its objects are neither read nor uploaded again, unless a new part takes
one of its keys (de-duplication then reads its keys, in a task, and may rewrite it as a new part: the earlier index's
objects are never changed). The units that are not kept reuse their files' unchanged rows, read from the earlier
parts of their source only (``units.EarlierRows``, each part downloaded once by the driver).

What the driver transfers: the index, the run's rejects part, and with ``--update`` the earlier parts of the sources
that changed; each task, its own part (once, twice for a
part rewritten) and keys. Memory as ``dedupe``'s, per task.

Imports Ray (through ``ray.py``, lazily), pyarrow, the standard library, ``data.parts`` and ``data.storage``.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...data.pairs import PairSpec, pairs_of
from ...data.parts import (
    ManifestParts,
    PartInfo,
    check_writable,
    file_fingerprint,
    is_parts,
    read_index,
    remove_stale,
    write_index,
    write_part,
)
from ...data.storage import delete, download, get_bytes, list_prefix, put_bytes, upload
from ...errors import IndexingError, ManifestError, StorageError
from ..records import index_schema
from ..run import ROWS_PER_GROUP, IndexSummary, finished
from ..units import Done, EarlierRows, PartReuse

__all__ = ["index_on_ray_to_store", "run_unit_to_store"]

#: The scratch prefix's name inside the output prefix: ``.RUN.ray/``.
SCRATCH = ".{run}.ray/"


def _scratch_parts(scratch: str) -> tuple[str, str]:
    """``(output prefix, run id)`` of a scratch prefix ``PREFIX/.RUN.ray/``."""
    prefix, _, name = scratch.rstrip("/").rpartition("/")
    return prefix + "/", name[1 : -len(".ray")]


def run_unit_to_store(unit, scratch: str, max_pixels: int, pairs: list[PairSpec]) -> tuple[dict, str, IndexSummary]:
    """A Ray task: index ``unit`` on this node (:func:`.ray.run_unit` into a temporary folder), upload its part, rejects
    and keys (see the module's text); returns ``({"info": its PartInfo as a dict, "keys": URL, "key_bytes": N}, its
    rejects URL, what it did)``."""
    from ..dedupe import partition_count
    from .ray import run_unit

    prefix, run = _scratch_parts(scratch)
    name = f"part-{run}-{unit.number:05d}"
    with tempfile.TemporaryDirectory(prefix="dali_arb-unit-") as tmp:
        part, rejects, summary = run_unit(unit, tmp, max_pixels, pairs)
        keys = Path(tmp) / "keys.parquet"
        source = pq.ParquetFile(part, pre_buffer=False)
        with pq.ParquetWriter(keys, pa.schema([source.schema_arrow.field("key")])) as writer:
            for batch in source.iter_batches(batch_size=ROWS_PER_GROUP, columns=["key"]):
                writer.write_batch(batch)
        rejected = sum(1 for _ in open(rejects, "rb"))
        info = PartInfo(path=f"{name}.parquet", rows=source.metadata.num_rows, fingerprint=file_fingerprint(part),
                        rejects=f"{name}.rejects.jsonl", rejected=rejected, size=os.path.getsize(part))  # fmt: skip
        try:
            upload(part, prefix + info.path)
            upload(rejects, prefix + info.rejects)
            upload(keys, f"{scratch}{unit.number}.keys.parquet")
        except StorageError as exc:
            raise IndexingError(f"cannot write part {info.path} of {prefix}: {exc}") from None
        key_bytes = partition_count([keys], partition_bytes=1)  # (the footers' key bytes: 1 byte a "partition")
    found = {"info": info.to_dict(), "keys": f"{scratch}{unit.number}.keys.parquet", "key_bytes": key_bytes}
    return found, prefix + info.rejects, summary


# -- the stages of dedupe, through the store ------------------------------------------------------------------------
def _fetched(urls: list[str], folder: str) -> list[Path]:
    """``urls`` downloaded into ``folder`` (one file each, in order)."""
    paths = []
    for i, url in enumerate(urls):
        path = Path(folder) / f"{i}-{url.rsplit('/', 1)[-1]}"
        download(url, path)
        paths.append(path)
    return paths


def _scatter(args: tuple) -> list[str]:
    """Stage 1 for keys file ``(index, url, scratch, partitions)``: its partition files uploaded to ``scratch``."""
    from ..dedupe import scatter

    index, url, scratch, partitions = args
    with tempfile.TemporaryDirectory(prefix="dali_arb-scatter-") as tmp:
        (local,) = _fetched([url], tmp)
        out = Path(tmp) / "out"
        out.mkdir()
        written = scatter(index, local, out, partitions, ROWS_PER_GROUP)
        for path in written:
            upload(path, scratch + path.name)
    return [scratch + path.name for path in written]


def _losers(args: tuple) -> np.ndarray:
    """Stage 2: ``(partition files' URLs, None)``, or ``(None, [(index, keys URL)...])`` where one partition holds
    every key: the positions of the rows whose key came earlier."""
    from ..dedupe import losers

    partition_files, key_files = args
    with tempfile.TemporaryDirectory(prefix="dali_arb-losers-") as tmp:
        if key_files is not None:
            locals_ = _fetched([u for _, u in key_files], tmp)
            return losers([], from_files=[(i, path) for (i, _), path in zip(key_files, locals_)])
        return losers(_fetched(partition_files, tmp))


def _part_keys(args: tuple) -> int:
    """For a part kept from the manifest being updated, ``(part URL, keys URL)``: its ``key`` column uploaded as a
    keys file (what a task uploads for its new part); the key bytes its footer records."""
    from ..dedupe import partition_count

    url, keys_url = args
    with tempfile.TemporaryDirectory(prefix="dali_arb-keys-") as tmp:
        (local,) = _fetched([url], tmp)
        keys = Path(tmp) / "keys.parquet"
        source = pq.ParquetFile(local, pre_buffer=False)
        with pq.ParquetWriter(keys, pa.schema([source.schema_arrow.field("key")])) as writer:
            for batch in source.iter_batches(batch_size=ROWS_PER_GROUP, columns=["key"]):
                writer.write_batch(batch)
        upload(keys, keys_url)
        return partition_count([keys], partition_bytes=1)


def _drop(args: tuple) -> dict:
    """Stage 3 for part ``(URL, target prefix, PartInfo dict, rows)``: the part without ``rows`` written to the
    target's ``.parquet`` (its own URL for a new part; a new name for a kept one, whose object the earlier index still
    lists), the rejects of the dropped rows added to its rejects (written to the target's ``.rejects.jsonl``); the
    new PartInfo, as a dict."""
    from ..dedupe import drop_rows, write_rejects

    url, target, info, rows = args
    prefix = url.rsplit("/", 1)[0] + "/"
    with tempfile.TemporaryDirectory(prefix="dali_arb-drop-") as tmp:
        (local,) = _fetched([url], tmp)
        out = Path(tmp) / "out.parquet"
        found = drop_rows(local, rows, out, ROWS_PER_GROUP)
        rejects = Path(tmp) / "rejects.jsonl"
        with open(rejects, "wb") as fh:
            if info["rejects"]:
                fh.write(get_bytes(prefix + info["rejects"]))
        with open(rejects, "a", encoding="utf-8") as fh:
            write_rejects(fh, found)
        upload(out, f"{target}.parquet")
        upload(rejects, f"{target}.rejects.jsonl")
        name = target.rsplit("/", 1)[-1]
        return {**info, "path": f"{name}.parquet", "rows": pq.read_metadata(out).num_rows,
                "fingerprint": file_fingerprint(out), "size": os.path.getsize(out),
                "rejects": f"{name}.rejects.jsonl", "rejected": info["rejected"] + len(found)}  # fmt: skip


def _deduplicate(ray, prefix: str, scratch: str, run: str, done: list[Done], summary: IndexSummary) -> list[PartInfo]:
    """Keys unique across the parts (``done``, in source order: parts kept from the manifest being updated, and
    what each task returned), through the store, as ``units.finish_parts`` does locally: a part that loses rows gets
    their rejects added to its own, and one that was kept becomes a new part. The parts' PartInfos after it."""
    from ..dedupe import PARTITION_BYTES, ROW_BITS
    from .ray import ray_map

    infos = [d.kept if d.kept is not None else PartInfo(**{**d.part["info"], "unit": d.record}) for d in done]
    if all(d.kept is not None for d in done):  # (kept parts alone hold unique keys: they did in the earlier manifest)
        return infos
    mapped = ray_map(ray)
    keys = [None if d.kept is not None else d.part["keys"] for d in done]
    key_bytes = [0 if d.kept is not None else d.part["key_bytes"] for d in done]
    kept = [(i, prefix + d.kept.path, f"{scratch}kept-{i}.keys.parquet") for i, d in enumerate(done) if d.kept]
    for (i, _, keys_url), found_bytes in zip(kept, mapped(_part_keys, [job[1:] for job in kept])):
        keys[i], key_bytes[i] = keys_url, found_bytes
    partitions = max(1, math.ceil(sum(key_bytes) / PARTITION_BYTES))
    if partitions == 1:
        positions = mapped(_losers, [(None, list(enumerate(keys)))])
    else:
        scattered = mapped(_scatter, [(i, k, scratch, partitions) for i, k in enumerate(keys)])
        by_partition: dict[int, list[str]] = {}
        for url in (u for urls in scattered for u in urls):
            by_partition.setdefault(int(url.rsplit("/", 1)[-1].split(".")[0].split("-")[1]), []).append(url)
        positions = mapped(_losers, [(urls, None) for _, urls in sorted(by_partition.items())])
    position = np.sort(np.concatenate(positions)) if positions else np.zeros(0, np.int64)
    if not len(position):
        return infos
    file_of, row_of = position >> np.int64(ROW_BITS), position & np.int64((1 << ROW_BITS) - 1)
    numbers = np.unique(file_of).tolist()
    jobs = []
    for i in numbers:
        target = prefix + (f"part-{run}-{i:05d}" if done[i].kept is not None else infos[i].path[: -len(".parquet")])
        jobs.append((prefix + infos[i].path, target, infos[i].to_dict(), row_of[file_of == i]))
    for number, (_, _, _, rows), changed in zip(numbers, jobs, mapped(_drop, jobs)):
        unit = changed.get("unit")
        changed["unit"] = {**unit, "dropped": unit.get("dropped", 0) + len(rows)} if unit else None
        if done[number].kept is not None:  # (rewritten: a new part)
            summary.parts_reused -= 1
            summary.reused -= done[number].kept.rows
            summary.parts_written += 1
        infos[number] = PartInfo(**changed)
    summary.rows -= len(position)
    summary.rejected += len(position)
    summary.reject_reasons["duplicate key"] = summary.reject_reasons.get("duplicate key", 0) + len(position)
    return infos


def _delete_run(prefix: str, run: str, *, parts: bool) -> None:
    """Delete the scratch prefix the run ``run`` left under ``prefix`` and, with ``parts`` (it failed), the parts and
    rejects it uploaded there: best effort."""
    with contextlib.suppress(StorageError):
        for info in list_prefix(prefix):
            name = info.url[len(prefix) :]
            if name.startswith(SCRATCH.format(run=run)) or (parts and name.startswith(f"part-{run}-")):
                with contextlib.suppress(StorageError):
                    delete(info.url)


def index_on_ray_to_store(
    chosen: list, url: str, *, sources: list[str], max_pixels: int, pairs: list[PairSpec], update: bool,
    workers: int | None, progress_bar: Callable, address: str | None,
) -> IndexSummary:  # fmt: skip
    """``build_index`` with the ``ray`` engine into the manifest in parts at the prefix ``url`` (ending in ``/``),
    every part written by its task straight to the store; with ``update``, the parts of the manifest there whose units
    are unchanged are kept whole (not run, not uploaded again); see the module's text."""
    from .ray import _connect, _run_units, import_ray, ray_failures

    ray = import_ray()
    summary = IndexSummary(manifest=url)
    started = time.perf_counter()
    run = f"{os.getpid()}-{secrets.token_hex(4)}"
    scratch = url + SCRATCH.format(run=run)
    try:
        check_writable(url)  # (before the cluster's time is spent)
        previous = read_index(url) if is_parts(url) else None
    except StorageError as exc:
        raise IndexingError(f"cannot write the manifest to {url}: {exc}") from None
    except ManifestError as exc:
        raise IndexingError(str(exc)) from None
    plan = PartReuse(previous if update else None)
    started_here = _connect(ray, address, workers)
    done = False
    cache = tempfile.TemporaryDirectory(prefix="dali_arb-earlier-")
    try:
        earlier = _earlier_rows(previous, pairs, cache.name) if update and previous is not None else None
        walk_rejects: list = []
        found = _run_units(ray, chosen, scratch, summary, walk_rejects, max_pixels=max_pixels, pairs=pairs, old=None,
                           progress_bar=progress_bar, plan=plan, folder=url, earlier=earlier,
                           unit_task=run_unit_to_store)  # fmt: skip
        summary.parts_written += sum(1 for d in found if d.kept is None)
        with ray_failures(ray):
            infos = _deduplicate(ray, url, scratch, run, found, summary)
        if summary.rows == 0 and previous is not None:  # nothing usable: the manifest there now stays as it was
            summary.left_previous = True
            return finished(summary, sources, started, _empty_run_rejects(url, infos, previous, walk_rejects))
        try:
            if walk_rejects:  # (the run's own rejects: a part of no rows, as the local engine writes)
                infos.append(write_part(url, f"part-{run}-rejects", index_schema(pairs).empty_table(), walk_rejects))
            write_index(url, infos, extra={"engine": "ray", "sources": list(sources)})
        except StorageError as exc:
            raise IndexingError(f"the manifest was built but could not be written to {url}: {exc}") from None
        done = True
        remove_stale(previous, infos)
    finally:
        cache.cleanup()
        _delete_run(url, run, parts=not done)
        if started_here:
            ray.shutdown()
    summary.rejects_at = url + "*.rejects.jsonl"
    return finished(summary, sources, started, summary.rejects_at)


def _empty_run_rejects(url: str, infos: list, previous: ManifestParts, walk_rejects: list[dict]) -> str:
    """Where a run with no usable row over the manifest in parts at ``url`` lists its rejects: its new parts' rejects
    and ``walk_rejects`` together in ``URL.empty-run.rejects.jsonl`` beside the prefix (the parts it wrote are
    deleted with the run's scratch; the manifest's own files are not touched)."""
    import json

    listed = {p.rejects for p in previous.parts if p.rejects}
    chunks = [get_bytes(url + info.rejects) for info in infos if info.rejects and info.rejects not in listed]
    chunks += [(json.dumps(reject, ensure_ascii=False) + "\n").encode() for reject in walk_rejects]
    target = f"{url.rstrip('/')}.empty-run.rejects.jsonl"
    with contextlib.suppress(StorageError):
        put_bytes(target, b"".join(chunks))
    return target


def _earlier_rows(previous: ManifestParts, pairs: list[PairSpec], cache: str) -> EarlierRows | None:
    """The rows of the manifest in parts being updated in the store, read as the units not kept need them (each part
    downloaded once into ``cache``), when its parts have the same pairs and record their rows' sources and times."""
    fetched: dict[str, str] = {}

    def local(url: str) -> str:
        if url not in fetched:
            path = os.path.join(cache, f"{len(fetched)}-{url.rsplit('/', 1)[-1]}")
            try:
                download(url, path)
            except StorageError as exc:
                raise IndexingError(f"cannot read the manifest being updated: {exc}") from None
            fetched[url] = path
        return fetched[url]

    with_rows = [p for p in previous.parts if p.rows]
    if not with_rows:
        return None
    schema = pq.read_schema(local(previous.join(with_rows[0].path)))
    same_pairs = pairs_of(schema) == {p.name: p.kind for p in pairs}
    if not (same_pairs and {"mtime_ns", "source"} <= set(schema.names)):
        return None
    return EarlierRows(previous, local_path=local)
