"""The ``ray`` engine: ``build_index(..., engine="ray")`` and ``dali-arb index --engine ray [--address ADDR]``.

The driver (this process) expands the sources as the local engine does and splits them into units of work
(:class:`Unit`): a tar shard, a metadata file, or :data:`GROUPS_PER_UNIT` groups of files of a folder walk or of a
prefix listing (``FILES_PER_TASK`` files each: 4096 files a unit). Each unit runs as a Ray task that reads headers
with the same readers as the local engine and writes one Parquet part and its rejects into a scratch folder beside
the output (so the output's folder must be one every node sees: a shared file system). Keys are then de-duplicated
across the parts with Ray tasks per hash partition (``index/dedupe.py``), and the parts are streamed, in source
order, into the manifest. The rows equal the local engine's for the same sources; the order too, as parts are kept
in source order.

A task that dies with its worker or node is run again (Ray's ``max_retries``): a part is written under a private
name and renamed into place, so a retried unit replaces it and nothing is doubled. Memory on the driver: the parts'
list and the units in flight (:data:`IN_FLIGHT_PER_CPU` per cluster CPU), not the rows.

Imports Ray (lazily, when the engine runs), pyarrow, tqdm and the indexer's readers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ...data.manifest import ORIGINAL, VIDEO, rejects_path
from ...data.pairs import PairSpec
from ...errors import DaliArbError, IndexingError, StorageError
from ..folders import FolderWalk, PreviousRows, folder_task
from ..readers import empty_folder
from ..records import index_schema
from ..remote import pair_listings, prefix_tasks, remote_folder_task
from ..run import ROWS_PER_GROUP, IndexRun, IndexSummary, finished

__all__ = ["GROUPS_PER_UNIT", "Unit", "index_on_ray", "run_unit"]

#: Groups of files (of a folder walk or a prefix listing) per Ray task.
GROUPS_PER_UNIT = 16
#: Units submitted ahead per CPU of the cluster (the rest wait on the driver).
IN_FLIGHT_PER_CPU = 2
#: How often a task that failed with its worker or node is run again.
TASK_RETRIES = 3
INSTALL = "pip install 'dali-arb[ray]'"


@dataclass(frozen=True)
class Unit:
    """One Ray task's work: ``kind`` (a reader's name) on ``source``; for folders and prefixes, ``groups`` (the
    arguments of ``folder_task`` or ``remote_folder_task``); for a shard being updated, ``old`` (its earlier rows)."""

    number: int
    kind: str
    source: str
    groups: tuple = ()
    old: pa.Table | None = None


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


def run_unit(unit: Unit, folder: str, max_pixels: int, pairs: list[PairSpec]) -> tuple[str, str, IndexSummary]:
    """Index one unit into ``folder/part-NNNNNN.parquet`` and its ``.rejects.jsonl``; returns their paths and what
    it did. Written under private names and renamed into place: a retried unit replaces its part whole."""
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
                           pool=InlinePool(), writer=writer, rejects=fh, progress=lambda n: None,
                           summary=summary)  # fmt: skip
            _read(run, unit)
            run.finish()  # (ORIGINAL and VIDEO columns in a part whose rows have them only)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        if run is not None:
            run.discard()
        part_tmp.unlink(missing_ok=True)
        rejects_tmp.unlink(missing_ok=True)
        raise
    os.replace(part_tmp, part)
    os.replace(rejects_tmp, rejects)
    return str(part), str(rejects), summary


def _read(run: IndexRun, unit: Unit) -> None:
    """Run ``unit``'s reader into ``run`` (folders and prefixes: its groups of files; others: the whole source)."""
    from ..readers import READERS

    summary = run.summary
    if unit.kind == "folder":
        for task in unit.groups:
            rows, rejects, reused = folder_task(task)
            summary.reused += reused
            run.take(rows, rejects, len(task[1]))
    elif unit.kind == "remote_folder":
        try:
            for task in unit.groups:
                rows, rejects, io = remote_folder_task(task)
                summary.reused += io["reused"]
                summary.remote_requests += io["requests"]
                summary.remote_bytes += io["bytes_read"]
                summary.remote_images += len(task[0])
                run.take(rows, rejects, len(task[0]))
        except StorageError as exc:
            raise IndexingError(str(exc)) from None
    else:
        READERS[unit.kind].read(run, unit.source)


def units(
    chosen: list, *, max_pixels: int, pairs: list[PairSpec], old: pa.Table | None, rejects: list, counts: IndexSummary
) -> Iterator[Unit]:
    """The units of ``chosen`` (``(reader, source)``), in source order: one per shard or metadata file, one per
    :data:`GROUPS_PER_UNIT` groups of a folder walk or prefix listing. What the walk and the listings refuse goes to
    ``rejects`` (and its count to ``counts``); IndexingError for a folder with no image files, as locally."""
    previous = PreviousRows(old) if old is not None else None
    shards_old = _rows_by_source(old, {s for r, s in chosen if r.name == "shard"}) if old is not None else {}
    walk = FolderWalk([s for r, s in chosen if r.name == "folder"], max_pixels, previous, pairs)
    number = itertools.count()

    def refused(found: list) -> None:
        rejects.extend(found)
        counts.rejected += len(found)
        for reject in found:
            reason = reject["reason"].split(":")[0].split(" (")[0]
            counts.reject_reasons[reason] = counts.reject_reasons.get(reason, 0) + 1

    for reader, source in chosen:
        if reader.name == "folder":
            empty, fresh = True, os.path.realpath(source) not in walk.walked
            for groups in _batched(walk.tasks(source), GROUPS_PER_UNIT):
                empty = False
                yield Unit(next(number), "folder", source, tuple(groups))
            refused(walk.rejects[:])
            walk.rejects.clear()
            if empty and fresh:
                raise empty_folder(source)
        elif reader.name == "remote_folder":
            unlisted: list = []
            try:
                tasks, _ = prefix_tasks(source, max_pixels, previous, pair_listings(pairs), unlisted)
            except StorageError as exc:
                raise IndexingError(str(exc)) from None
            refused(unlisted)
            counts.files_seen += len(unlisted)
            for groups in _batched(iter(tasks), GROUPS_PER_UNIT):
                yield Unit(next(number), "remote_folder", source, tuple(groups))
        else:
            yield Unit(next(number), reader.name, source, old=shards_old.get(source))


def _rows_by_source(old: pa.Table, wanted: set[str]) -> dict[str, pa.Table]:
    """``{source: its rows}`` of the manifest being updated, for the ``wanted`` sources (shards): one pass over the
    source column (grouped by code), not one filter of the whole table per shard."""
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


def import_ray():
    """The ``ray`` module; an IndexingError saying what to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise IndexingError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def _connect(ray, address: str | None, workers: int | None) -> bool:
    """Join the cluster at ``address`` or start one here (``workers`` CPUs); whether this call started it (and so
    stops it). A session already open in this process is used as it is."""
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address:
            # the workers import this very package: shipped with the job, so every node runs the driver's version
            package = str(Path(__file__).resolve().parents[2])
            ray.init(address=address, runtime_env={"py_modules": [package]}, **options)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a Ray cluster on this machine"
        raise IndexingError(
            f"cannot start or reach {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "start one with `ray start --head` and give its address with --address"
        ) from None
    return True


#: Seconds to wait for a cluster's address to answer before saying it does not (Ray itself retries for minutes).
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """An IndexingError when ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``; ``auto`` is left to Ray) does not
    accept a connection within :data:`CONNECT_TIMEOUT_S`: Ray would retry, printing, for minutes."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise IndexingError(
            f"--address {address}: nothing answers there ({exc.strerror or exc}); start the cluster's head with "
            "`ray start --head` and give its HOST:PORT (6379 by default), or leave --address out to start Ray here"
        ) from None


def ray_failures(ray):
    """A context where a failed Ray task becomes the package's error it raised (an IndexingError...), and a task
    lost for good (its worker or node died more than :data:`TASK_RETRIES` times) an IndexingError."""

    @contextlib.contextmanager
    def translated() -> Iterator[None]:
        try:
            yield
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DaliArbError):
                raise type(cause)(str(cause)) from None
            raise IndexingError(f"a Ray indexing task failed: {_first_line(cause or exc)}") from None
        except ray.exceptions.RayError as exc:
            raise IndexingError(
                f"a Ray indexing task was lost ({_first_line(exc)}) after {TASK_RETRIES} retries; check the cluster's "
                "nodes and index again"
            ) from None

    return translated()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def ray_map(ray) -> Callable[[Callable, list], list]:
    """``map`` whose calls run as Ray tasks (one CPU each), results in order: what ``dedupe`` runs its stages with."""
    call = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_call)

    def mapped(fn: Callable, items: list) -> list:
        with ray_failures(ray):
            return ray.get([call.remote(fn, item) for item in items])

    return mapped


def _call(fn: Callable, item):
    return fn(item)


def _merge(total: IndexSummary, part: IndexSummary) -> None:
    for spec in dataclasses.fields(IndexSummary):
        value = getattr(part, spec.name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(total, spec.name, getattr(total, spec.name) + value)
    for reason, n in part.reject_reasons.items():
        total.reject_reasons[reason] = total.reject_reasons.get(reason, 0) + n


def index_on_ray(
    chosen: list,
    output: Path,
    *,
    sources: list[str],
    max_pixels: int,
    pairs: list[PairSpec],
    old: pa.Table | None,
    workers: int | None,
    progress_bar: Callable,
    address: str | None,
    in_parts: bool = False,
) -> IndexSummary:
    """``build_index`` with the ``ray`` engine, from the sources the driver checked (``chosen``: ``(reader,
    source)``) into the local manifest file ``output`` or, ``in_parts``, the existing folder ``output`` as a manifest
    in parts (each task's part one part of it: :func:`_install_parts`), showing progress on ``progress_bar()`` (a
    tqdm bar); see the module's text."""
    ray = import_ray()
    summary = IndexSummary(manifest=output)
    started = time.perf_counter()
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"
    scratch = (output / f".{unique}.ray") if in_parts else output.with_name(f".{output.name}.{unique}.ray")
    scratch.mkdir()
    tmp = output.with_name(f".{output.name}.{unique}.partial")
    rejects_tmp = output.with_name(f".{rejects_path(output).name}.{unique}.partial")
    started_here = _connect(ray, address, workers)
    try:
        walk_rejects: list = []
        parts = _run_units(ray, chosen, scratch, summary, walk_rejects, max_pixels=max_pixels, pairs=pairs, old=old,
                           progress_bar=progress_bar)  # fmt: skip
        with open(rejects_tmp, "w", encoding="utf-8") as fh:
            for reject in walk_rejects:
                fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
            for _, rejects in [] if in_parts else parts:  # (in parts, each part keeps its own)
                with open(rejects, encoding="utf-8") as part_rejects:
                    shutil.copyfileobj(part_rejects, fh)
            _deduplicate(ray, [Path(p) for p, _ in parts], scratch, fh, summary)
        if in_parts:
            _install_parts([Path(p) for p, _ in parts], rejects_tmp, output, unique, sources)
        else:
            _concatenate([Path(p) for p, _ in parts], tmp, _manifest_schema([Path(p) for p, _ in parts], pairs))
    except BaseException:
        tmp.unlink(missing_ok=True)
        rejects_tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if started_here:
            ray.shutdown()
    if not in_parts:
        os.replace(tmp, output)
        os.replace(rejects_tmp, rejects_path(output))
    return finished(summary, sources, started, output if in_parts else rejects_path(output))


def _run_units(
    ray, chosen: list, scratch: Path, summary: IndexSummary, walk_rejects: list, *, max_pixels: int,
    pairs: list[PairSpec], old: pa.Table | None, progress_bar: Callable, unit_task: Callable = run_unit,
) -> list[tuple[str, str]]:  # fmt: skip
    """Submit every unit as a Ray task (at most :data:`IN_FLIGHT_PER_CPU` per cluster CPU in flight), merge their
    summaries into ``summary`` and show progress; the ``(part, rejects)`` paths in unit order. ``unit_task``: what
    a task runs, :func:`run_unit` or one with its signature and results (``ray_store.run_unit_to_store``)."""
    task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(unit_task)
    limit = max(2, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    found: dict[int, tuple[str, str]] = {}
    inflight: dict = {}
    submitted = 0
    pairs_ref = ray.put(list(pairs))

    def collect(refs: list) -> None:
        for ref in refs:
            number = inflight.pop(ref)
            part, rejects, done = ray.get(ref)
            found[number] = (part, rejects)
            _merge(summary, done)
            bar.update(done.files_seen)
            bar.set_postfix(parts=f"{len(found)}/{submitted}", rejected=summary.rejected, refresh=False)

    try:
        with progress_bar() as bar, ray_failures(ray):
            bar.set_description("indexing on Ray")
            for unit in units(chosen, max_pixels=max_pixels, pairs=pairs, old=old, rejects=walk_rejects,
                              counts=summary):  # fmt: skip
                inflight[task.remote(unit, str(scratch), max_pixels, pairs_ref)] = unit.number
                submitted += 1
                if len(inflight) >= limit:
                    ready, _ = ray.wait(list(inflight), num_returns=1)
                    collect(ready)
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                collect(ready)
    except BaseException:  # an error, Ctrl-C or SIGTERM: the tasks still queued or running are cancelled
        for ref in inflight:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    return [found[n] for n in sorted(found)]


def _deduplicate(ray, parts: list[Path], scratch: Path, rejects_fh, summary: IndexSummary) -> None:
    """Keys unique across the parts (``dedupe``, its stages as Ray tasks), the dropped rows' rejects appended."""
    from ..dedupe import PARTITION_BYTES, deduplicate, write_rejects  # (read now: a test may set the size)

    found = deduplicate(parts, scratch / "dedupe", rejects=lambda r: write_rejects(rejects_fh, r),
                        map_fn=ray_map(ray), partition_bytes=PARTITION_BYTES, chunk_rows=ROWS_PER_GROUP)  # fmt: skip
    summary.rows -= found.dropped
    summary.rejected += found.dropped
    if found.dropped:
        summary.reject_reasons["duplicate key"] = summary.reject_reasons.get("duplicate key", 0) + found.dropped


def _manifest_schema(parts: list[Path], pairs: list[PairSpec]) -> pa.Schema:
    """The joined manifest's schema, as the local engine's: the indexer's, the ``ORIGINAL`` columns when any part
    has original sizes, then the ``VIDEO`` columns when any part has videos."""
    names = {name for part in parts for name in pq.read_schema(part).names}
    schema = index_schema(pairs, original=ORIGINAL.names[0] in names)
    if VIDEO.names[0] in names:
        for field in VIDEO:
            schema = schema.append(field)
    return schema


def _in_schema(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with ``schema``'s columns: those it lacks (a part without videos) null."""
    columns = [
        batch.column(field.name) if field.name in batch.schema.names else pa.nulls(batch.num_rows, field.type)
        for field in schema
    ]
    return pa.record_batch(columns, schema=schema)


def _concatenate(parts: list[Path], out: Path, schema: pa.Schema) -> None:
    """The parts, in order, streamed into one Parquet file (row groups of ``ROWS_PER_GROUP``)."""
    pending: list[pa.RecordBatch] = []
    with pq.ParquetWriter(out, schema) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=ROWS_PER_GROUP):
                pending.append(_in_schema(batch, schema))
                if sum(b.num_rows for b in pending) >= ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROWS_PER_GROUP)
                    pending.clear()
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema))


def _install_parts(parts: list[Path], rejects_file: Path, folder: Path, unique: str, sources: list[str]) -> None:
    """The tasks' parts (de-duplicated) moved into ``folder`` as a manifest in parts (``part-UNIQUE-NNNNN``, in
    order; a part may hold no rows, as a unit may have only rejects), the run's own rejects (the walk's and the
    duplicates', ``rejects_file``) with the first part, then the index; parts of the manifest that was there before
    and are not in the new one are removed."""
    from ...data.parts import PartInfo, file_fingerprint, is_parts, read_index, remove_stale, write_index

    previous = read_index(folder) if is_parts(folder) else None
    infos: list[PartInfo] = []
    for number, part in enumerate(parts):
        name = f"part-{unique}-{number:05d}"
        rejects = Path(rejects_path(part))
        if number == 0:  # the run's own rejects go with the first part
            with open(rejects, "a", encoding="utf-8") as fh, open(rejects_file, encoding="utf-8") as own:
                shutil.copyfileobj(own, fh)
        rejected = sum(1 for _ in open(rejects, "rb"))
        os.replace(part, folder / f"{name}.parquet")
        os.replace(rejects, folder / f"{name}.rejects.jsonl")
        path = folder / f"{name}.parquet"
        infos.append(PartInfo(path=path.name, rows=pq.read_metadata(path).num_rows, fingerprint=file_fingerprint(path),
                              rejects=f"{name}.rejects.jsonl", rejected=rejected, size=path.stat().st_size))  # fmt: skip
    write_index(folder, infos, extra={"engine": "ray", "sources": list(sources)})
    rejects_file.unlink(missing_ok=True)
    remove_stale(previous, infos)
