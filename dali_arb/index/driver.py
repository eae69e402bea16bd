"""``build_index``: find each source's reader (``readers.READERS``), run the readers with header reading in worker
processes (tar shards read ahead, several at once; into a manifest in parts, whole units side by side), stream rows
to a temporary Parquet file, make keys unique, and move the results into place.

Imports pyarrow, tqdm (lazily), the standard library, ``data`` (manifest, pairs, storage) and ``processes``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat as stat_module
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.imagefacts import DEFAULT_MAX_PIXELS
from ..data.manifest import Manifest, rejects_name, rejects_path
from ..data.pairs import PairSpec, pairs_of
from ..data.parts import INDEX_NAME, ManifestParts, is_parts, read_index, remove_stale
from ..errors import ConfigError, DaliArbError, IndexingError, ManifestError, StorageError
from ..processes import die_with_parent, signals_deferred, spawn_without_main, stop_pool
from .captions import CaptionSource, apply_captions
from .readers import read_ahead, reader_for
from .records import index_schema
from .run import ROWS_PER_GROUP, IndexRun, IndexSummary, empty_run_rejects, finished
from .units import (  # (PART_ROWS: rows per part of a metadata file, its unit)
    PART_ROWS,
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

__all__ = ["PART_ROWS", "IndexSummary", "build_index"]


def build_index(
    sources: list[str],
    output: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    update: bool = False,
    progress: bool | None = None,
    pairs: list[PairSpec] | tuple = (),
    captions: CaptionSource | None = None,
    engine: str = "local",
    address: str | None = None,
) -> IndexSummary:
    """Index ``sources`` into the manifest ``output`` and its rejects file; returns a summary.

    ``output``: a ``.parquet`` file, or a folder (a name ending in ``/``, or an existing folder: created if missing,
    its parent must exist) to write a manifest in parts into (:mod:`dali_arb.data.parts`: parts of :data:`PART_ROWS`
    rows and ``_manifest.json``; the run's rejects go with its first part); either may be an object-storage URL.

    Args:
        sources: image folders (recursive), ``.tar`` shards (webdataset layout), or Parquet/CSV
            metadata with ``key``, ``width``, ``height`` (optional ``caption``, ``path``, ``status``,
            ``original_width``/``original_height``: the manifest's ``ORIGINAL`` columns); local or in
            object storage. Each is indexed by its reader in ``readers.READERS``.
        max_pixels: refuse images with more pixels (decompression bombs).
        workers: processes for header reading (default: all cores); tar shards and metadata ranges (into parts)
            are read side by side in them, at most this many at once, their rows taken in source order.
        update: reuse rows of an existing ``output`` whose file size and mtime are unchanged.
        progress: show a progress bar (default: when stderr is a terminal).
        pairs: paired images and masks (:class:`~dali_arb.data.pairs.PairSpec`): for the image of key ``K``,
            ``folder/K.<ext>``, or in tar shards the member ``K.NAME.<ext>``. A sample whose pair is missing,
            unreadable or of another aspect is rejected with a reason naming the pair.
        captions: where captions come from instead of sidecar ``.txt``/``.caption`` files
            (:class:`~dali_arb.index.captions.CaptionSource`: kohya's ``caption_extension``, the file name, a JSONL,
            Parquet or CSV file); written into the manifest's ``caption`` column.
        engine: ``"local"`` (worker processes on this machine) or ``"ray"`` (Ray tasks across a cluster:
            :mod:`~dali_arb.index.engines.ray`; the same rows, order aside). ``workers`` is then the CPUs of a
            cluster started here.
        address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None starts one on
            this machine (``engine="ray"`` only).
    """
    if not sources:
        raise ConfigError("give at least one source to index")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    from .engines import check_engine

    check_engine(engine, address)
    from ..data.storage import expand_sources, is_url

    if captions is not None and not isinstance(captions, CaptionSource):
        raise ConfigError(f"captions must be a CaptionSource, got {captions!r:.80}")
    if is_url(str(output)):
        if captions is not None and captions.given:
            raise ConfigError("captions from a file, a name or an extension need a local -o manifest for now")
        if engine == "ray" and str(output).endswith("/"):  # each Ray task writes its part straight to the store
            return _ray_to_prefix(sources, str(output), max_pixels=max_pixels, workers=workers, update=update,
                                  progress=progress, pairs=pairs, address=address)  # fmt: skip
        return _index_to_url(sources, str(output), max_pixels=max_pixels, workers=workers, update=update,
                             progress=progress, pairs=pairs, engine=engine, address=address)  # fmt: skip
    output, in_parts = _local_output(output)
    try:
        expanded = [u for s in sources for u in (expand_sources(s) if is_url(s) else _expand_local(s))]
        # rows must resolve from any working directory: local sources become absolute paths
        chosen = [(reader_for(s), s if is_url(s) else os.path.abspath(s)) for s in expanded]
    except StorageError as exc:
        raise IndexingError(str(exc)) from None
    kinds = [(reader.name, source) for reader, source in chosen]
    if captions is not None and captions.column and captions.file is None and all(k != "metadata" for k, _ in kinds):
        raise ConfigError(f"caption column {captions.column!r} is read from --captions FILE or from the Parquet/CSV "
                          "metadata being indexed; give one of them")  # fmt: skip
    _check_output(output, kinds)
    if not in_parts:
        _check_suffix(output)
    pairs = _checked_pairs(pairs, kinds)
    if in_parts:
        try:
            output.mkdir(exist_ok=True)
        except OSError as exc:
            raise IndexingError(f"cannot create folder {output} ({exc.strerror}); choose another -o") from None
    previous = read_index(output) if in_parts and is_parts(output) else None
    # a manifest in parts is read a source at a time, for the units not kept (units.EarlierRows); a file whole
    earlier = _earlier_rows(previous, pairs) if update and previous is not None else None
    old = _old_rows(output, pairs) if update and not in_parts else None
    if engine == "ray":  # (engines/ray.py: Ray tasks write parts, de-duplicated and joined into ``output``)
        from .engines.ray import index_on_ray

        if captions is not None and captions.given:
            raise ConfigError("captions from a file, a name or an extension are applied by --engine local only for "
                              "now; index with the local engine, or keep sidecar .txt/.caption captions")  # fmt: skip
        return index_on_ray(chosen, output, sources=sources, max_pixels=max_pixels, pairs=pairs, old=old,
                            workers=workers, progress_bar=lambda: _progress_bar(progress), address=address,
                            in_parts=in_parts, previous=previous, reuse=update, earlier=earlier)  # fmt: skip
    if in_parts:
        return _index_in_parts(chosen, output, sources=sources, max_pixels=max_pixels, pairs=pairs, workers=workers,
                               progress=progress, captions=captions, previous=previous, reuse=update,
                               earlier=earlier)  # fmt: skip
    summary = IndexSummary(manifest=output)
    started = time.perf_counter()
    # private temporary files beside the outputs, moved into place at the end: two runs on one output
    # never write into each other's files, and a reader only ever sees a whole manifest
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = output.with_name(f".{output.name}.{unique}.partial")
    rejects_tmp = output.with_name(f".{output.name}.rejects.jsonl.{unique}.partial")
    writer = pq.ParquetWriter(tmp, index_schema(pairs))
    run: IndexRun | None = None
    pool = _pool(workers, remote=any(reader.remote for reader, _ in chosen))
    hidden_main = spawn_without_main()  # workers start at submits throughout the loop: none re-runs __main__
    hidden_main.__enter__()
    try:
        with open(rejects_tmp, "w", encoding="utf-8") as rejects_fh, _progress_bar(progress) as bar:
            run = IndexRun(sources=kinds, max_pixels=max_pixels, pairs=pairs, old=old, pool=pool, writer=writer,
                           rejects=rejects_fh, progress=bar.update, summary=summary)  # fmt: skip
            _read_sources(run, chosen, ahead=_workers(workers))
            run.finish()
        _deduplicate_keys(tmp, rejects_tmp, summary)
        if captions is not None and captions.given:
            apply_captions(tmp, captions, metadata=[source for kind, source in kinds if kind == "metadata"])
        pool.shutdown()
    except BaseException:  # an error, Ctrl-C or SIGTERM (the CLI turns it into SystemExit): leave nothing behind
        stop_pool(pool)
        IndexRun.abandon(run, writer, tmp, rejects_tmp)
        raise
    finally:
        hidden_main.__exit__(None, None, None)
    if summary.rows == 0 and output.exists():  # nothing usable: the manifest there now stays, never an empty one
        summary.left_previous = True
        tmp.unlink(missing_ok=True)
        os.replace(rejects_tmp, empty_run_rejects(output))
        return finished(summary, sources, started, empty_run_rejects(output))
    os.replace(tmp, output)
    os.replace(rejects_tmp, rejects_path(output))
    return finished(summary, sources, started, rejects_path(output))


def _read_sources(run: IndexRun, chosen: list, *, ahead: int) -> None:
    """Run each source's reader into ``run``, in order, with the tar shards (local or in object storage) among the
    next sources read ahead in the pool (``readers.read_ahead``; at most ``ahead`` submitted and not yet taken):
    shards run side by side in the workers, as a folder's groups of files do, and their rows are still taken in source
    order (the same manifest, byte for byte, as one shard after another). Memory: the rows of at most ``ahead`` shards
    waiting (about 300 bytes a sample)."""
    following = 0  # the next source not yet considered for reading ahead
    for position, (reader, source) in enumerate(chosen):
        following = max(following, position)
        while following < len(chosen) and run.pending_ahead < ahead:
            later_reader, later = chosen[following]
            following += 1
            try:
                job = read_ahead(run, later_reader.name, later)
            except (OSError, DaliArbError):  # (left to its reader, in its turn: it says so in order)
                continue
            if job is not None:
                run.ahead(*job)
        reader.read(run, source)


def _workers(workers: int | None) -> int:
    """The worker processes of the local engine's pool: ``workers``, or every core."""
    return workers or os.cpu_count() or 1


def _index_in_parts(
    chosen: list, output: Path, *, sources: list[str], max_pixels: int, pairs: list[PairSpec], workers: int | None,
    progress: bool | None, captions: CaptionSource | None, previous: ManifestParts | None, reuse: bool,
    earlier: EarlierRows | None,
) -> IndexSummary:  # fmt: skip
    """``build_index`` into the folder ``output`` as a manifest in parts, with the local engine: one part per unit
    (``units``: a shard, a range of a metadata file's row groups, a slice of a folder walk or prefix listing), its
    header reading in worker processes; with ``reuse`` (``--update``), the parts of ``previous`` (the manifest in
    parts there now) whose units are unchanged are kept whole, and the other units reuse the unchanged rows of
    ``earlier``. Keys are then made unique across the parts and the parts installed with their index
    (``units.finish_parts``)."""
    import shutil

    summary = IndexSummary(manifest=output)
    started = time.perf_counter()
    unique = f"{os.getpid()}-{secrets.token_hex(4)}"
    scratch = output / f".{unique}.parts"
    scratch.mkdir()
    given = captions is not None and captions.given
    plan = PartReuse(previous if reuse and not given else None)
    pool = _pool(workers, remote=any(reader.remote for reader, _ in chosen))
    hidden_main = spawn_without_main()  # workers start at submits throughout the loop: none re-runs __main__
    hidden_main.__enter__()
    try:
        walk_rejects: list = []
        todo = units(chosen, max_pixels=max_pixels, pairs=pairs, old=None, rejects=walk_rejects, counts=summary,
                     identify=not given, earlier=earlier)  # fmt: skip
        metadata = [s for r, s in chosen if r.name == "metadata"]
        with _progress_bar(progress) as bar:
            done = _run_units(todo, pool, scratch, summary, bar, max_pixels=max_pixels, pairs=pairs, plan=plan,
                              output=output, earlier=earlier, limit=_workers(workers),
                              captions=(captions, metadata) if given else None)  # fmt: skip
        summary.rejects_at = finish_parts(done, scratch=scratch, folder=output, run_rejects=walk_rejects,
                                          summary=summary, unique=unique, sources=sources, engine="local",
                                          pairs=pairs, previous=previous)  # fmt: skip
        pool.shutdown()
    except BaseException:  # an error, Ctrl-C or SIGTERM (the CLI turns it into SystemExit): leave nothing behind
        stop_pool(pool)
        raise
    finally:
        hidden_main.__exit__(None, None, None)
        shutil.rmtree(scratch, ignore_errors=True)
    return finished(summary, sources, started, summary.rejects_at)


#: Units read whole in one worker process, several side by side; the others (slices of a folder walk or prefix
#: listing) are read by the driver, their groups of files spread over the pool.
WHOLE_UNITS = frozenset({"shard", "metadata", "remote_shard", "remote_metadata"})


def _run_units(
    todo, pool: ProcessPoolExecutor, scratch: Path, summary: IndexSummary, bar, *, max_pixels: int,
    pairs: list[PairSpec], plan: PartReuse, output: Path, earlier: EarlierRows | None, limit: int,
    captions: tuple[CaptionSource, list[str]] | None,
) -> list[Done]:  # fmt: skip
    """Run the units ``todo`` (``units.units``) of the local engine into parts in ``scratch``: a unit whose earlier
    part ``plan`` keeps is not run; a unit of :data:`WHOLE_UNITS` (a shard, a metadata range) runs whole in a worker
    (``units.run_unit``), at most ``limit`` of them in flight, while the driver goes on to the next units; a folder or
    prefix slice runs in the driver, its groups in the pool. What each gave, in unit order (so the manifest is the
    one a run of one unit after another writes). Memory on the driver: the units in flight (their sources' earlier
    rows with ``--update``), not their rows (each worker writes its part)."""
    done: dict[int, Done] = {}
    inflight: dict[Future, tuple[int, Unit]] = {}

    def settle(position: int, unit: Unit, found: tuple, counted: bool) -> None:
        part, rejects, unit_summary = found
        merge_summary(summary, unit_summary)
        if not counted:
            bar.update(unit_summary.files_seen)
        if captions is not None:
            apply_captions(part, captions[0], metadata=captions[1])
        done[position] = Done(record=unit_record(unit, unit_summary), part=Path(part), rejects=Path(rejects))

    def collect(until: int) -> None:  # (until at most ``until`` units are in flight)
        while len(inflight) > until:
            finished_now, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for future in finished_now:
                settle(*inflight.pop(future), future.result(), counted=False)

    for position, unit in enumerate(todo):
        kept = plan.find(unit)
        if kept is not None:
            done[position] = Done(record=kept.unit, kept=kept)
            reused_summary(summary, kept, output)
            continue
        if earlier is not None:
            unit = earlier.fill(unit)
        if unit.kind in WHOLE_UNITS:
            collect(until=limit - 1)
            with signals_deferred():
                inflight[pool.submit(run_unit, unit, str(scratch), max_pixels, pairs)] = (position, unit)
        else:
            found = run_unit(unit, str(scratch), max_pixels, pairs, pool=pool, progress=bar.update)
            settle(position, unit, found, counted=True)
    collect(until=0)
    return [done[position] for position in sorted(done)]


def _local_output(output: str | os.PathLike) -> tuple[Path, bool]:
    """``(path, in parts)``: the local manifest file ``output`` names, or the folder of a manifest in parts (a name
    ending in ``/``, or an existing folder); an IndexingError where its parent folder does not exist,
    or for a folder that holds other things than a manifest in parts (never written into, so never mixed up)."""
    text = os.fspath(output)
    path = Path(text)
    if path.name == INDEX_NAME:
        path, text = path.parent, str(path.parent) + os.sep
    if not path.parent.exists():
        raise IndexingError(f"folder {path.parent} does not exist; create it or choose another -o")
    if not (text.endswith(("/", os.sep)) or path.is_dir()):
        return path, False
    if path.is_dir() and not is_parts(path) and any(not p.name.startswith(".") for p in path.iterdir()):
        raise IndexingError(
            f"-o {text}: folder {path} holds files but no manifest in parts ({INDEX_NAME}); give a new or empty "
            f"folder for a manifest in parts, or a .parquet file name (e.g. -o {path / 'manifest.parquet'})"
        )
    return path, True


def _check_suffix(output: Path) -> None:
    """Refuse a manifest name whose suffix says another format (``m.csv``): the manifest is always Parquet (a name
    with no suffix is taken as named)."""
    if output.suffix and output.suffix.lower() != ".parquet":
        raise IndexingError(
            f"-o {output}: a manifest is written as Parquet, not {output.suffix}; name it "
            f"{output.with_suffix('.parquet').name}"
        )


def _expand_local(source: str) -> list[str]:
    """The local paths a source stands for: a path that exists as it is; else its brace ranges and choices
    (``shards/{00000..00002}.tar``, ``{a,b}``, expanded as for URLs) and globs (``photos/*/``, sorted), so that a
    quoted pattern indexes like the list the shell would have given. A pattern that matches nothing is an
    IndexingError naming it; a brace-expanded path that does not exist is left for the reader to name."""
    import glob

    from ..data.storage import expand_sources

    if os.path.exists(source) or not any(c in source for c in "{*?["):
        return [source]
    out: list[str] = []
    for item in expand_sources(source):  # (braces only: globs there are for URLs)
        if any(c in item for c in "*?[") and not os.path.exists(item):
            matched = sorted(glob.glob(item))
            if not matched:
                raise IndexingError(f"no file or folder matches {item}; check the pattern")
            out += matched
        else:
            out.append(item)
    return out


def _old_rows(output: Path, pairs: list[PairSpec]) -> pa.Table | None:
    """The rows of the manifest ``output`` (being updated), if it exists, has the same pairs and records its rows'
    sources and mtimes (so unchanged files can be recognised); else None."""
    if not output.exists() or (output.is_dir() and not is_parts(output)):
        return None
    old = Manifest.read(output).table
    same_pairs = pairs_of(old.schema) == {p.name: p.kind for p in pairs}
    if not (same_pairs and "mtime_ns" in old.column_names and "source" in old.column_names):
        return None
    return _without_shadowed(old, rejects_path(output))


def _without_shadowed(old: pa.Table, rejects_file: Path) -> pa.Table:
    """``old`` without the rows of the sources (a shard) that lost a row to key de-duplication, as the manifest's
    rejects (``rejects_file``) name them: their earlier rows lack that row, which a fresh index may keep (the source
    that held its key first is gone), so they are read again."""
    import json

    import pyarrow.compute as pc

    from .units import DUPLICATE_TAIL

    shadowed: set[str] = set()
    try:
        with open(rejects_file, encoding="utf-8") as fh:
            for line in fh:
                reject = json.loads(line)
                if str(reject.get("reason", "")).endswith(DUPLICATE_TAIL) and reject.get("source"):
                    shadowed.add(str(reject["source"]))
    except (OSError, ValueError):
        return old  # (no rejects file, or a damaged one: nothing known to be missing)
    if not shadowed:
        return old
    gone = pc.fill_null(pc.is_in(old.column("source"), pa.array(sorted(shadowed), pa.string())), False)
    return old.filter(pc.invert(gone))


def _earlier_rows(previous: ManifestParts, pairs: list[PairSpec]) -> EarlierRows | None:
    """The rows of the manifest in parts being updated, read as units need them (:class:`~.units.EarlierRows`),
    when its parts have the same pairs and record their rows' sources and mtimes (read from one part's footer)."""
    with_rows = [p for p in previous.parts if p.rows]
    if not with_rows:
        return None
    schema = pq.read_schema(previous.join(with_rows[0].path))
    same_pairs = pairs_of(schema) == {p.name: p.kind for p in pairs}
    return EarlierRows(previous) if same_pairs and {"mtime_ns", "source"} <= set(schema.names) else None


def _pool(workers: int | None, *, remote: bool) -> ProcessPoolExecutor:
    """The header-reading processes. Where this process may run obstore's threads (a ``remote`` source, or obstore
    imported), workers are spawned, never forked: a forked child inherits its runtime broken (indexing a bucket
    crashed with SIGSEGV so); else forking is cheaper."""
    import multiprocessing

    spawn = remote or "obstore" in sys.modules
    return ProcessPoolExecutor(
        max_workers=_workers(workers),
        initializer=die_with_parent,
        mp_context=multiprocessing.get_context("spawn" if spawn else "fork"),
    )


def _progress_bar(progress: bool | None):
    """A tqdm bar counting files, shown when ``progress`` (None: when stderr is a terminal)."""
    from tqdm import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    return tqdm(disable=not progress, unit=" files", desc="indexing", dynamic_ncols=True)


def _index_to_url(sources: list[str], url: str, *, update: bool, **options) -> IndexSummary:
    """``build_index`` into object storage: the manifest and its rejects file are written in a private local
    folder, then uploaded, rejects first, so a reader that finds the manifest finds whole files. With ``update``,
    the manifest already at ``url`` (if any) is fetched first and its unchanged rows reused."""
    import shutil
    import tempfile

    from ..data.storage import download, exists, upload

    if url.endswith("/"):
        return _index_to_prefix(sources, url, update=update, **options)
    name = url.rsplit("/", 1)[-1]
    if not name.endswith(".parquet"):
        raise IndexingError(
            f"-o {url}: name the manifest object, e.g. {url}/manifest.parquet, or end it with / for a manifest in "
            f"parts ({url}/)"
        )
    rejects_url = rejects_name(url)
    folder = Path(tempfile.mkdtemp(prefix="dali-arb-index-"))
    try:
        local = folder / name
        try:
            if update and exists(url):
                download(url, local)
                if exists(rejects_url):  # (its duplicates' rejects name the sources whose rows are not all there)
                    download(rejects_url, rejects_path(local))
        except StorageError as exc:
            raise IndexingError(str(exc)) from None
        try:
            summary = build_index(sources, local, update=update, **options)
        except IndexingError as exc:  # its message names the local file: name the URL the user gave
            listed = next((p for p in (empty_run_rejects(local), rejects_path(local)) if p.exists()), None)
            raise _failed_in_store(exc, local, url, listed) from None
        try:
            upload(rejects_path(local), rejects_url)
            upload(local, url)
        except StorageError as exc:
            raise IndexingError(f"the manifest was built but could not be written: {exc}") from None
        summary.manifest = url
        return summary
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _index_to_prefix(sources: list[str], url: str, *, update: bool, **options) -> IndexSummary:
    """``build_index`` into a manifest in parts under the prefix ``url`` (ending in ``/``): written in a private local
    folder, then each part and its rejects uploaded, the index last, so a reader sees the old manifest or the whole
    new one. With ``update``, the manifest in parts already there (if any) is copied first and its unchanged rows
    reused. Parts of an earlier manifest at the prefix that the new index does not list are then deleted."""
    import shutil
    import tempfile

    from ..data.parts import check_writable, local_parts
    from ..data.storage import download, upload

    try:
        check_writable(url)  # (before the sources are read)
    except StorageError as exc:
        raise IndexingError(f"cannot write the manifest to {url}: {exc}") from None
    folder = Path(tempfile.mkdtemp(prefix="dali-arb-index-"))
    local = folder / "manifest"
    there: set[str] = set()  # the files at the prefix already (a kept part is not uploaded again)
    try:
        try:
            previous = read_index(url) if is_parts(url) else None
            if update and previous is not None:
                shutil.copytree(local_parts(url, cache_dir=folder / "cache"), local)
                for part in previous.parts:  # its own index and rejects (the cached copy keeps neither)
                    if part.rejects:
                        download(previous.join(part.rejects), local / part.rejects)
                download(previous.index, local / INDEX_NAME)
                there = {p.path for p in previous.parts} | {p.rejects for p in previous.parts if p.rejects}
        except (StorageError, ManifestError) as exc:
            raise IndexingError(str(exc)) from None
        try:
            summary = build_index(sources, f"{local}{os.sep}", update=update, **options)
        except IndexingError as exc:  # nothing is uploaded but its rejects; its message names the URL the user gave
            listed = empty_run_rejects(local)
            if not listed.exists() and is_parts(local):  # (a new manifest of no rows: its parts' rejects, together)
                with open(listed, "wb") as out:
                    for part in read_index(local).parts:
                        if part.rejects:
                            out.write(Path(local, part.rejects).read_bytes())
            raise _failed_in_store(exc, local, url, listed if listed.exists() else None) from None
        listing = read_index(local)
        try:
            for part in listing.parts:
                for name in (part.path, part.rejects):
                    if name and name not in there:
                        upload(listing.join(name), url + name)
            upload(listing.index, url + INDEX_NAME)  # last: the manifest appears whole at once
        except StorageError as exc:
            raise IndexingError(f"the manifest was built but could not be written: {exc}") from None
        remove_stale(previous, listing.parts)
        summary.manifest = url
        if summary.rejects_at:
            summary.rejects_at = summary.rejects_at.replace(f"{local}{os.sep}", url)
        return summary
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _failed_in_store(exc: IndexingError, local: Path, url: str, listed: Path | None) -> IndexingError:
    """``exc``, from an index run into ``local`` (the private copy of the manifest at ``url``), naming ``url``; the
    rejects of a run that found nothing usable (``listed``) are put beside ``url`` as
    ``URL.empty-run.rejects.jsonl``, never over the rejects of a manifest already there, which is left as it was."""
    from ..data.storage import exists, upload

    message = str(exc)
    if listed is not None:
        try:
            there = is_parts(url) if url.endswith("/") else exists(url)
        except StorageError:
            there = True  # (unknown: the manifest's own rejects are not replaced)
        new_file = not there and not url.endswith("/")
        target = rejects_name(url) if new_file else f"{url.rstrip('/')}.empty-run.rejects.jsonl"
        with contextlib.suppress(StorageError):
            upload(listed, target)
            message = message.replace(str(listed), target).replace(str(local / "*.rejects.jsonl"), target)
        if there and "left as it was" not in message:
            message += f"; {url} is left as it was"
    return IndexingError(message.replace(f"{local}{os.sep}", url).replace(str(local), url))


def _ray_to_prefix(sources: list[str], url: str, *, max_pixels: int, workers: int | None, update: bool,
                   progress: bool | None, pairs: list[PairSpec] | tuple, address: str | None) -> IndexSummary:  # fmt: skip
    """``build_index`` with the Ray engine into a manifest in parts at the prefix ``url``: every task writes its part
    straight to the store, the index last (:mod:`.engines.ray_store`); no file system is shared."""
    from ..data.storage import expand_sources, is_url
    from .engines.ray_store import index_on_ray_to_store

    try:
        expanded = [u for s in sources for u in (expand_sources(s) if is_url(s) else _expand_local(s))]
        chosen = [(reader_for(s), s if is_url(s) else os.path.abspath(s)) for s in expanded]
    except StorageError as exc:
        raise IndexingError(str(exc)) from None
    checked = _checked_pairs(pairs, [(reader.name, source) for reader, source in chosen])
    return index_on_ray_to_store(chosen, url, sources=sources, max_pixels=max_pixels, pairs=checked, update=update,
                                 workers=workers, progress_bar=lambda: _progress_bar(progress), address=address)  # fmt: skip


def _checked_pairs(pairs: list[PairSpec] | tuple, kinds: list[tuple[str, str]]) -> list[PairSpec]:
    """The pairs with absolute folders (or prefix URLs ending in ``/``); a ConfigError for what cannot work (a pair
    without a folder for image folders, metadata sources, a missing folder, a name given twice, a pair folder in
    object storage for local images or the reverse)."""
    from ..data.storage import is_url

    checked = []
    for spec in pairs:
        if not isinstance(spec, PairSpec):
            raise ConfigError(f"pairs must be PairSpec objects, got {type(spec).__name__}")
        if any(p.name == spec.name for p in checked):
            raise ConfigError(f"pair name {spec.name!r} is given twice; each pair needs its own name")
        remote_pair = spec.folder is not None and is_url(spec.folder)
        if remote_pair:
            if any(kind != "remote_folder" for kind, _ in kinds):
                raise ConfigError(
                    f"--{spec.kind} {spec.name}={spec.folder}: a pair folder in object storage goes with image prefixes "
                    "in object storage (s3://bucket/images/); give a local pair folder for local images"
                )
            checked.append(PairSpec(spec.name, spec.kind, spec.folder.rstrip("/") + "/"))
            continue
        if spec.folder is not None and any(kind == "remote_folder" for kind, _ in kinds):
            raise ConfigError(
                f"--{spec.kind} {spec.name}={spec.folder}: the images are in object storage, so give the pair folder "
                f"there too ({spec.name}=s3://bucket/{spec.name}/), or use tar shards with members KEY.{spec.name}.<ext>"
            )
        if spec.folder is None and any(kind in ("folder", "remote_folder") for kind, _ in kinds):
            raise ConfigError(
                f"--{spec.kind} {spec.name} has no folder: for image folders give --{spec.kind} {spec.name}=DIR "
                "(DIR/KEY.<ext> is the pair of image KEY); a name alone means tar members KEY.NAME.<ext>"
            )
        if spec.folder is not None and not os.path.isdir(spec.folder):
            raise ConfigError(f"--{spec.kind} {spec.name}={spec.folder}: no such folder")
        checked.append(PairSpec(spec.name, spec.kind, os.path.abspath(spec.folder) if spec.folder else None))
    if checked and any(kind in ("metadata", "remote_metadata") for kind, _ in kinds):
        raise ConfigError(
            "pairs are found next to images (folders) or inside tar shards, not in metadata; index the image folders "
            "or shards with --pair/--mask"
        )
    return checked


def _check_output(output: Path, kinds: list[tuple[str, str]]) -> None:
    """Outputs are never inputs: refuse an ``output`` that is one of the sources, lies inside a source
    folder, or exists as something other than a regular file (``/dev/null``, a FIFO)."""
    if output.exists() and not stat_module.S_ISREG(os.stat(output).st_mode) and not output.is_dir():
        raise IndexingError(
            f"output {output} is not a regular file (a device, FIFO or socket); give a new .parquet file name"
        )
    real = os.path.realpath(output)
    for kind, source in kinds:
        if kind.startswith("remote_"):
            continue  # the output is a local file
        source_real = os.path.realpath(source)
        if real == source_real:
            raise IndexingError(
                f"output {output} is one of the inputs ({source}); writing it would destroy it: choose another -o"
            )
        if kind == "folder" and real.startswith(source_real.rstrip(os.sep) + os.sep):
            raise IndexingError(
                f"output {output} lies inside the input folder {source}; write the manifest next to the folder, "
                f"e.g. -o {Path(source).parent / (Path(source).name + '.parquet')}"
            )


def _deduplicate_keys(path: Path, rejects_file: Path, summary: IndexSummary) -> None:
    """Keys must be unique across sources: keep the first row of each key, reject the others (``dedupe``: streamed
    through the file's row groups, hash-partitioned, in memory bounded by a chunk size)."""
    import shutil
    import tempfile

    from .dedupe import deduplicate, write_rejects

    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.dedupe-", dir=path.parent))
    try:
        with open(rejects_file, "a", encoding="utf-8") as fh:
            found = deduplicate([path], scratch, rejects=lambda r: write_rejects(fh, r), chunk_rows=ROWS_PER_GROUP)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary.rejected += found.dropped
    summary.rows -= found.dropped
    if found.dropped:
        summary.reject_reasons["duplicate key"] = summary.reject_reasons.get("duplicate key", 0) + found.dropped
