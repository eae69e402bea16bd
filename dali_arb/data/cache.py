"""The data plane: what every process of a node reads about a manifest, built once and memory-mapped.

A manifest is converted, the first time any process opens it, into flat column files in a cache folder
named by the digest of the manifest file's bytes (a manifest in parts, :mod:`dali_arb.data.parts`: the digest of its
parts' fingerprints, once each part is hashed and found to match; its parts are read one after the other, never
concatenated); every process after that (every rank, every worker)
maps those files, so a node holds one copy of each page, shared, and no process holds a per-row Python
object or a private per-row array. Per bucket options, the rows grouped by bucket (the planner's
:class:`~dali_arb.plan.buckets.BucketIndex`) are cached beside them.

Where the cache lives: the ``cache_dir`` argument (``--cache-dir``), else ``$DALI_ARB_CACHE``, else
``$XDG_CACHE_HOME/dali_arb``, else ``~/.cache/dali_arb``. Layout under it::

    v4/<content digest>/meta.json              what was built, from which file, each file's size and CRC-32,
                                                each string column's null count, sealed by a digest of it all
                       /.verified.json          this boot's id and every file's stat signature, once hashed
                       /<column>.npy            fixed-width columns (height, width, offset, length, mtime_ns,
                                                source_size; original_width and original_height, 0 where
                                                unknown, when the manifest has them)
                       /<column>.offsets.npy    string columns: int64 (n + 1) byte offsets,
                       /<column>.bytes           the UTF-8 bytes, and
                       /<column>.valid           a validity bitmap (Arrow's bit order)
                       /source.index.npy        source (each pair's NAME.source, and etag): int32 row -> run
                                                of equal values (shards), the runs as a string column
                       /buckets/<options digest>/  bucket.npy members.npy starts.npy sizes.npy meta.json
    v4/by-path/<path digest>.json              stat signature -> content digest (skips re-hashing)
    v4/remote/<url digest>-<version digest>.parquet  a URL manifest's local copy, per ETag, size, Last-Modified
    v4/locks/                                  one hasher per manifest path, one builder per content

Every folder is built under a temporary name (``.build-<key>-<pid>-<random>``, with ordinary writes, so a full
disk is ENOSPC, never SIGBUS) and renamed into place, so a reader sees a whole cache or none. Builders lock per
content (copies, hardlinks and a URL's local twin build once), an installed sound cache is never replaced, and
build folders of dead builders are removed by the next build. A cache whose files do not hold the bytes its
``meta.json`` records (sizes at every open, CRC-32 once per boot: :func:`_verified`), or of another format, is
rebuilt; a folder that cannot be written gives one line saying where to point the cache instead. Temporary files
are created exclusively (``O_EXCL``: never written through a link planted at their name).

Imports the standard library, NumPy, pyarrow, ``errors``, ``plan.buckets`` and, in ``data/``, ``manifest``,
``pairs`` and ``cachefolder`` (where the cache lives; the local copy of a URL manifest, which imports ``storage`` and
obstore when a URL is opened). The manifest never imports this module: it is registered as what
:meth:`Manifest.open <dali_arb.data.manifest.Manifest.open>` maps through (:func:`~dali_arb.data.manifest.set_mapper`,
when ``dali_arb.data`` is imported).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ManifestError
from ..plan.buckets import (
    REJECT_ASPECT,
    REJECT_MIN_SIZE,
    REJECT_TOO_SMALL,
    SERVED_PERCENTILE,
    BucketIndex,
    BucketSpec,
    index_dtype,
)
from .cachefolder import CACHE_ENV, CACHE_FORMAT, cache_root, local_manifest
from .cachefolder import cache_error as _cache_error
from .cachefolder import text_digest as _digest
from .manifest import NO_IDENTITY, ORIGINAL, Fingerprint, Manifest, check_file, pinned_columns, set_mapper
from .pairs import pair_columns, pairs_of
from .parts import INDEX_NAME, ManifestParts, file_fingerprint, local_copy, read_index

__all__ = [
    "CACHE_ENV",
    "CACHE_FORMAT",
    "ManifestCache",
    "bucket_index",
    "cache_root",
    "local_manifest",
    "open_manifest",
]

#: Rows converted per step while building (a multiple of 8: validity bitmaps are written per step).
BUILD_ROWS = 1 << 20
#: Rows assigned to buckets per step while the bucket index is built: what sets its peak memory, about 60 B per row
#: of NumPy temporaries (``BucketSpec.assign``'s int64 sides, float64 aspects, masks), so about 65 MB by default over
#: the process's own (``benchmarks/RESULTS.md``: 4M rows a step peaked 180 MB higher, no faster); the row count only
#: adds a few bytes per chunk.
BUCKET_ROWS = 1 << 20
_FIXED = {"height": np.int32, "width": np.int32, "offset": np.int64, "length": np.int64, "mtime_ns": np.int64,
          "source_size": np.int64, "original_width": np.int32, "original_height": np.int32,
          "frames": np.int32, "fps": np.float64, "duration": np.float64}  # fmt: skip
_FILL = {
    "offset": 0,
    "length": -1,
    "mtime_ns": NO_IDENTITY,
    "source_size": NO_IDENTITY,
    "original_width": 0,  # (no original size: the row's own)
    "original_height": 0,
    "frames": -1,
    "fps": float("nan"),
    "duration": float("nan"),
}  # (videos: -1 frames and NaN rates for images)
_STRINGS = ("key", "caption")
_HASH_CHUNK = 8 << 20
_VERIFIED = ".verified.json"  # the marker of a folder hashed on this boot
_BUILD, _STALE = ".build-", ".stale-"


def _index_type(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


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


def _parts_of(real: Path) -> ManifestParts | None:
    """The index of the manifest in parts at the local folder ``real`` (checked: every part there with its size), or
    None for a manifest file."""
    return read_index(real) if real.is_dir() and (real / INDEX_NAME).is_file() else None


def manifest_signature(real: Path) -> list:
    """:func:`stat_signature` of a manifest file; of a manifest in parts, its index's and every part's (a list each)."""
    listing = _parts_of(real)
    if listing is None:
        return stat_signature(real)
    return [stat_signature(real / INDEX_NAME), *(stat_signature(Path(p)) for p in listing.part_paths())]


def manifest_content(real: Path) -> str:
    """What a manifest's cache is keyed by: the digest of a file's bytes; for a manifest in parts, the digest of its
    parts' fingerprints (:attr:`~dali_arb.data.parts.ManifestParts.content`), once every part is hashed and found to
    hold the bytes its index records (a ManifestError naming the first that does not)."""
    listing = _parts_of(real)
    if listing is None:
        return file_digest(real)
    for part, path in zip(listing.parts, listing.part_paths()):
        if file_fingerprint(path) != part.fingerprint:
            raise ManifestError(
                f"manifest {real}: part {part.path} does not hold the bytes its index {INDEX_NAME} records; it was "
                "rewritten after the index was written: rebuild the manifest with `dali-arb index`"
            )
    return listing.content


def boot_id() -> str:
    """This boot of this machine (Linux's ``boot_id``); ``"unknown"`` where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _open_lock(lock_path: Path) -> int:
    return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (created); where locks are unsupported, no lock: the atomic
    renames keep the cache whole anyway."""
    import fcntl

    try:
        fd = _open_lock(lock_path)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield  # a read-only cache: nothing can be built in it, its whole folders are only verified
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _content_lock(root: Path, content: str) -> Path:
    return root / "locks" / f"content-{content}.lock"


def _lock_is_free(lock_path: Path) -> bool:
    """Whether nobody holds ``lock_path`` now (False where locks are unsupported: then nobody can tell)."""
    import fcntl

    try:
        fd = _open_lock(lock_path)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically, through a temporary file created exclusively (never through a link
    planted at its name) and removed on failure."""
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, sort_keys=True))
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _files_of(folder: Path) -> dict[str, int]:
    """Sizes of the files a cache folder holds (not its ``meta.json``, nor hidden ones such as its marker)."""
    return {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "meta.json" and not p.name.startswith(".")
    }


def file_crc(path: Path) -> str:
    """CRC-32 of a file's bytes, read in chunks: what detects a cache file damaged in place (4x blake2b's speed;
    no adversary is assumed, as who may write the files may write their ``meta.json``)."""
    import zlib

    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _digests_of(folder: Path, names: list[str]) -> dict[str, str]:
    """:func:`file_crc` of the files ``names`` of ``folder``, in threads (zlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(file_crc, [folder / name for name in names])))


def _seal(meta: dict) -> str:
    return _digest(json.dumps({k: v for k, v in meta.items() if k != "seal"}, sort_keys=True))


def _write_meta(folder: Path, meta: dict) -> None:
    """``meta.json`` of a built folder: ``meta`` plus every file's size and digest, sealed by a digest of it all;
    and the marker saying that the files were hashed on this boot."""
    meta = {**meta, "files": _files_of(folder)}
    meta["digests"] = _digests_of(folder, list(meta["files"]))
    meta["seal"] = _seal(meta)
    _write_json(folder / "meta.json", meta)
    _mark_verified(folder)


def _is_whole(folder: Path, meta: dict | None, **expected: Any) -> bool:
    """Whether ``folder`` holds the complete cache ``meta`` describes, with ``expected`` meta values: its format,
    seal and file sizes (cheap: a stat per file). Content is :func:`_verified`."""
    if meta is None or meta.get("format") != CACHE_FORMAT or any(meta.get(k) != v for k, v in expected.items()):
        return False
    if meta.get("seal") != _seal(meta) or not all(isinstance(meta.get(k), dict) for k in ("files", "digests")):
        return False
    try:
        return _files_of(folder) == meta.get("files") and meta["digests"].keys() == meta["files"].keys()
    except OSError:
        return False


def _signatures(folder: Path) -> dict[str, list[int]] | None:
    try:
        return {name: stat_signature(folder / name) for name in [*_files_of(folder), "meta.json"]}
    except OSError:
        return None


def _mark_verified(folder: Path) -> None:
    """Record that ``folder``'s files were hashed on this boot, with their stat signatures (skipped where the
    folder is read-only: each open hashes then)."""
    with contextlib.suppress(OSError):
        _write_json(folder / _VERIFIED, {"boot": boot_id(), "files": _signatures(folder)})


def _verified(folder: Path, meta: dict, *, hash_files: bool = True) -> bool:
    """Whether the files of the whole folder ``folder`` hold the bytes ``meta`` records.

    Hashing every file reads the whole cache (4M rows: 456 MB, 0.18 s on 2 cores with a warm page cache; 100M rows:
    about 11 GB, seconds, and every page read from disk), too much for every rank start, so a folder is hashed once
    per boot: the marker records this boot and every file's stat signature (size, mtime,
    ctime, inode), and is trusted while all match (a write of any kind moves ctime, which no user can set back). On
    another boot (a crash can leave renamed files unwritten) it is hashed again. With ``hash_files`` False, a
    missing or stale marker is only reported (the caller hashes under its lock, once for all processes)."""
    marker = _read_json(folder / _VERIFIED)
    if marker is not None and marker.get("boot") == boot_id() and marker.get("files") == _signatures(folder):
        return True
    if not hash_files:
        return False
    try:
        if _digests_of(folder, list(meta["files"])) != meta["digests"]:
            return False
    except OSError:
        return False
    _mark_verified(folder)
    return True


def _is_sound(folder: Path, meta: dict | None, *, hash_files: bool = True, **expected: Any) -> bool:
    """:func:`_is_whole` and :func:`_verified`."""
    return _is_whole(folder, meta, **expected) and _verified(folder, meta, hash_files=hash_files)


def _new_build(parent: Path, key: str) -> Path:
    """A new, empty folder ``parent/.build-KEY-PID-RANDOM`` (created exclusively) to build into."""
    built = parent / f"{_BUILD}{key}-{os.getpid()}-{secrets.token_hex(4)}"
    built.mkdir()
    return built


def _sweep(parent: Path, key: str, lock_of: Callable[[str], Path]) -> None:
    """Remove what dead builders left in ``parent``: every build folder of ``key`` (the caller holds its lock, so
    none is in progress), those of other keys whose lock nobody holds, and every replaced (``.stale-``) folder."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if entry.name.startswith(_STALE):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(_BUILD):
                other = entry.name[len(_BUILD) :].partition("-")[0]
                if other == key or (other and _lock_is_free(lock_of(other))):
                    shutil.rmtree(entry, ignore_errors=True)


def _install(built: Path, final: Path, **expected: Any) -> None:
    """Rename the folder ``built`` into place as ``final``. A sound folder already there (another builder of the
    same content installed it) is kept and ``built`` dropped: an installed whole cache is never replaced, as
    processes map it; a broken one is renamed away first (processes mapping its files keep them)."""
    if final.exists():
        if _is_sound(final, _read_json(final / "meta.json"), **expected):
            shutil.rmtree(built, ignore_errors=True)
            return
        stale = final.with_name(f"{_STALE}{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
        with contextlib.suppress(OSError):
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(built, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(built, ignore_errors=True)  # installed meanwhile by a builder that holds no lock


class _NpyWriter:
    """Writes a 1-D ``.npy`` file with ordinary sequential writes, so that a full disk is ENOSPC at a write, never
    SIGBUS at a page fault of a mapping. With ``n`` None the length is known at the end only: the values go to a
    side file, copied behind the header at :meth:`close`."""

    def __init__(self, path: Path, dtype: type, n: int | None) -> None:
        self.path, self.dtype, self.n, self.rows = path, np.dtype(dtype), n, 0
        self.file = open(path if n is not None else path.with_name(f".{path.name}.values"), "xb")
        if n is not None:
            self._header(self.file, n)

    def _header(self, fh: Any, n: int) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        np.lib.format.write_array_header_1_0(fh, header)

    def append(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.rows += len(values)

    def close(self) -> None:
        self.file.close()
        if self.n is None:
            values = self.path.with_name(f".{self.path.name}.values")
            with open(self.path, "xb") as out, open(values, "rb") as src:
                self._header(out, self.rows)
                shutil.copyfileobj(src, out, _HASH_CHUNK)
            values.unlink()
        elif self.rows != self.n:
            raise RuntimeError(f"bug: {self.path.name} got {self.rows} values for {self.n} rows")

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


class _BitWriter:
    """Writes booleans as a bitmap in Arrow's bit order, whatever the lengths of the pieces appended."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "xb")
        self.carry = np.zeros(0, bool)

    def append(self, bits: np.ndarray) -> None:
        bits = np.concatenate([self.carry, bits])
        whole = len(bits) // 8 * 8
        self.file.write(np.packbits(bits[:whole], bitorder="little").tobytes())
        self.carry = bits[whole:]

    def close(self) -> None:
        self.file.write(np.packbits(self.carry, bitorder="little").tobytes())
        self.file.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


class _StringWriter:
    """Writes a string column as ``NAME.offsets.npy`` (int64, n + 1), ``NAME.bytes`` and, when ``nullable``,
    ``NAME.valid``."""

    def __init__(self, folder: Path, name: str, n: int | None, *, nullable: bool = True) -> None:
        self.offsets = _NpyWriter(folder / f"{name}.offsets.npy", np.int64, None if n is None else n + 1)
        self.offsets.append(np.zeros(1, np.int64))
        self.data = open(folder / f"{name}.bytes", "xb")
        self.valid = _BitWriter(folder / f"{name}.valid") if nullable else None
        self.row = 0
        self.size = 0
        self.nulls = 0

    def append(self, column: pa.Array) -> None:
        column = column.cast(pa.large_string())
        n = len(column)
        offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + n + 1]
        if column.buffers()[2] is not None and n:
            self.data.write(memoryview(column.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
        self.offsets.append(self.size + offsets[1:] - offsets[0])
        self.size += int(offsets[-1] - offsets[0])
        if self.valid is not None:
            self.valid.append(column.is_valid().to_numpy(zero_copy_only=False))
        self.nulls += column.null_count
        self.row += n

    def close(self) -> None:
        self.offsets.close()
        self.data.close()
        if self.valid is not None:
            self.valid.close()

    def abort(self) -> None:
        for writer in (self.offsets, self.valid):
            if writer is not None:
                writer.abort()
        with contextlib.suppress(OSError):
            self.data.close()


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


def _string_array(folder: Path, name: str, n: int, nulls: int = -1) -> pa.Array:
    """A ``large_string`` array over the mapped files of column ``name`` (no copy); ``nulls``: its null count, -1
    where the cache's meta does not record it (Arrow then counts them, reading every page of its validity bitmap)."""
    offsets = map_npy(folder / f"{name}.offsets.npy")
    data = _map_bytes(folder / f"{name}.bytes")
    valid = _map_bytes(folder / f"{name}.valid") if (folder / f"{name}.valid").exists() else None
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), data, valid, null_count=nulls)


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
        path = Path(local_copy(path, cache_dir=cache_dir))  # (a manifest in parts: its local folder)
        if _parts_of(path) is None:
            check_file(path)
        real = path.resolve()
        root = cache_root(cache_dir) / f"v{CACHE_FORMAT}"
        signature = manifest_signature(real)
        record = root / "by-path" / f"{_digest(str(real))}.json"
        known = _read_json(record)
        if known and known.get("signature") == signature and isinstance(known.get("content"), str):
            folder = root / known["content"]
            meta = _read_json(folder / "meta.json")
            if _is_sound(folder, meta, hash_files=False, content=known["content"]):
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
        signature = manifest_signature(real)
        known = _read_json(record)
        if known and known.get("signature") == signature and isinstance(known.get("content"), str):
            content = known["content"]
        else:
            content = manifest_content(real)
            if manifest_signature(real) != signature:
                raise ManifestError(f"manifest {path} changed while it was read; open it again once it is written")
        folder = root / content
        with _locked(_content_lock(root, content)):  # one builder per content, whatever path it came by
            meta = _read_json(folder / "meta.json")
            if not _is_sound(folder, meta, content=content):
                _sweep(root, content, lambda other: _content_lock(root, other))
                built = _new_build(root, content)
                try:
                    _build_columns(real, built, content)
                    _install(built, folder, content=content)
                finally:
                    shutil.rmtree(built, ignore_errors=True)
                meta = _read_json(folder / "meta.json")
        with contextlib.suppress(OSError):  # only spares the next open a hash: a read-only cache works without
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
        if not _is_sound(folder, meta, content=folder.name):
            raise ManifestError(
                f"the manifest cache {folder} was removed or damaged while a loader used it; keep the cache "
                f"folder while training (${CACHE_ENV} or --cache-dir moves it) and restart from your checkpoint"
            )
        path = Path(manifest_path) if manifest_path else None
        if path is not None and signature is not None:
            try:
                now = manifest_signature(path.resolve())
            except (OSError, ManifestError):
                now = None
            if now != signature and (now is None or _content_or_none(path.resolve()) != meta["content"]):
                raise ManifestError(
                    f"manifest {path} changed on disk after the loader was built ({meta['rows']} rows then); "
                    "a live loader never serves a rewritten manifest: build a new loader (or write to a new file)"
                )
        return cls(folder, meta, path, signature)

    def _buckets_lock(self, options_digest: str) -> Path:
        return self.folder.parent / "locks" / f"{self.folder.name}-{options_digest}.lock"

    # -- reading ----------------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        """A fixed-width column, memory-mapped: ``(N,)``."""
        return map_npy(self.folder / f"{name}.npy")

    def manifest(self) -> Manifest:
        """The manifest over the mapped columns (one per cache object). Their null counts come from the meta: Arrow
        would count them, reading every page of each validity bitmap (0.5 B a row for four columns, held in RSS)."""
        if self._manifest is None:
            n = int(self.meta["rows"])
            columns = self.meta["columns"]
            nulls = self.meta.get("nulls", {})  # (absent from caches built before it was recorded)
            arrays: dict[str, pa.Array] = {}
            for name in columns:
                if name in _STRINGS:
                    arrays[name] = _string_array(self.folder, name, n, nulls.get(name, -1))
                elif _is_location(name):
                    index = map_npy(self.folder / f"{name}.index.npy")
                    runs = _string_array(self.folder, f"{name}.runs", int(self.meta["runs"][name]))
                    valid = _map_bytes(self.folder / f"{name}.valid")
                    indices = pa.Array.from_buffers(
                        pa.from_numpy_dtype(index.dtype),
                        n,
                        [valid, pa.py_buffer(index)],
                        null_count=nulls.get(name, -1),
                    )
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
        if not _is_sound(folder, meta, hash_files=False, options=options):
            root = self.folder.parent
            try:
                (self.folder / "buckets").mkdir(exist_ok=True)
                with _locked(self._buckets_lock(folder.name)):
                    meta = _read_json(folder / "meta.json")
                    if not _is_sound(folder, meta, options=options):
                        _sweep(folder.parent, folder.name, self._buckets_lock)
                        built = _new_build(folder.parent, folder.name)
                        try:
                            _build_buckets(self, spec, options, built)
                            _install(built, folder, options=options)
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
            rejected_min_size=int(meta.get("rejected_min_size", 0)),
            served_p99=meta.get("served_p99"),
            **load,
        )


def _content_or_none(real: Path) -> str | None:
    try:
        return manifest_content(real)
    except (OSError, ManifestError):
        return None


def bucket_index(manifest: Manifest, spec: BucketSpec) -> BucketIndex:
    """``manifest``'s rows grouped by ``spec``'s buckets: from its cache when it is mapped, else computed."""
    if manifest.cache is not None:
        return manifest.cache.bucket_index(spec)
    return BucketIndex.of(spec.assign(manifest.heights, manifest.widths))


def open_manifest(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Manifest:
    """The manifest at ``path`` (a file or URL), memory-mapped from the node's cache (built on first use, keyed by
    the file's content): what :meth:`Manifest.open <dali_arb.data.manifest.Manifest.open>` returns."""
    return ManifestCache.open(path, cache_dir=cache_dir).manifest()


set_mapper(open_manifest)  # Manifest.open maps through the node cache (the manifest module never imports it)


class _RunsWriter:
    """Writes a column of locations (``source``, ``NAME.source``) as its runs of equal values: ``NAME.index.npy``
    (row -> run), ``NAME.valid`` and the runs as the string column ``NAME.runs`` (a shard path once per shard,
    not once per sample; how many is known at the end)."""

    def __init__(self, folder: Path, name: str, n: int) -> None:
        self.folder, self.name = folder, name
        self.runs = _StringWriter(folder, f"{name}.runs", None, nullable=False)
        self.index = _NpyWriter(folder / f"{name}.index.npy", _index_type(n), n)
        self.valid = _BitWriter(folder / f"{name}.valid")
        self.count, self.last, self.row, self.nulls = 0, None, 0, 0

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
        self.index.append(np.maximum(index, 0))
        new_runs = np.flatnonzero(starts_run)
        if len(new_runs):
            self.runs.append(kept.take(pa.array(new_runs)))
            self.count += len(new_runs)
        if len(kept):
            self.last = kept[len(kept) - 1].as_py()
        self.valid.append(present)
        self.nulls += len(source) - int(np.count_nonzero(present))
        self.row += len(source)

    def close(self) -> None:
        self.runs.close()
        self.valid.close()
        self.index.close()

    def abort(self) -> None:
        for writer in (self.runs, self.valid, self.index):
            writer.abort()


def _is_location(name: str) -> bool:
    """Columns kept as runs of equal values: sources (a shard's path once per shard) and their ETags."""
    return name in ("source", "etag") or name.endswith(".source")


def _fixed_type(name: str) -> type | None:
    """The NumPy type of a fixed-width column (``height``, ``NAME.offset``, ...), or None."""
    return _FIXED.get(name.rpartition(".")[2])


def _open_parts(path: Path) -> tuple[list[tuple[Path, pa.Schema]], pa.Schema, int]:
    """The Parquet files of the manifest at ``path`` (itself; the parts of a manifest in parts, each with the rows its
    index records) with their schemas, their unified schema and total rows. Only footers are read: no file is held
    open (a reader keeps buffers until it is closed, so holding every part's would grow with the parts)."""
    listing = _parts_of(path)
    files = [path] if listing is None else [Path(p) for p in listing.part_paths()]
    opened = []
    rows = 0
    for i, file in enumerate(files):
        if listing is not None:
            check_file(file)
        try:
            footer = pq.read_metadata(file)
            schema = footer.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"cannot read manifest {file}: {exc}") from None
        if listing is not None and footer.num_rows != listing.parts[i].rows:
            raise ManifestError(
                f"manifest {path}: part {listing.parts[i].path} holds {footer.num_rows} rows, its index "
                f"records {listing.parts[i].rows}; rebuild the manifest"
            )
        opened.append((file, schema))
        rows += footer.num_rows
    if not opened:
        from .manifest import SCHEMA

        return [], SCHEMA, 0
    try:
        unified = pa.unify_schemas([schema for _, schema in opened], promote_options="permissive")
    except (pa.ArrowException, ValueError) as exc:
        raise ManifestError(f"the parts of manifest {path} have columns that do not agree: {exc}") from None
    return opened, unified, rows


def _batches(opened: list[tuple[Path, pa.Schema]], columns: list[str], schema: pa.Schema) -> Iterator[tuple]:
    """``(file, table)`` of at most :data:`BUILD_ROWS` rows of ``columns``, file after file (one open at a time); a
    column a part lacks is null there."""
    for file, own in opened:
        names = own.names
        try:
            parquet = pq.ParquetFile(file, pre_buffer=False)  # (pre-buffering keeps every row group read: grows)
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"cannot read manifest {file}: {exc}") from None
        with parquet:
            for batch in parquet.iter_batches(batch_size=BUILD_ROWS, columns=[c for c in columns if c in names]):
                table = pa.Table.from_batches([batch])
                for name in columns:
                    if name not in names:
                        field = schema.field(name)
                        table = table.append_column(field, pa.nulls(batch.num_rows, field.type))
                yield file, table.select(columns).replace_schema_metadata(own.metadata)


def _build_columns(path: Path, folder: Path, content: str) -> None:
    """Convert the manifest at ``path`` (a Parquet file, or the folder of a manifest in parts: its parts, read in
    turn, never concatenated) into ``folder``, :data:`BUILD_ROWS` rows at a time, validating every row as
    ``Manifest`` does."""
    opened, schema, n = _open_parts(path)
    names = schema.names
    try:
        pairs = pairs_of(schema)
        for file, own in opened:
            if pairs_of(own) != pairs:
                raise ManifestError(f"part {file} has other paired images than the manifest's first part; rebuild it")
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(f"manifest {path}: {exc}") from None
    base = [c for c in ("key", "height", "width", "caption", "source", "offset", "length") if c in names]
    base += [c for c in ("mtime_ns", "source_size", "etag") if c in names]  # what the loader checks a source by
    base += [c for c in ("frames", "fps", "duration") if c in names]  # what the planner cuts clips from (videos)
    base += [c for c in ORIGINAL.names if c in names]  # the sizes before resizing (SDXL's original_size)
    columns = base + [c for name in pairs for c in pair_columns(name)]
    fingerprint = Fingerprint(pinned_columns(pairs), n)
    fixed = {c: _NpyWriter(folder / f"{c}.npy", _fixed_type(c), n) for c in columns if _fixed_type(c) is not None}
    strings = {c: _StringWriter(folder, c, n) for c in columns if c in _STRINGS}
    locations = {c: _RunsWriter(folder, c, n) for c in columns if _is_location(c)}
    writers: list[Any] = [*fixed.values(), *strings.values(), *locations.values()]
    row = 0
    try:
        for file, table in _batches(opened, columns, schema):
            m = Manifest(table, path=file)  # validates: types, sizes, offsets, lengths, pairs
            for batch in table.to_batches():
                fingerprint.update(batch)
            count = table.num_rows
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
                out.append(values)
            for name, writer in strings.items():
                writer.append(m.table.column(name).combine_chunks())
            for name, writer in locations.items():
                writer.append(m.table.column(name).combine_chunks())
            row += count
    except BaseException:
        for writer in writers:
            writer.abort()  # the build folder is removed
        raise
    for writer in writers:
        writer.close()
    meta = {
        "format": CACHE_FORMAT,
        "content": content,
        "rows": n,
        "columns": columns,
        "pairs": pairs,
        "pinned": fingerprint.hexdigest(),
        "runs": {name: writer.count for name, writer in locations.items()},
        "nulls": {name: writer.nulls for name, writer in {**strings, **locations}.items()},
        "built_from": str(path),
    }
    _write_meta(folder, meta)


def _read_rows(path: Path, start: int, count: int) -> np.ndarray:
    """Rows ``start .. start + count`` of the 1-D ``.npy`` file at ``path``, read into memory (not mapped: the pages
    of a mapping stay in the process's RSS once touched, so a build that maps whole columns grows with the rows)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        count = max(0, min(count, shape[0] - start))
        fh.seek(fh.tell() + start * dtype.itemsize)
        values = np.fromfile(fh, dtype, count)
    if len(values) != count:
        raise ManifestError(f"the cache file {path} is shorter than its header says; it is rebuilt at the next open")
    return values


class _ValueCounts:
    """How many times each value occurs, over values fed in chunks (``int64 (V,)`` values and counts, sorted): memory
    set by the distinct values fed, so only fed values of a bounded range (:class:`_Percentile`'s refinement)."""

    def __init__(self) -> None:
        self.values = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)

    def add(self, values: np.ndarray) -> None:
        new, counts = np.unique(np.asarray(values, np.int64), return_counts=True)
        merged = np.concatenate([self.values, new])
        weights = np.concatenate([self.counts, counts])
        self.values, at = np.unique(merged, return_inverse=True)
        self.counts = np.bincount(at, weights=weights, minlength=len(self.values)).astype(np.int64)

    def at(self, rank: int) -> int:
        """The value at ``rank`` (from 0) of the values fed, sorted."""
        return int(self.values[np.searchsorted(np.cumsum(self.counts), rank, side="right")])


#: :class:`_Percentile`'s bins: a value below ``2 ** (_MANTISSA + 1)`` is a bin of its own; above, a bin spans
#: ``2 ** shift`` values, its top ``_MANTISSA + 1`` bits (under 1/1024 of the value). Every int64 fits in _BINS.
_MANTISSA = 10
_EXACT_BINS = 1 << (_MANTISSA + 1)
_BINS = ((63 - _MANTISSA - 1) << _MANTISSA) + _EXACT_BINS  # 55,296
_SLICE = 1 << 18  # values binned at a time


def _bin_of(values: np.ndarray) -> np.ndarray:
    """:class:`_Percentile`'s bin of each of ``values`` (``int64 (n,)``, all >= 1): ``int64 (n,)``, ascending with
    the value."""
    _, bits = np.frexp(values.astype(np.float64))  # the bit length, one too many where float64 rounded up
    bits = bits.astype(np.int64)
    bits -= (values >> (bits - 1)) == 0
    shift = np.maximum(bits - (_MANTISSA + 1), 0)
    return (shift << _MANTISSA) + (values >> shift)


class _Percentile:
    """``np.percentile(all values, q)`` (linear interpolation) of the positive values of a column fed in chunks,
    exact, in memory independent of the number and spread of the values (an encoded length is nearly unique per
    image: keeping every distinct value grew with the rows). :meth:`add` counts the values per bin (``int64
    (_BINS,)``, 442 KB); the two sorted positions the percentile needs then fall in one or two bins; where those are
    wider than one value, :meth:`refine` is fed the values again and keeps only theirs (at most ``2 ** shift``
    distinct values each, under 1/1024 of the value: 1024 for lengths of about 1 MB)."""

    def __init__(self, q: float) -> None:
        self.q = q
        self.histogram = np.zeros(_BINS, np.int64)
        self.inside = _ValueCounts()
        self.bins: tuple[int, int] | None = None

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (``(n,)``; those <= 0 are unknown: skipped)."""
        for lo in range(0, len(values), _SLICE):  # (slices: the temporaries stay small whatever the chunk)
            piece = np.asarray(values[lo : lo + _SLICE], np.int64)
            self.histogram += np.bincount(_bin_of(piece[piece > 0]), minlength=_BINS)

    def _positions(self) -> tuple[int, int, float]:
        position = (int(self.histogram.sum()) - 1) * self.q / 100
        below = int(np.floor(position))
        return below, int(np.ceil(position)), position - below

    def needs_values(self) -> bool:
        """Whether the sorted positions fall in bins wider than one value (then feed :meth:`refine` every value
        again); call after the last :meth:`add`."""
        if not self.histogram.any():
            return False
        below, above, _ = self._positions()
        ends = np.cumsum(self.histogram)
        low, high = (int(np.searchsorted(ends, rank, side="right")) for rank in (below, above))
        self.bins = (low, high)
        return high >= _EXACT_BINS

    def refine(self, values: np.ndarray) -> None:
        """Keep the values (``(n,)``, any of the column) that fall in the bins :meth:`needs_values` found."""
        if self.bins is None:
            raise AssertionError("bug: _Percentile.refine before needs_values")
        for lo in range(0, len(values), _SLICE):
            piece = np.asarray(values[lo : lo + _SLICE], np.int64)
            piece = piece[piece > 0]
            bins = _bin_of(piece)
            self.inside.add(piece[(bins >= self.bins[0]) & (bins <= self.bins[1])])

    def value(self) -> float | None:
        """The percentile, or None for no values; after :meth:`refine` saw every value where :meth:`needs_values`
        said so."""
        if not self.histogram.any():
            return None
        if self.bins is None:
            self.needs_values()
        below, above, fraction = self._positions()
        before = int(self.histogram[: self.bins[0]].sum())  # values in bins under the first found
        low, high = (
            bin_ if bin_ < _EXACT_BINS else self.inside.at(rank - before)
            for bin_, rank in zip(self.bins, (below, above))
        )
        return float(np.percentile([float(low), float(high)], fraction * 100))


def _release_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc's ``malloc_trim``; nothing elsewhere) between chunks of
    the bucket index build. Not what bounds its peak (each chunk's arrays dying with the chunk do: with them, 40M rows
    peak at 307 MB with and 308 MB without it), but what a process that goes on to train holds after the build."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _build_buckets(cache: ManifestCache, spec: BucketSpec, options: str, folder: Path) -> None:
    """The rows grouped by ``spec``'s buckets, out of core, equal to ``BucketIndex.of(spec.assign(heights, widths))``
    (rows ascending inside each bucket). :data:`BUCKET_ROWS` rows at a time are assigned, their bucket ids written to a
    scratch file and counted; then, bucket by bucket numbered as a whole assignment numbers them (with
    ``no_upscale``, the scaled-down copies a chunk uses are numbered per chunk), each chunk's ids are written to
    ``bucket.npy`` and its usable rows straight to their places in ``members.npy``. Peak memory is set by
    :data:`BUCKET_ROWS`, not by the row count: each chunk's arrays live in a function of their own
    (:func:`_assign_chunk`, :func:`_place_members`), so none outlives its chunk (one that did, freed while the next
    chunk's were made, moved glibc's heap up by a chunk's worth each time; the peak grew with the rows)."""
    n = int(cache.meta["rows"])
    first = spec.assign(np.zeros(0, np.int64), np.zeros(0, np.int64))
    base = [tuple(size) for size in first.sizes.tolist()]
    tally = _Tally(counts=dict.fromkeys(base, 0), has_length="length" in cache.meta["columns"])
    scratch = folder / ".bucket.scratch.npy"
    writer = _NpyWriter(scratch, np.int32, n)
    try:
        for lo in range(0, n, BUCKET_ROWS):
            _assign_chunk(cache.folder, spec, lo, writer, tally)
            _release_freed_memory()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    # the base buckets, then the scaled-down copies in use, sorted (as one assignment of every row numbers them)
    final = base + sorted(size for size in tally.counts if size not in set(base))
    number = {size: k for k, size in enumerate(final)}
    dtype = np.dtype(index_dtype(len(final)))
    starts = np.concatenate([[0], np.cumsum([tally.counts[size] for size in final])]).astype(np.int64)
    # per chunk, its own bucket ids -> the final ones (its last entry maps -1 to -1): (chunks, K of the chunk + 1)
    table_of = {sizes: np.array([number[size] for size in sizes] + [-1], np.int64) for sizes in tally.kinds}
    tables = [table_of[sizes] for sizes in tally.chunk_sizes]  # (one array per distinct list of sizes)
    refine = {name: served for name, served in tally.served.items() if served.needs_values()}
    _write_buckets(scratch, tables, folder, starts, n, dtype, _Refiner(cache.folder, refine))
    scratch.unlink()
    with open(folder / "starts.npy", "xb") as fh:
        np.save(fh, starts)
    with open(folder / "sizes.npy", "xb") as fh:
        np.save(fh, np.array(final, np.int64).reshape(-1, 2))
    p99 = {name: served.value() for name, served in tally.served.items()}
    meta = {
        "format": CACHE_FORMAT,
        "options": options,
        "num_base": first.num_base,
        "no_upscale": first.no_upscale,
        "rejected_aspect": tally.rejected[REJECT_ASPECT],
        "rejected_too_small": tally.rejected[REJECT_TOO_SMALL],
        "rejected_min_size": tally.rejected[REJECT_MIN_SIZE],
        "served_p99": p99,
    }
    _write_meta(folder, meta)


@dataclass
class _Tally:
    """What the bucket index build keeps across chunks: nothing per row. ``counts``: rows per bucket size;
    ``chunk_sizes``: each chunk's bucket sizes by its own ids (``no_upscale`` numbers its scaled-down copies per
    chunk), one tuple per distinct list (``kinds``), so a pointer per chunk; rows rejected per reason; the served
    sides' and lengths' percentiles (:class:`_Percentile`)."""

    counts: dict[tuple[int, int], int]
    has_length: bool
    chunk_sizes: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    kinds: dict[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] = field(default_factory=dict)
    rejected: dict[int, int] = field(
        default_factory=lambda: dict.fromkeys((REJECT_ASPECT, REJECT_TOO_SMALL, REJECT_MIN_SIZE), 0)
    )
    served: dict[str, _Percentile] = field(
        default_factory=lambda: {name: _Percentile(SERVED_PERCENTILE) for name in ("height", "width", "length")}
    )


def _assign_chunk(columns: Path, spec: BucketSpec, lo: int, writer: _NpyWriter, tally: _Tally) -> None:
    """Assign rows ``lo .. lo + BUCKET_ROWS`` of the cache folder ``columns``: their bucket ids (by the chunk's own
    numbering) appended to ``writer``, their counts, rejects and served sizes added to ``tally``. Every array it
    makes is freed when it returns."""
    heights = _read_rows(columns / "height.npy", lo, BUCKET_ROWS)
    widths = _read_rows(columns / "width.npy", lo, BUCKET_ROWS)
    assignment = spec.assign(heights, widths)
    sizes = [tuple(size) for size in assignment.sizes.tolist()]
    kind = tuple(sizes)
    tally.chunk_sizes.append(tally.kinds.setdefault(kind, kind))  # (chunks with the same sizes share one tuple)
    writer.append(assignment.bucket)
    usable = assignment.bucket >= 0
    for k, count in enumerate(np.bincount(assignment.bucket[usable], minlength=len(sizes)).tolist()):
        tally.counts[sizes[k]] = tally.counts.get(sizes[k], 0) + count
    for code in tally.rejected:
        tally.rejected[code] += assignment.rejected(code)
    del assignment
    tally.served["height"].add(heights[usable])
    tally.served["width"].add(widths[usable])
    if tally.has_length:
        tally.served["length"].add(_read_rows(columns / "length.npy", lo, BUCKET_ROWS)[usable])  # (known: > 0)


@dataclass(frozen=True)
class _Refiner:
    """The percentiles (by column name) whose positions fell in wide bins: fed each chunk's usable rows of their
    column in the cache folder ``columns`` again (:meth:`_Percentile.refine`)."""

    columns: Path
    percentiles: dict[str, _Percentile]

    def feed(self, lo: int, usable: np.ndarray) -> None:
        """Rows ``lo + usable`` (``usable``: ``int64 (u,)`` of the chunk starting at row ``lo``)."""
        for name, percentile in self.percentiles.items():
            percentile.refine(_read_rows(self.columns / f"{name}.npy", lo, BUCKET_ROWS)[usable])


def _write_buckets(
    scratch: Path,
    tables: list[np.ndarray],
    folder: Path,
    starts: np.ndarray,
    n: int,
    dtype: np.dtype,
    refiner: _Refiner,
) -> None:
    """``bucket.npy`` (``(N,)`` of ``dtype``) from the chunks of bucket ids in ``scratch`` (``int32 (N,)``, each
    chunk of :data:`BUCKET_ROWS` numbered by its own ids, mapped to the final ones by ``tables[chunk]``), and
    ``members.npy``: the usable rows grouped by bucket (``starts``: ``int64 (K + 1,)``), ascending inside each, each
    chunk's rows of bucket ``k`` written at bucket ``k``'s next free place (``os.pwrite``: ordinary writes, so a
    full disk is ENOSPC, never SIGBUS). Each chunk's usable rows feed ``refiner``."""
    member_type = np.dtype(np.int32 if n < 2**31 else np.int64)
    total = int(starts[-1])
    buckets = _NpyWriter(folder / "bucket.npy", dtype, n)
    with open(folder / "members.npy", "xb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(member_type), "fortran_order": False, "shape": (total,)}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.flush()
        base = fh.tell()
        cursor = starts[:-1].copy()  # (K,) next free place of each bucket
        for chunk, lo in enumerate(range(0, n, BUCKET_ROWS)):
            usable = _place_members(scratch, tables[chunk], lo, buckets, fh.fileno(), base, cursor, member_type)
            refiner.feed(lo, usable)
            del usable
            _release_freed_memory()
        buckets.close()
        if not np.array_equal(cursor, starts[1:]):
            raise AssertionError("bug: the members written do not fill their buckets")
        fh.truncate(base + total * member_type.itemsize)


def _place_members(
    scratch: Path,
    table: np.ndarray,
    lo: int,
    buckets: _NpyWriter,
    members: int,
    base: int,
    cursor: np.ndarray,
    member_type: np.dtype,
) -> np.ndarray:
    """One chunk of :func:`_write_buckets`: rows ``lo .. lo + BUCKET_ROWS``' final bucket ids appended to
    ``buckets``, their usable rows written into the open file ``members`` (bytes of row ``i`` at ``base + i *
    itemsize``) at each bucket's ``cursor`` (``int64 (K,)``, advanced). Returns the chunk's usable rows (``int64
    (u,)``, from 0); every other array it makes is freed when it returns."""
    bucket = table[_read_rows(scratch, lo, BUCKET_ROWS)].astype(buckets.dtype)
    buckets.append(bucket)
    usable = np.flatnonzero(bucket >= 0)
    order = np.argsort(bucket[usable], kind="stable")
    rows = (usable[order] + lo).astype(member_type)
    chunk_counts = np.bincount(bucket[usable], minlength=len(cursor))
    offset = 0
    for k in np.flatnonzero(chunk_counts).tolist():
        piece = rows[offset : offset + chunk_counts[k]]
        os.pwrite(members, piece.tobytes(), base + int(cursor[k]) * member_type.itemsize)
        cursor[k] += chunk_counts[k]
        offset += chunk_counts[k]
    return usable
