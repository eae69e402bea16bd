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
(:func:`_losers`), and the rewrite of each part that holds a duplicate (:func:`_drop`). The run's own rejects (the
walks' and the duplicates') are added to the first part's rejects file, then ``_manifest.json`` is written, last.
The scratch prefix is deleted at the end; parts of the run that failed are deleted (best effort).

What the driver transfers: the first part's rejects file and the index; each task, its own part (once, twice for a
part rewritten) and keys. Memory as ``dedupe``'s, per task.

Imports Ray (through ``ray.py``, lazily), pyarrow, the standard library, ``data.parts`` and ``data.storage``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

from ...data.manifest import Manifest
from ...data.pairs import PairSpec, pairs_of
from ...data.parts import PartInfo, check_writable, file_fingerprint, is_parts, read_index, remove_stale, write_index
from ...data.storage import delete, download, get_bytes, list_prefix, upload
from ...errors import IndexingError, StorageError
from ..run import ROWS_PER_GROUP, IndexSummary, finished

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


def _drop(args: tuple) -> tuple[dict, list[dict]]:
    """Stage 3 for part ``(URL, PartInfo dict, rows)``: rewritten in the store without ``rows``; its new PartInfo (as a
    dict) and the rejects of the rows dropped."""
    from ..dedupe import drop_rows

    url, info, rows = args
    with tempfile.TemporaryDirectory(prefix="dali_arb-drop-") as tmp:
        (local,) = _fetched([url], tmp)
        out = Path(tmp) / "out.parquet"
        found = drop_rows(local, rows, out, ROWS_PER_GROUP)
        upload(out, url)
        changed = {**info, "rows": pq.read_metadata(out).num_rows, "fingerprint": file_fingerprint(out),
                   "size": os.path.getsize(out)}  # fmt: skip
    return changed, found


def _deduplicate(
    ray, prefix: str, scratch: str, found: list[dict], summary: IndexSummary
) -> tuple[list[PartInfo], list]:
    """Keys unique across the parts (``found``: what each task returned), through the store; the parts' PartInfos
    after it and the duplicates' rejects, in part order."""
    from ..dedupe import PARTITION_BYTES, ROW_BITS
    from .ray import ray_map

    mapped = ray_map(ray)
    infos = [PartInfo(**f["info"]) for f in found]
    partitions = max(1, math.ceil(sum(f["key_bytes"] for f in found) / PARTITION_BYTES))
    if partitions == 1:
        positions = mapped(_losers, [(None, [(i, f["keys"]) for i, f in enumerate(found)])])
    else:
        scattered = mapped(_scatter, [(i, f["keys"], scratch, partitions) for i, f in enumerate(found)])
        by_partition: dict[int, list[str]] = {}
        for url in (u for urls in scattered for u in urls):
            by_partition.setdefault(int(url.rsplit("/", 1)[-1].split(".")[0].split("-")[1]), []).append(url)
        positions = mapped(_losers, [(urls, None) for _, urls in sorted(by_partition.items())])
    position = np.sort(np.concatenate(positions)) if positions else np.zeros(0, np.int64)
    rejects: list = []
    if len(position):
        file_of, row_of = position >> np.int64(ROW_BITS), position & np.int64((1 << ROW_BITS) - 1)
        jobs = [(prefix + infos[i].path, infos[i].to_dict(), row_of[file_of == i]) for i in np.unique(file_of).tolist()]
        for (_, info, _), (changed, dropped) in zip(jobs, mapped(_drop, jobs)):
            infos[[p.path for p in infos].index(info["path"])] = PartInfo(**changed)
            rejects += dropped
        summary.rows -= len(position)
        summary.rejected += len(position)
        summary.reject_reasons["duplicate key"] = summary.reject_reasons.get("duplicate key", 0) + len(position)
    return infos, rejects


def _old_rows(url: str, pairs: list[PairSpec]) -> pa.Table | None:
    """The rows of the manifest in parts at ``url`` (``--update``) when it has the same pairs and records its rows'
    sources and times; else None."""
    if not is_parts(url):
        return None
    old = Manifest.read(url).table
    same_pairs = pairs_of(old.schema) == {p.name: p.kind for p in pairs}
    return old if same_pairs and "mtime_ns" in old.column_names and "source" in old.column_names else None


def _own_rejects(prefix: str, first: PartInfo, rejects: list) -> PartInfo:
    """The run's own ``rejects`` appended to the first part's rejects file in the store; its new PartInfo."""
    if not rejects:
        return first
    text = (
        get_bytes(prefix + first.rejects) + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode()
    )
    with tempfile.TemporaryDirectory(prefix="dali_arb-rejects-") as tmp:
        Path(tmp, "r.jsonl").write_bytes(text)
        upload(Path(tmp, "r.jsonl"), prefix + first.rejects)
    return dataclasses.replace(first, rejected=first.rejected + len(rejects))


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
    every part written by its task straight to the store; see the module's text."""
    from .ray import _connect, _run_units, import_ray, ray_failures

    ray = import_ray()
    summary = IndexSummary(manifest=url)
    started = time.perf_counter()
    run = f"{os.getpid()}-{secrets.token_hex(4)}"
    scratch = url + SCRATCH.format(run=run)
    try:
        check_writable(url)  # (before the cluster's time is spent)
        previous = read_index(url) if is_parts(url) else None
        old = _old_rows(url, pairs) if update else None
    except StorageError as exc:
        raise IndexingError(f"cannot write the manifest to {url}: {exc}") from None
    started_here = _connect(ray, address, workers)
    done = False
    try:
        walk_rejects: list = []
        found = _run_units(ray, chosen, scratch, summary, walk_rejects, max_pixels=max_pixels, pairs=pairs, old=old,
                           progress_bar=progress_bar, unit_task=run_unit_to_store)  # fmt: skip
        with ray_failures(ray):
            infos, duplicates = _deduplicate(
                ray, url, scratch, [d.part for d in found], summary
            )  # (Done.part: the dict)
        try:
            if infos:  # (the run's own rejects go with the first part, as locally)
                infos[0] = _own_rejects(url, infos[0], walk_rejects + duplicates)
            write_index(url, infos, extra={"engine": "ray", "sources": list(sources)})
        except StorageError as exc:
            raise IndexingError(f"the manifest was built but could not be written to {url}: {exc}") from None
        done = True
        remove_stale(previous, infos)
    finally:
        _delete_run(url, run, parts=not done)
        if started_here:
            ray.shutdown()
    summary.rejects_at = url + infos[0].rejects if infos else url
    return finished(summary, sources, started, summary.rejects_at)
