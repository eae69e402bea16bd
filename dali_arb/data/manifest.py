"""The manifest: one Parquet row per sample, and the rejects file beside it.

Columns (CONTRACT.md): ``key`` (unique string), ``width``, ``height`` (displayed, EXIF-upright),
``caption`` (may be null), and where the bytes are: ``source`` (file or tar shard path),
``offset`` and ``length`` (bytes inside ``source``; ``length`` -1 means the whole file), ``mtime_ns``
(the source's modification time). The indexer adds the rest of the source's identity (:data:`IDENTITY`).

:meth:`Manifest.open` maps a manifest through the node cache (:mod:`dali_arb.data.cache`), which is built from
manifests and so imports this module, never the other way: the cache registers itself here (:func:`set_mapper`) when
``dali_arb.data`` is imported, and a mapped manifest holds its cache as a :class:`MappedColumns`.

Imports the standard library, NumPy, pyarrow, ``errors``, ``plan.rows`` and, in ``data/``, ``pairs`` and
``cachefolder`` (a URL manifest's local copy: ``storage`` and obstore, only when a URL is read). A manifest in parts
(a folder with ``_manifest.json``) is read by :mod:`dali_arb.data.parts`, registered here (:func:`set_parts_reader`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, ManifestError
from ..plan.rows import GlobalRows
from .cachefolder import local_manifest
from .pairs import pair_columns, pairs_of

__all__ = [
    "FORMAT_VERSION",
    "IDENTITY",
    "NO_IDENTITY",
    "ORIGINAL",
    "PINNED_COLUMNS",
    "VIDEO",
    "Fingerprint",
    "Manifest",
    "ManifestSet",
    "MappedColumns",
    "check_file",
    "pinned_columns",
    "rejects_name",
    "rejects_path",
    "set_mapper",
    "set_parts_reader",
]

#: Written into the Parquet metadata; bumped when the manifest layout changes incompatibly.
FORMAT_VERSION = 1
_VERSION_KEY = b"dali_arb.format"
REQUIRED = ("key", "width", "height")
#: Columns whose content pins what a loader serves (see ``Manifest.fingerprint``).
PINNED_COLUMNS = ("width", "height", "source", "offset", "length")
#: No image sample is larger (a length beyond it is a damaged or hand-edited manifest).
MAX_SAMPLE_BYTES = 2**31

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("mtime_ns", pa.int64()),
    ],
    metadata={_VERSION_KEY: str(FORMAT_VERSION).encode()},
)

#: Columns the indexer writes after :data:`SCHEMA`'s: with ``mtime_ns``, the identity of a sample's ``source`` (the
#: file, the tar shard or the object) when it was indexed. ``ctime_ns``: a local file's status-change time (for
#: ``index --update`` only: a copy or ``chmod`` changes it too); ``source_size``: the whole source's size in bytes;
#: ``etag``: the object's (strong) ETag in object storage. Null or absent where unknown (metadata without paths,
#: a metadata row's ``ctime_ns``, older manifests): then not checked. The loader refuses a sample whose source's
#: size, ``mtime_ns`` (local) or ETag (storage) differs from these.
IDENTITY = pa.schema([("ctime_ns", pa.int64()), ("source_size", pa.int64()), ("etag", pa.string())])
#: Columns of a manifest whose sources gave each image's size before it was resized (img2dataset's
#: ``original_width``/``original_height``, from its metadata or the Parquet beside its shards): what SDXL's
#: ``original_size`` is. Written only when some row has them (an image-only manifest without them has none), after
#: the identity and pair columns and before :data:`VIDEO`'s. A row whose values are null, 0 or negative has none:
#: its original size is its ``width``/``height``. Kept as the source gives them (not turned by EXIF orientation).
ORIGINAL = pa.schema([("original_width", pa.int32()), ("original_height", pa.int32())])
#: Columns of a manifest that holds videos (an image-only manifest has none of them); a row is a video iff ``frames``
#: is not null. ``frames``: frame count (the header's where its index covers the file, else counted by demuxing);
#: ``fps``: average frame rate; ``duration``: seconds; ``codec``: FFmpeg's name (``h264``, ``vp9``, ``mjpeg``...);
#: ``vfr``: the frame rate varies; ``frame_times``: each frame's presentation time in seconds from the first, in
#: presentation order, only for ``vfr`` videos. ``width``/``height`` of a video are display-upright (rotation applied).
VIDEO = pa.schema(
    [
        ("frames", pa.int32()),
        ("fps", pa.float64()),
        ("duration", pa.float64()),
        ("codec", pa.string()),
        ("vfr", pa.bool_()),
        ("frame_times", pa.list_(pa.float32())),
    ]
)
#: What an unknown ``mtime_ns`` or ``source_size`` reads as (``Manifest.int_column``): never a real value.
NO_IDENTITY = -(2**63)


class MappedColumns(Protocol):
    """What a manifest mapped from a node cache holds of it (:class:`~dali_arb.data.cache.ManifestCache`)."""

    folder: Path  #: where its column files are (worker processes reopen them there)
    meta: dict  #: what was built: ``rows``, ``columns``, ``pinned`` fingerprint, ``pairs``, ``content``
    signature: list[int] | None  #: the manifest file's stat signature when it was opened

    def bucket_index(self, spec: Any) -> Any:
        """The rows grouped by ``spec``'s buckets (a :class:`~dali_arb.plan.buckets.BucketIndex`)."""


#: How :meth:`Manifest.read` reads a manifest in parts: ``reader(path, columns)``, a Manifest, or None where ``path`` is
#: not one; set by :mod:`dali_arb.data.parts` (which imports this module, never the other way) when imported.
_parts_reader: Callable[..., Manifest | None] | None = None


def set_parts_reader(reader: Callable[..., Manifest | None]) -> None:
    """Make ``reader(path, columns)`` what :meth:`Manifest.read` tries first (:mod:`dali_arb.data.parts` registers
    its ``read_manifest`` when imported, as ``dali_arb.data`` does)."""
    global _parts_reader
    _parts_reader = reader


#: How :meth:`Manifest.open` maps a manifest file: ``mapper(path, cache_dir=...)``; set by the node cache.
_mapper: Callable[..., Manifest] | None = None


def set_mapper(mapper: Callable[..., Manifest]) -> None:
    """Make ``mapper(path, *, cache_dir)`` what :meth:`Manifest.open` returns (:mod:`dali_arb.data.cache` registers
    its ``open_manifest`` when imported, as ``dali_arb.data`` does)."""
    global _mapper
    _mapper = mapper


def pinned_columns(pairs: dict[str, str] | list[str]) -> tuple[str, ...]:
    """:data:`PINNED_COLUMNS` and the columns of ``pairs``: what a live loader pins."""
    return PINNED_COLUMNS + tuple(c for name in pairs for c in pair_columns(name))


def rejects_path(manifest_path: str | os.PathLike) -> Path:
    """``MANIFEST.rejects.jsonl`` next to the manifest."""
    return Path(rejects_name(manifest_path))


def rejects_name(manifest: str | os.PathLike) -> str:
    """The rejects file of ``manifest`` (a path or a URL, whose ``//`` a ``Path`` would fold) as text."""
    return f"{manifest}.rejects.jsonl"


class Manifest:
    """A manifest table in memory.

    Attributes:
        table: the ``pyarrow.Table`` (``N`` rows).
        path: where it was read from, if anywhere.
    """

    def __init__(self, table: pa.Table, *, path: str | os.PathLike | None = None) -> None:
        where = f"manifest {path}" if path else "manifest"
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise ManifestError(
                f"{where} lacks column(s) {', '.join(missing)} (has: {', '.join(table.column_names)}); "
                "build it with `dali-arb index`"
            )
        for name in ("width", "height"):
            column = table.column(name)
            if not pa.types.is_integer(column.type):
                raise ManifestError(f"{where}: column {name!r} must hold integers, got {column.type}")
            if column.null_count:
                raise ManifestError(f"{where}: column {name!r} has {column.null_count} empty value(s)")
        for name in ("offset", "length", "mtime_ns", "source_size", *ORIGINAL.names):
            if name in table.column_names and not (
                pa.types.is_integer(table.column(name).type) or pa.types.is_null(table.column(name).type)
            ):
                what = " (byte positions)" if name in ("offset", "length") else ""
                raise ManifestError(
                    f"{where}: column {name!r} must hold integers{what}, got {table.column(name).type}; "
                    "rebuild the manifest with `dali-arb index`"
                )
        if "caption" in table.column_names:
            _check_captions(table.schema.field("caption").type, where)
        import pyarrow.compute as pc  # here, not at import: the core imports light

        if "length" in table.column_names and len(table):
            longest = pc.max(table.column("length")).as_py()
            if longest is not None and longest > MAX_SAMPLE_BYTES:
                raise ManifestError(
                    f"{where}: a sample's length is {longest} bytes, over the {MAX_SAMPLE_BYTES} an image may have; "
                    "the manifest was edited by hand or damaged: rebuild it with `dali-arb index`"
                )
        if "offset" in table.column_names and len(table):
            lowest = pc.min(table.column("offset")).as_py()
            if lowest is not None and lowest < 0:
                raise ManifestError(
                    f"{where}: a sample's offset is {lowest}; rebuild the manifest with `dali-arb index`"
                )
        try:
            pairs = pairs_of(table.schema)
        except ConfigError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        for name in pairs:
            for column_name in pair_columns(name)[3:]:
                column = table.column(column_name)
                if not pa.types.is_integer(column.type) or column.null_count:
                    raise ManifestError(
                        f"{where}: pair column {column_name!r} must hold a size for every row; rebuild it"
                    )
                if len(column) and pc.min(column).as_py() < 1:
                    raise ManifestError(f"{where}: pair column {column_name!r} holds a size below 1; rebuild it")
        if not (pa.types.is_string(table.column("key").type) or pa.types.is_large_string(table.column("key").type)):
            table = table.set_column(table.column_names.index("key"), "key", table.column("key").cast(pa.string()))
        self.table = table
        self.path = Path(path) if path else None
        self.pairs: dict[str, str] = pairs  # {name: "pair" | "mask"} (``pairs.py``)
        self.cache: MappedColumns | None = None  # the node cache this manifest is mapped from, if any
        self._fingerprints: dict[tuple[str, ...], str] = {}
        self._heights = table.column("height").to_numpy().astype(np.int64)
        self._widths = table.column("width").to_numpy().astype(np.int64)
        bad = np.flatnonzero((self._heights < 1) | (self._widths < 1))
        if bad.size:
            row = int(bad[0])
            raise ManifestError(
                f"{where}: {bad.size} row(s) with non-positive size, first key "
                f"{table.column('key')[row].as_py()!r} is {self._widths[row]}x{self._heights[row]}; "
                "fix or drop those rows"
            )

    @classmethod
    def read(cls, path: str | os.PathLike, *, columns: list[str] | None = None) -> Manifest:
        """Read and validate a manifest (a file or URL) into memory; ``columns`` limits what is loaded (``key``/
        ``width``/``height`` always are). :meth:`open` maps it instead, shared by every process of a node."""
        if _parts_reader is not None:
            parted = _parts_reader(path, columns)
            if parted is not None:
                return parted
        path = Path(local_manifest(path))
        schema = check_file(path)
        wanted = None
        if columns is not None:
            wanted = [c for c in dict.fromkeys([*REQUIRED, *columns]) if c in schema.names]
        try:
            table = pq.read_table(path, columns=wanted)
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"cannot read manifest {path}: {_first_line(exc)}") from None
        return cls(table, path=path)

    @classmethod
    def open(cls, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Manifest:
        """The manifest at ``path``, memory-mapped from the node's cache (built on first use, keyed by the
        file's content: :mod:`dali_arb.data.cache`, registered by :func:`set_mapper`). Every process that opens it
        shares one copy of its pages."""
        assert _mapper is not None, "importing dali_arb.data registers the node cache (dali_arb.data.cache)"
        return _mapper(path, cache_dir=cache_dir)

    @classmethod
    def mapped(
        cls, table: pa.Table, *, path: Path | None, cache: MappedColumns, heights: np.ndarray, widths: np.ndarray
    ) -> Manifest:
        """A manifest over a cache's memory-mapped columns (validated when the cache was built)."""
        manifest = cls.__new__(cls)
        manifest.table, manifest.path, manifest.cache = table, path, cache
        manifest._heights, manifest._widths = heights, widths
        manifest.pairs = dict(cache.meta.get("pairs", {}))
        manifest._fingerprints = {pinned_columns(manifest.pairs): cache.meta["pinned"]}
        return manifest

    def write(self, path: str | os.PathLike) -> None:
        """Write as Parquet with the format version in its metadata."""
        table = self.table.replace_schema_metadata(
            {**(self.table.schema.metadata or {}), _VERSION_KEY: str(FORMAT_VERSION).encode()}
        )
        pq.write_table(table, path, row_group_size=256 * 1024)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def heights(self) -> np.ndarray:
        """``(N,)`` displayed heights (``int64`` in memory, ``int32`` memory-mapped)."""
        return self._heights

    @property
    def widths(self) -> np.ndarray:
        """``(N,)`` displayed widths (``int64`` in memory, ``int32`` memory-mapped)."""
        return self._widths

    @property
    def keys(self) -> pa.ChunkedArray:
        """``(N,)`` sample keys (kept in Arrow: 10M keys need not be 10M Python strings)."""
        return self.table.column("key")

    def fingerprint(self, columns: tuple[str, ...]) -> str:
        """A digest of the content of ``columns`` (absent ones count as absent), independent of how
        the table is chunked: two manifests with equal digests serve the same bytes at the same rows."""
        if columns not in self._fingerprints:
            digest = Fingerprint(columns, len(self))
            for batch in self.table.to_batches():
                digest.update(batch)
            self._fingerprints[columns] = digest.hexdigest()
        return self._fingerprints[columns]

    @property
    def pinned(self) -> str:
        """The fingerprint of what a loader serves from this manifest (:func:`pinned_columns`)."""
        return self.fingerprint(pinned_columns(self.pairs))

    def int_column(self, name: str, missing: int) -> np.ndarray:
        """``int64 (N,)`` of integer column ``name``, ``missing`` where it is null or the column is absent
        (no copy when the column is one chunk of ``int64`` without nulls, as a mapped manifest's are)."""
        if name not in self.table.column_names:
            return np.full(len(self), missing, np.int64)
        column = self.table.column(name)
        if column.num_chunks == 1 and column.null_count == 0 and column.type == pa.int64():
            return column.chunk(0).to_numpy(zero_copy_only=True)
        return np.asarray(column.fill_null(missing).to_numpy(), np.int64)

    def original_sizes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(heights, widths)``, integer ``(N,)`` each, of the :data:`ORIGINAL` columns (0 where null), or None for a
        manifest without them. No copy for a mapped manifest's (``int32``, memory-mapped); a value below 1 means
        "the row's ``height``/``width``"."""
        names = self.table.column_names
        if not all(name in names for name in ORIGINAL.names):
            return None

        def values(name: str) -> np.ndarray:
            column = self.table.column(name)
            if column.num_chunks == 1 and column.null_count == 0 and pa.types.is_integer(column.type):
                return column.chunk(0).to_numpy(zero_copy_only=True)
            return np.asarray(column.cast(pa.int64()).fill_null(0).to_numpy(), np.int64)

        return values("original_height"), values("original_width")

    def video_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(frames int64 (N,), fps float64 (N,), duration float64 (N,))`` of the :data:`VIDEO` columns, what the
        planner cuts clips from: frames -1 and NaN rates for images (every row of an image-only manifest). A mapped
        manifest whose cache lacks them reads the three columns from its Parquet file (20 bytes a row)."""
        table = self.table
        names = [field.name for field in VIDEO][:3]
        if "frames" not in table.column_names and getattr(self, "path", None) is not None:
            try:
                schema = pq.read_schema(self.path)
                if "frames" in schema.names:
                    table = pq.read_table(self.path, columns=names)
            except (OSError, pa.ArrowInvalid) as exc:
                raise ManifestError(f"manifest {self.path}: cannot read its video columns ({exc})") from None
        if "frames" not in table.column_names:
            return np.full(len(self), -1, np.int64), np.full(len(self), np.nan), np.full(len(self), np.nan)
        frames = np.asarray(table.column("frames").fill_null(-1).to_numpy(), np.int64)
        rates = [np.asarray(table.column(n).cast(pa.float64()).fill_null(np.nan).to_numpy(), np.float64)
                 for n in ("fps", "duration")]  # fmt: skip
        return frames, rates[0], rates[1]

    def keys_at(self, rows: np.ndarray) -> list[str]:
        """Keys of ``rows`` (any shape, flattened), as Python strings."""
        return self.keys.take(pa.array(np.asarray(rows, dtype=np.int64).reshape(-1))).to_pylist()

    def column_at(self, name: str, rows: np.ndarray) -> list:
        """Values of column ``name`` at ``rows`` (flattened), ``None`` where the column is absent."""
        flat = np.asarray(rows, dtype=np.int64).reshape(-1)
        if name not in self.table.column_names:
            return [None] * len(flat)
        return self.table.column(name).take(pa.array(flat)).to_pylist()


class ManifestSet:
    """Several manifests addressed by *global* row: manifest ``d``'s row ``r`` is ``offsets[d] + r`` (one
    manifest: global rows are its rows; :class:`~dali_arb.plan.rows.GlobalRows`). What the loader reads per served
    row, without a per-row array.

    Attributes:
        manifests: the datasets, in order.
        rows: their global rows.
        offsets: ``int64 (D + 1,)`` first global row of each (``rows.offsets``).
        pairs: the paired images every manifest has (``{name: kind}``).
    """

    def __init__(self, manifests: list[Manifest]) -> None:
        self.manifests = list(manifests)
        first = self.manifests[0].pairs
        for m in self.manifests[1:]:
            if m.pairs != first:
                raise ManifestError(
                    f"manifests {self.manifests[0].path or '(in memory)'} and {m.path or '(in memory)'} have different "
                    f"paired images ({sorted(first.items()) or 'none'} and {sorted(m.pairs.items()) or 'none'}); every "
                    "dataset of one loader needs the same pairs (batch keys)"
                )
        self.rows = GlobalRows([len(m) for m in self.manifests])
        self.offsets = self.rows.offsets
        self.pairs = first

    def __len__(self) -> int:
        return len(self.rows)

    def dataset_of(self, rows: np.ndarray) -> np.ndarray:
        """``int64`` manifest of each global row (same shape)."""
        return self.rows.dataset_of(rows)

    def _gather(self, rows: np.ndarray, take) -> list:
        out: list = [None] * np.size(rows)
        for d, at, local in self.rows.by_dataset(rows):
            for i, value in zip(at.tolist(), take(self.manifests[d], local)):
                out[i] = value
        return out

    def keys_at(self, rows: np.ndarray) -> list[str]:
        """Keys of global ``rows`` (flattened)."""
        return self._gather(rows, lambda m, local: m.keys_at(local))

    def column_at(self, name: str, rows: np.ndarray) -> list:
        """Values of column ``name`` at global ``rows`` (flattened), ``None`` where a manifest lacks it."""
        return self._gather(rows, lambda m, local: m.column_at(name, local))

    def ints_at(self, name: str, rows: np.ndarray, missing: int) -> np.ndarray:
        """``int64 (n,)`` of integer column ``name`` (``heights``/``widths`` for the sizes) at global ``rows``
        (flattened to ``(n,)``)."""
        out = np.empty(np.size(rows), np.int64)
        for d, at, local in self.rows.by_dataset(rows):
            m = self.manifests[d]
            out[at] = getattr(m, name)[local] if name in ("heights", "widths") else m.int_column(name, missing)[local]
        return out


def check_file(path: Path) -> pa.Schema:
    """The schema of the manifest file at ``path``; a ManifestError saying what to do when it is not one
    this version reads."""
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}; build one with `dali-arb index SRC -o {path}`")
    if path.is_dir():
        raise ManifestError(
            f"manifest {path} is a folder with no _manifest.json: give the .parquet file `dali-arb index` wrote, or a "
            "folder written by `dali-arb index ... -o DIR/` (a manifest in parts)"
        )
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(
            f"{path} is not a Parquet manifest ({_first_line(exc)}); build one with `dali-arb index`"
        ) from None
    version = (schema.metadata or {}).get(_VERSION_KEY)
    if version is not None:
        try:
            number = int(version)
        except ValueError:
            number = -1
        if number < FORMAT_VERSION:
            raise ManifestError(
                f"manifest {path} was written by an older dali_arb (format {version.decode(errors='replace')}, "
                f"this version reads {FORMAT_VERSION}); rebuild it with `dali-arb index`"
            )
        if number > FORMAT_VERSION:
            raise ManifestError(
                f"manifest {path} was written by a newer dali_arb (format {number}, this version reads "
                f"{FORMAT_VERSION}); upgrade dali_arb"
            )
    if "caption" in schema.names:
        _check_captions(schema.field("caption").type, f"manifest {path}")
    return schema


def _check_captions(kind: pa.DataType, where: str) -> None:
    """A ManifestError unless a ``caption`` column of type ``kind`` holds text (or only nulls)."""
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ManifestError(
            f"{where}: column 'caption' holds {kind}, not text; write captions as UTF-8 strings (one per row, "
            "lines for several) or rebuild the manifest with `dali-arb index`"
        )


class Fingerprint:
    """The content digest of some columns, fed one record batch at a time (so a manifest of any size is
    digested in bounded memory, and chunking never changes the result).

    Per column: the validity of every row, its values (integers as ``int64``, nulls as 0; strings as
    their UTF-8 bytes) and, for strings, every value's length.
    """

    def __init__(self, columns: tuple[str, ...], num_rows: int) -> None:
        import hashlib

        self.columns, self.num_rows = columns, num_rows
        self._parts = {name: [hashlib.blake2b(digest_size=16) for _ in range(3)] for name in columns}
        self._present: set[str] = set()

    def update(self, batch: pa.RecordBatch) -> None:
        for name in self.columns:
            if name not in batch.schema.names:
                continue
            self._present.add(name)
            valid, values, lengths = self._parts[name]
            column = batch.column(name)
            valid.update(column.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
            if pa.types.is_integer(column.type):
                values.update(column.fill_null(0).to_numpy().astype(np.int64).tobytes())
                continue
            column = column.cast(pa.large_string())
            offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + len(column) + 1]
            lengths.update(np.diff(offsets).tobytes())
            if column.buffers()[2] is not None and len(column):
                values.update(memoryview(column.buffers()[2])[int(offsets[0]) : int(offsets[-1])])

    def hexdigest(self) -> str:
        import hashlib

        digest = hashlib.blake2b(digest_size=16)
        digest.update(str(self.num_rows).encode())
        for name in self.columns:
            digest.update(f"|{name}|".encode())
            if name in self._present:
                for part in self._parts[name]:
                    digest.update(part.digest())
        return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
