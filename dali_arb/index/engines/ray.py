"""The ``ray`` engine: ``build_index(..., engine="ray")`` and ``dali-arb index --engine ray [--address ADDR]``.

The driver (this process) expands the sources as the local engine does and splits them into units of work
(``index/units.py``: a tar shard, a range of a Parquet metadata file's row groups, a slice of about 4096 files of a
folder walk or of a prefix listing). Each unit runs as a Ray task that reads headers with the same readers as the
local engine and writes one Parquet part and its rejects into a scratch folder beside the output (so the output's
folder must be one every node sees: a shared file system). Keys are then de-duplicated across the parts with Ray
tasks per hash partition (``index/dedupe.py``), and the parts are streamed, in source order, into the manifest, or,
into a folder (``-o DIR/``), become the parts of a manifest in parts (``--update``: a unit whose part is kept is not
run). The rows equal the local engine's for the same sources; the order too, as parts are kept
in source order.

A task that dies with its worker or node is run again (Ray's ``max_retries``): a part is written under a private
name and renamed into place, so a retried unit replaces it and nothing is doubled. Memory on the driver: the parts'
list and the units in flight (:data:`IN_FLIGHT_PER_CPU` per cluster CPU), not the rows.

Imports Ray (lazily, when the engine runs), pyarrow, tqdm and the indexer's readers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ...data.manifest import ORIGINAL, VIDEO, rejects_path
from ...data.pairs import PairSpec
from ...data.parts import ManifestParts
from ...errors import DaliArbError, IndexingError
from ..records import index_schema
from ..run import ROWS_PER_GROUP, IndexSummary, finished
from ..units import (
    GROUPS_PER_UNIT,
    Done,
    EarlierRows,
    PartReuse,
    Unit,
    finish_parts,
    merge_summary,
    reused_summary,
    run_unit,
    unit_record,
    units,
)

__all__ = ["GROUPS_PER_UNIT", "Unit", "index_on_ray", "run_unit"]

#: Units submitted ahead per CPU of the cluster (the rest wait on the driver).
IN_FLIGHT_PER_CPU = 2
#: How often a task that failed with its worker or node is run again.
TASK_RETRIES = 3
INSTALL = "pip install 'dali-arb[ray]'"


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
    previous: ManifestParts | None = None,
    reuse: bool = False,
    earlier: EarlierRows | None = None,
) -> IndexSummary:
    """``build_index`` with the ``ray`` engine, from the sources the driver checked (``chosen``: ``(reader,
    source)``) into the local manifest file ``output`` or, ``in_parts``, the existing folder ``output`` as a manifest
    in parts (each task's part one part of it: ``units.finish_parts``; ``previous``: the manifest in parts there now,
    whose unchanged parts are kept with ``reuse``; ``earlier``: its rows, for the units not kept), showing progress on
    ``progress_bar()`` (a tqdm bar); see the module's text."""
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
        plan = PartReuse(previous if reuse else None) if in_parts else None
        done = _run_units(ray, chosen, scratch, summary, walk_rejects, max_pixels=max_pixels, pairs=pairs, old=old,
                          progress_bar=progress_bar, plan=plan, folder=output, earlier=earlier)  # fmt: skip
        if in_parts:
            summary.rejects_at = finish_parts(done, scratch=scratch, folder=output, run_rejects=walk_rejects,
                                              summary=summary, unique=unique, sources=sources, engine="ray",
                                              pairs=pairs, previous=previous, map_fn=ray_map(ray))  # fmt: skip
        else:
            parts = [Path(d.part) for d in done]
            with open(rejects_tmp, "w", encoding="utf-8") as fh:
                for reject in walk_rejects:
                    fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
                for item in done:
                    with open(item.rejects, encoding="utf-8") as part_rejects:
                        shutil.copyfileobj(part_rejects, fh)
                _deduplicate(ray, parts, scratch, fh, summary)
            _concatenate(parts, tmp, _manifest_schema(parts, pairs))
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
    return finished(summary, sources, started, summary.rejects_at or rejects_path(output))


def _run_units(
    ray, chosen: list, scratch: Path, summary: IndexSummary, walk_rejects: list, *, max_pixels: int,
    pairs: list[PairSpec], old: pa.Table | None, progress_bar: Callable, plan: PartReuse | None = None,
    folder: Path | None = None, earlier: EarlierRows | None = None, unit_task: Callable = run_unit,
) -> list[Done]:  # fmt: skip
    """Submit every unit as a Ray task (at most :data:`IN_FLIGHT_PER_CPU` per cluster CPU in flight), merge their
    summaries into ``summary`` and show progress; what each unit gave, in unit order (``Done.part`` and
    ``Done.rejects``: what the task returned). With ``plan`` (a manifest in parts: ``folder``), units are identified,
    and a unit whose earlier part ``plan`` keeps is not run. ``unit_task``: what a task runs, :func:`run_unit` or one
    with its signature and results (``ray_store.run_unit_to_store``)."""
    task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(unit_task)
    limit = max(2, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    found: dict[int, Done] = {}
    inflight: dict = {}
    submitted = 0
    pairs_ref = ray.put(list(pairs))

    def collect(refs: list) -> None:
        for ref in refs:
            unit = inflight.pop(ref)
            part, rejects, done = ray.get(ref)
            found[unit.number] = Done(record=unit_record(unit, done), part=part, rejects=rejects)
            merge_summary(summary, done)
            bar.update(done.files_seen)
            bar.set_postfix(parts=f"{len(found)}/{submitted}", rejected=summary.rejected, refresh=False)

    try:
        with progress_bar() as bar, ray_failures(ray):
            bar.set_description("indexing on Ray")
            for unit in units(chosen, max_pixels=max_pixels, pairs=pairs, old=old, rejects=walk_rejects,
                              counts=summary, identify=plan is not None, earlier=earlier):  # fmt: skip
                submitted += 1
                kept = plan.find(unit) if plan is not None else None
                if kept is not None:
                    found[unit.number] = Done(record=kept.unit, kept=kept)
                    reused_summary(summary, kept, folder)
                    continue
                if earlier is not None:
                    unit = earlier.fill(unit)
                inflight[task.remote(unit, str(scratch), max_pixels, pairs_ref)] = unit
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
