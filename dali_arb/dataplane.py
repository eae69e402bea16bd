"""The data plane: what every process of a node reads about a manifest, built once and memory-mapped.

A manifest is converted, the first time any process opens it, into flat column files in a cache folder
named by the digest of the manifest file's bytes; every process after that (every rank, every worker)
maps those files, so a node holds one copy of each page, shared, and no process holds a per-row Python
object or a private per-row array. Per bucket options, the rows grouped by bucket (the planner's
:class:`~dali_arb.buckets.BucketIndex`) are cached beside them.

Where the cache lives: the ``cache_dir`` argument (``--cache-dir``), else ``$DALI_ARB_CACHE``, else
``$XDG_CACHE_HOME/dali_arb``, else ``~/.cache/dali_arb``. Layout under it::

    v1/<content digest>/meta.json              what was built, from which file, file sizes
                       /<column>.npy            fixed-width columns (height, width, offset, length, mtime_ns,
                                                source_size)
                       /<column>.offsets.npy    string columns: int64 (n + 1) byte offsets,
                       /<column>.bytes           the UTF-8 bytes, and
                       /<column>.valid           a validity bitmap (Arrow's bit order)
                       /source.index.npy        source (each pair's NAME.source, and etag): int32 row -> run
                                                of equal values (shards), the runs as a string column
                       /buckets/<options digest>/  bucket.npy members.npy starts.npy sizes.npy meta.json
    v1/by-path/<path digest>.json              stat signature -> content digest (skips re-hashing)
    v1/locks/                                  one builder per manifest at a time

Every folder is built under a temporary name and renamed into place, so a reader sees a whole cache or
none; eight ranks starting at once build it once (a file lock) and a lost race only wastes work. A cache
whose files do not match what its ``meta.json`` records, or of another format, is rebuilt; a folder that
cannot be written gives one line saying where to point the cache instead.

Imports only the standard library, NumPy and pyarrow.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .buckets import BucketIndex, BucketSpec, served_p99
from .errors import ManifestError, ResourceError
from .manifest import NO_IDENTITY, Fingerprint, Manifest, check_file, pinned_columns
from .pairs import pair_columns, pairs_of

__all__ = ["CACHE_ENV", "CACHE_FORMAT", "ManifestCache", "bucket_index", "cache_root"]

#: The environment variable naming the cache folder.
CACHE_ENV = "DALI_ARB_CACHE"
#: Bumped when the layout changes; each format lives in its own ``v<N>`` folder.
CACHE_FORMAT = 3  # 2: pair columns; runs of every source column; 3: the sources' identity (mtime_ns, source_size, etag)
#: Rows converted per step while building (a multiple of 8: validity bitmaps are written per step).
BUILD_ROWS = 1 << 20
_FIXED = {"height": np.int32, "width": np.int32, "offset": np.int64, "length": np.int64, "mtime_ns": np.int64,
          "source_size": np.int64}  # fmt: skip
_FILL = {"offset": 0, "length": -1, "mtime_ns": NO_IDENTITY, "source_size": NO_IDENTITY}
_STRINGS = ("key", "caption")
_HASH_CHUNK = 8 << 20


def _index_type(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, ``$DALI_ARB_CACHE``, ``$XDG_CACHE_HOME/dali_arb`` or ``~/.cache/dali_arb``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dali_arb"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    """blake2b (128 bits) of a file's bytes, read in chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stat_signature(path: Path) -> list[int]:
    """What changes whenever the file's content can have: size, mtime, ctime (not settable by users), inode."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (created); where locks are unsupported, no lock: the atomic
    renames keep the cache whole anyway."""
    import fcntl

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data, sort_keys=True))
    os.replace(partial, path)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _files_of(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"}


def _is_whole(folder: Path, meta: dict | None, **expected: Any) -> bool:
    """Whether ``folder`` holds the complete cache ``meta`` describes, with ``expected`` meta values."""
    if meta is None or meta.get("format") != CACHE_FORMAT or any(meta.get(k) != v for k, v in expected.items()):
        return False
    try:
        return _files_of(folder) == meta.get("files")
    except OSError:
        return False


def _install(built: Path, final: Path) -> None:
    """Rename the folder ``built`` into place as ``final``, replacing a broken one; if another process
    installed a whole one first, keep that."""
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        with contextlib.suppress(OSError):
            os.rename(final, stale)  # processes still mapping its files keep them: unlinked inodes live on
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(built, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(built, ignore_errors=True)  # another process won the race


def _cache_error(root: Path, exc: OSError, doing: str) -> ResourceError:
    reason = exc.strerror or type(exc).__name__
    return ResourceError(
        f"cannot {doing} in the dali_arb cache {root} ({reason}); point ${CACHE_ENV} or --cache-dir at a "
        "writable folder with room for about the manifest's size"
    )


class _BitWriter:
    """Writes booleans as a bitmap in Arrow's bit order, whatever the lengths of the pieces appended."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")
        self.carry = np.zeros(0, bool)

    def append(self, bits: np.ndarray) -> None:
        bits = np.concatenate([self.carry, bits])
        whole = len(bits) // 8 * 8
        self.file.write(np.packbits(bits[:whole], bitorder="little").tobytes())
        self.carry = bits[whole:]

    def close(self) -> None:
        self.file.write(np.packbits(self.carry, bitorder="little").tobytes())
        self.file.close()


class _StringWriter:
    """Writes a string column as ``NAME.offsets.npy`` (int64, n + 1), ``NAME.bytes`` and, when ``nullable``,
    ``NAME.valid``."""

    def __init__(self, folder: Path, name: str, n: int, *, nullable: bool = True) -> None:
        self.offsets = np.lib.format.open_memmap(
            folder / f"{name}.offsets.npy", mode="w+", dtype=np.int64, shape=(n + 1,)
        )
        self.offsets[0] = 0
        self.data = open(folder / f"{name}.bytes", "wb")
        self.valid = _BitWriter(folder / f"{name}.valid") if nullable else None
        self.row = 0
        self.size = 0

    def append(self, column: pa.Array) -> None:
        column = column.cast(pa.large_string())
        n = len(column)
        offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + n + 1]
        if column.buffers()[2] is not None and n:
            self.data.write(memoryview(column.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
        self.offsets[self.row + 1 : self.row + n + 1] = self.size + offsets[1:] - offsets[0]
        self.size += int(offsets[-1] - offsets[0])
        if self.valid is not None:
            self.valid.append(column.is_valid().to_numpy(zero_copy_only=False))
        self.row += n

    def close(self) -> None:
        self.offsets.flush()
        del self.offsets
        self.data.close()
        if self.valid is not None:
            self.valid.close()


def map_npy(path: Path) -> np.ndarray:
    """The ``.npy`` file at ``path``, memory-mapped for random access: ``(N,)``.

    Rows are read a few at a time at random places, so the kernel is told not to read ahead
    (``MADV_RANDOM``): with a device's default read-ahead (8 MiB on the machine the figures come from),
    64 random rows of a cold caption file read 84 MiB from disk, against 0.2 MiB with the advice."""
    return _advise_random(np.load(path, mmap_mode="r"))


def _advise_random(array: np.ndarray) -> np.ndarray:
    mapping = getattr(array, "_mmap", None)  # np.memmap keeps its mmap.mmap here
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(mmap.MADV_RANDOM)
    return array


def _string_array(folder: Path, name: str, n: int) -> pa.Array:
    """A ``large_string`` array over the mapped files of column ``name`` (no copy)."""
    offsets = map_npy(folder / f"{name}.offsets.npy")
    data = _map_bytes(folder / f"{name}.bytes")
    valid = _map_bytes(folder / f"{name}.valid") if (folder / f"{name}.valid").exists() else None
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), data, valid)


def _map_bytes(path: Path) -> pa.Buffer:
    if path.stat().st_size == 0:
        return pa.py_buffer(b"")
    return pa.py_buffer(_advise_random(np.memmap(path, dtype=np.uint8, mode="r")))


class ManifestCache:
    """One manifest's mapped columns (see the module's docstring for the layout).

    Attributes:
        folder: where its files are.
        meta: what ``meta.json`` records (``rows``, ``columns``, ``pinned`` fingerprint, ``content``).
        manifest_path: the file it was opened for (``None`` when opened by folder).
        signature: that file's stat signature when it was opened.
    """

    def __init__(self, folder: Path, meta: dict, manifest_path: Path | None, signature: list[int] | None) -> None:
        self.folder, self.meta = folder, meta
        self.manifest_path, self.signature = manifest_path, signature
        self._manifest: Manifest | None = None

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> ManifestCache:
        """The cache of the manifest file ``path`` (or URL), built first if there is none (or a broken one)."""
        path = Path(local_manifest(path, cache_dir=cache_dir))
        check_file(path)
        real = path.resolve()
        root = cache_root(cache_dir) / f"v{CACHE_FORMAT}"
        signature = stat_signature(real)
        record = root / "by-path" / f"{_digest(str(real))}.json"
        known = _read_json(record)
        if known and known.get("signature") == signature and isinstance(known.get("content"), str):
            folder = root / known["content"]
            meta = _read_json(folder / "meta.json")
            if _is_whole(folder, meta, content=known["content"]):
                return cls(folder, meta, path, signature)
        try:
            for sub in ("by-path", "locks"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cache_error(root, exc, "create folders") from None
        try:
            with _locked(root / "locks" / f"{_digest(str(real))}.lock"):
                return cls._open_locked(path, real, root, record)
        except OSError as exc:
            raise _cache_error(root, exc, f"build the cache of manifest {path}") from None

    @classmethod
    def _open_locked(cls, path: Path, real: Path, root: Path, record: Path) -> ManifestCache:
        signature = stat_signature(real)
        known = _read_json(record)
        if known and known.get("signature") == signature and isinstance(known.get("content"), str):
            content = known["content"]
        else:
            content = file_digest(real)
            if stat_signature(real) != signature:
                raise ManifestError(f"manifest {path} changed while it was read; open it again once it is written")
        folder = root / content
        meta = _read_json(folder / "meta.json")
        if not _is_whole(folder, meta, content=content):
            built = root / f".build-{content}-{os.getpid()}-{time.monotonic_ns()}"
            built.mkdir()
            try:
                _build_columns(real, built, content)
                _install(built, folder)
            finally:
                shutil.rmtree(built, ignore_errors=True)
            meta = _read_json(folder / "meta.json")
        _write_json(record, {"signature": signature, "content": content, "path": str(real)})
        return cls(folder, meta, path, signature)

    @classmethod
    def at(
        cls, folder: str | os.PathLike, *, manifest_path: str | None = None, signature: list | None = None
    ) -> ManifestCache:
        """The cache in ``folder`` (as a loader's worker processes reopen it); a ManifestError if it is gone
        or broken, or if ``manifest_path`` no longer has the content it was built from."""
        folder = Path(folder)
        meta = _read_json(folder / "meta.json")
        if not _is_whole(folder, meta, content=folder.name):
            raise ManifestError(
                f"the manifest cache {folder} was removed or damaged while a loader used it; keep the cache "
                f"folder while training (${CACHE_ENV} or --cache-dir moves it) and restart from your checkpoint"
            )
        path = Path(manifest_path) if manifest_path else None
        if path is not None and signature is not None:
            try:
                now = stat_signature(path.resolve())
            except OSError:
                now = None
            if now != signature and (now is None or file_digest(path.resolve()) != meta["content"]):
                raise ManifestError(
                    f"manifest {path} changed on disk after the loader was built ({meta['rows']} rows then); "
                    "a live loader never serves a rewritten manifest: build a new loader (or write to a new file)"
                )
        return cls(folder, meta, path, signature)

    # -- reading ----------------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        """A fixed-width column, memory-mapped: ``(N,)``."""
        return map_npy(self.folder / f"{name}.npy")

    def manifest(self) -> Manifest:
        """The manifest over the mapped columns (one per cache object)."""
        if self._manifest is None:
            n = int(self.meta["rows"])
            columns = self.meta["columns"]
            arrays: dict[str, pa.Array] = {}
            for name in columns:
                if name in _STRINGS:
                    arrays[name] = _string_array(self.folder, name, n)
                elif _is_location(name):
                    index = map_npy(self.folder / f"{name}.index.npy")
                    runs = _string_array(self.folder, f"{name}.runs", int(self.meta["runs"][name]))
                    valid = _map_bytes(self.folder / f"{name}.valid")
                    indices = pa.Array.from_buffers(pa.from_numpy_dtype(index.dtype), n, [valid, pa.py_buffer(index)])
                    # written and checked at the build: not validated again, which read every row's index
                    arrays[name] = pa.DictionaryArray.from_arrays(indices, runs, safe=False)
                else:
                    arrays[name] = pa.array(self.array(name))
            table = pa.table(arrays)
            self._manifest = Manifest.mapped(
                table, path=self.manifest_path, cache=self, heights=self.array("height"), widths=self.array("width")
            )
        return self._manifest

    def bucket_index(self, spec: BucketSpec) -> BucketIndex:
        """The rows grouped by ``spec``'s buckets, from ``buckets/<options digest>/`` (built if missing)."""
        options = json.dumps(spec.to_dict(), sort_keys=True)
        folder = self.folder / "buckets" / _digest(options)
        meta = _read_json(folder / "meta.json")
        if not _is_whole(folder, meta, options=options):
            root = self.folder.parent
            try:
                (self.folder / "buckets").mkdir(exist_ok=True)
                with _locked(root / "locks" / f"{self.folder.name}-{folder.name}.lock"):
                    meta = _read_json(folder / "meta.json")
                    if not _is_whole(folder, meta, options=options):
                        built = self.folder / "buckets" / f".build-{os.getpid()}-{time.monotonic_ns()}"
                        built.mkdir()
                        try:
                            _build_buckets(self, spec, options, built)
                            _install(built, folder)
                        finally:
                            shutil.rmtree(built, ignore_errors=True)
                        meta = _read_json(folder / "meta.json")
            except OSError as exc:
                raise _cache_error(root, exc, "build the bucket index") from None
        load = {name: map_npy(folder / f"{name}.npy") for name in ("bucket", "members", "starts")}
        return BucketIndex(
            sizes=np.load(folder / "sizes.npy"),
            num_base=int(meta["num_base"]),
            no_upscale=bool(meta["no_upscale"]),
            heights=self.array("height"),
            widths=self.array("width"),
            rejected_aspect=int(meta["rejected_aspect"]),
            rejected_too_small=int(meta["rejected_too_small"]),
            served_p99=meta.get("served_p99"),
            **load,
        )


def local_manifest(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> str | os.PathLike:
    """``path`` itself, or for a URL (``s3://bucket/m.parquet``) a local copy in the cache folder, fetched once per
    version of the object (its URL, size and modification time name the copy)."""
    from .storage import download, head, is_url

    if not is_url(path):
        return path
    from .errors import StorageError

    try:
        info = head(str(path))
        folder = cache_root(cache_dir) / f"v{CACHE_FORMAT}" / "remote"
        local = folder / f"{_digest(str(path))}-{info.size}-{info.mtime_ns}.parquet"
        if not local.exists():
            folder.mkdir(parents=True, exist_ok=True)
            download(str(path), local)
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    except OSError as exc:
        raise _cache_error(cache_root(cache_dir), exc, f"copy manifest {path}") from None
    return local


def bucket_index(manifest: Manifest, spec: BucketSpec) -> BucketIndex:
    """``manifest``'s rows grouped by ``spec``'s buckets: from its cache when it is mapped, else computed."""
    if manifest.cache is not None:
        return manifest.cache.bucket_index(spec)
    return BucketIndex.of(spec.assign(manifest.heights, manifest.widths))


class _RunsWriter:
    """Writes a column of locations (``source``, ``NAME.source``) as its runs of equal values: ``NAME.index.npy``
    (row -> run), ``NAME.valid`` and the runs as the string column ``NAME.runs`` (a shard path once per shard,
    not once per sample)."""

    def __init__(self, folder: Path, name: str, n: int) -> None:
        self.folder, self.name = folder, name
        self.runs = _StringWriter(folder, f"{name}.runs", n, nullable=False)
        self.index = np.lib.format.open_memmap(
            folder / f"{name}.index.npy", mode="w+", dtype=_index_type(n), shape=(n,)
        )
        self.valid = _BitWriter(folder / f"{name}.valid")
        self.count, self.last, self.row = 0, None, 0

    def append(self, column: pa.Array) -> None:
        import pyarrow.compute as pc

        source = column.cast(pa.large_string())
        present = source.is_valid().to_numpy(zero_copy_only=False)
        kept = source.filter(pa.array(present))  # runs are counted over the rows that have a source
        starts_run = np.ones(len(kept), bool)
        if len(kept) > 1:
            starts_run[1:] = pc.not_equal(kept[1:], kept[:-1]).to_numpy(zero_copy_only=False)
        if len(kept) and self.last is not None and kept[0].as_py() == self.last:
            starts_run[0] = False
        index = np.zeros(len(source), np.int64)
        index[present] = self.count - 1 + np.cumsum(starts_run)
        self.index[self.row : self.row + len(source)] = np.maximum(index, 0)
        new_runs = np.flatnonzero(starts_run)
        if len(new_runs):
            self.runs.append(kept.take(pa.array(new_runs)))
            self.count += len(new_runs)
        if len(kept):
            self.last = kept[len(kept) - 1].as_py()
        self.valid.append(present)
        self.row += len(source)

    def close(self) -> None:
        self.runs.close()
        self.valid.close()
        self.index.flush()
        del self.index

    def finish(self) -> None:
        """Cut the runs' offsets file (sized for n) to the runs found."""
        offsets_path = self.folder / f"{self.name}.runs.offsets.npy"
        offsets = np.load(offsets_path, mmap_mode="r")[: self.count + 1].copy()
        np.save(offsets_path, offsets)


def _is_location(name: str) -> bool:
    """Columns kept as runs of equal values: sources (a shard's path once per shard) and their ETags."""
    return name in ("source", "etag") or name.endswith(".source")


def _fixed_type(name: str) -> type | None:
    """The NumPy type of a fixed-width column (``height``, ``NAME.offset``, ...), or None."""
    return _FIXED.get(name.rpartition(".")[2])


def _build_columns(path: Path, folder: Path, content: str) -> None:
    """Convert the Parquet manifest at ``path`` into ``folder``, validating every row as ``Manifest`` does."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    names = parquet.schema_arrow.names
    n = parquet.metadata.num_rows
    try:
        pairs = pairs_of(parquet.schema_arrow)
    except Exception as exc:
        raise ManifestError(f"manifest {path}: {exc}") from None
    base = [c for c in ("key", "height", "width", "caption", "source", "offset", "length") if c in names]
    base += [c for c in ("mtime_ns", "source_size", "etag") if c in names]  # what the loader checks a source by
    columns = base + [c for name in pairs for c in pair_columns(name)]
    fingerprint = Fingerprint(pinned_columns(pairs), n)
    fixed = {
        c: np.lib.format.open_memmap(folder / f"{c}.npy", mode="w+", dtype=_fixed_type(c), shape=(n,))
        for c in columns
        if _fixed_type(c) is not None
    }
    strings = {c: _StringWriter(folder, c, n) for c in columns if c in _STRINGS}
    locations = {c: _RunsWriter(folder, c, n) for c in columns if _is_location(c)}
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=BUILD_ROWS, columns=columns):
            table = pa.Table.from_batches([batch]).replace_schema_metadata(parquet.schema_arrow.metadata)
            m = Manifest(table, path=path)  # validates: types, sizes, offsets, lengths, pairs
            fingerprint.update(batch)
            count = batch.num_rows
            for name, out in fixed.items():
                column = m.table.column(name)
                fill = _FILL.get(name.rpartition(".")[2])
                if fill is not None:
                    column = column.fill_null(fill)
                try:
                    values = column.cast(pa.from_numpy_dtype(_fixed_type(name))).to_numpy()
                except pa.ArrowInvalid:
                    raise ManifestError(
                        f"manifest {path}: column {name!r} holds values beyond {_fixed_type(name).__name__}"
                    ) from None
                out[row : row + count] = values
            for name, writer in strings.items():
                writer.append(m.table.column(name).combine_chunks())
            for name, writer in locations.items():
                writer.append(m.table.column(name).combine_chunks())
            row += count
    finally:
        for out in fixed.values():
            out.flush()
        fixed.clear()
        for writer in [*strings.values(), *locations.values()]:
            writer.close()
    for writer in locations.values():
        writer.finish()
    meta = {
        "format": CACHE_FORMAT,
        "content": content,
        "rows": n,
        "columns": columns,
        "pairs": pairs,
        "pinned": fingerprint.hexdigest(),
        "runs": {name: writer.count for name, writer in locations.items()},
        "built_from": str(path),
        "files": _files_of(folder),
    }
    _write_json(folder / "meta.json", meta)


def _served_p99(cache: ManifestCache, rows: np.ndarray) -> dict[str, float | None]:
    """:func:`~dali_arb.buckets.served_p99` of ``rows`` (what a loader sizes its buffers by), computed here once
    per node so that no rank reads every row's value at start-up."""
    lengths = np.asarray(cache.array("length"))[rows] if "length" in cache.meta["columns"] else np.empty(0)
    return served_p99(np.asarray(cache.array("height"))[rows], np.asarray(cache.array("width"))[rows], lengths)


def _build_buckets(cache: ManifestCache, spec: BucketSpec, options: str, folder: Path) -> None:
    index = BucketIndex.of(spec.assign(cache.array("height"), cache.array("width")))
    for name in ("bucket", "members", "starts", "sizes"):
        np.save(folder / f"{name}.npy", getattr(index, name))
    meta = {
        "format": CACHE_FORMAT,
        "options": options,
        "num_base": index.num_base,
        "no_upscale": index.no_upscale,
        "rejected_aspect": index.rejected_aspect,
        "rejected_too_small": index.rejected_too_small,
        "served_p99": _served_p99(cache, index.members),
        "files": _files_of(folder),
    }
    _write_json(folder / "meta.json", meta)
