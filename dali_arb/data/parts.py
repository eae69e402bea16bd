"""A manifest in parts: a folder (or object-storage prefix) of Parquet parts plus a small index, ``_manifest.json``.

One Parquet file stops scaling past one machine: a cluster writes one part per task, and a node copies or maps parts
without one tens-of-GB file. The manifest's rows are the parts' rows, part after part, in the index's order.
Layout::

    DIR/_manifest.json                 the index (below), written last, atomically: a reader sees all parts or none
    DIR/<name>.parquet                 a part: manifest rows (``manifest.SCHEMA`` and the indexer's columns)
    DIR/<name>.rejects.jsonl           its rejects (JSON Lines, as ``MANIFEST.rejects.jsonl``), if any were given

The index (``INDEX_FORMAT`` 1)::

    {"format": "dali_arb.parts", "version": 1,
     "rows": 1234, "rejected": 5,                                  totals over the parts
     "parts": [{"path": "part-00000.parquet", "rows": 1000, "size": 81234,
                "fingerprint": "<blake2b-128 of the part file's bytes>",
                "rejects": "part-00000.rejects.jsonl", "rejected": 5,
                "unit": {"kind": "shard", "source": "/data/00000.tar",        optional: the indexing task it came
                         "identity": "<digest>", "dropped": 0, ...}}, ...],   from (what ``--update`` reuses it by)
     "extra": {...}}                                               what the writer adds (engine, sources...)

Paths are relative to the folder (``/``-separated, never ``..``). Every part and index is written under a private
temporary name and renamed into place (object storage: one atomic put each), so a crash leaves no half file. A part
that is missing, of another size or (when the node cache hashes it) of other bytes than its index records is a
:class:`~dali_arb.errors.ManifestError` naming it.

:meth:`Manifest.read <dali_arb.data.manifest.Manifest.read>` reads a manifest in parts through :func:`read_manifest`
(registered when this module is imported, as ``dali_arb.data`` does); the node cache (``cache.py``) maps the parts
directly, one after the other.

Imports the standard library, pyarrow, ``errors``, ``cachefolder``, ``manifest``; ``storage`` (object storage, with
obstore) only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import ManifestError, ObjectMissing, StorageError
from .cachefolder import CACHE_FORMAT, cache_root, local_manifest, text_digest
from .manifest import _VERSION_KEY, FORMAT_VERSION, REQUIRED, SCHEMA, Manifest, check_file, set_parts_reader

__all__ = [
    "INDEX_FORMAT",
    "INDEX_NAME",
    "ManifestParts",
    "PartInfo",
    "check_writable",
    "file_fingerprint",
    "is_parts",
    "local_copy",
    "local_parts",
    "read_index",
    "read_manifest",
    "remove_stale",
    "write_index",
    "write_part",
]

#: The index of a manifest in parts, in its folder or prefix.
INDEX_NAME = "_manifest.json"
#: The index's ``version``: bumped when its layout changes incompatibly.
INDEX_FORMAT = 1
_KIND = "dali_arb.parts"
#: Rows per Parquet row group of a part (as a single-file manifest).
PART_ROW_GROUP = 256 * 1024
_CHUNK = 8 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


@dataclass(frozen=True)
class PartInfo:
    """One part of a manifest in parts, as its index records it.

    Attributes:
        path: the part's Parquet file, relative to the manifest's folder (``part-00000.parquet``).
        rows: its rows.
        fingerprint: blake2b (128 bits, hex) of the part file's bytes (:func:`file_fingerprint`).
        rejects: its rejects file (JSON Lines), relative to the folder, or None.
        rejected: rejects in it.
        size: the part file's bytes (-1: not recorded).
        unit: the indexing task the part came from, as its indexer recorded it (``kind``, ``source``, ``identity``:
            a digest of its sources' sizes and times, ``dropped``: rows de-duplication took from it...), or None: what
            ``dali-arb index --update`` decides to keep the part by (``index/units.py``). Not part of its content.
    """

    path: str
    rows: int
    fingerprint: str
    rejects: str | None
    rejected: int
    size: int = -1
    unit: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.unit is None:
            del data["unit"]  # (an index without units reads as before)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> PartInfo:
        """A part from its index entry; a ManifestError naming ``where`` (the index) for a malformed one."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: a part entry is {type(data).__name__}, not an object; rewrite the index")
        try:
            info = cls(
                path=data["path"],
                rows=data["rows"],
                fingerprint=data["fingerprint"],
                rejects=data.get("rejects"),
                rejected=data.get("rejected", 0),
                size=data.get("size", -1),
                unit=data.get("unit"),
            )
        except KeyError as exc:
            raise ManifestError(f"{where}: a part entry lacks {exc.args[0]!r}; rewrite the index") from None
        if info.unit is not None and not isinstance(info.unit, dict):
            raise ManifestError(f"{where}: part {info.path!r} has unit {info.unit!r}, not an object; rewrite the index")
        for name in ("path", "fingerprint"):
            if not isinstance(getattr(info, name), str):
                raise ManifestError(f"{where}: part {name} {getattr(info, name)!r} is not text; rewrite the index")
        for name in ("rows", "rejected", "size"):
            value = getattr(info, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (-1 if name == "size" else 0):
                raise ManifestError(f"{where}: part {info.path!r} has {name} {value!r}; rewrite the index")
        for relative in (info.path, info.rejects):
            if relative is not None and not _is_relative(relative):
                raise ManifestError(
                    f"{where}: part path {relative!r} is not a path inside the manifest's folder; rewrite the index"
                )
        return info


@dataclass(frozen=True)
class ManifestParts:
    """A manifest in parts, as read from its index (:func:`read_index`).

    Attributes:
        location: the folder (a local path) or prefix URL (ending in ``/``) holding the index and the parts.
        parts: the parts, in row order.
        rows: total rows (the sum of the parts').
        rejected: total rejects.
        extra: what the writer recorded besides (``engine``, ``sources``...).
    """

    location: str
    parts: tuple[PartInfo, ...]
    rows: int
    rejected: int
    extra: dict = field(default_factory=dict)

    def join(self, relative: str) -> str:
        """The path or URL of ``relative`` (a part or rejects file) in :attr:`location`."""
        if _is_url(self.location):
            return self.location.rstrip("/") + "/" + relative
        return os.path.join(self.location, *relative.split("/"))

    @property
    def index(self) -> str:
        """Where the index is."""
        return self.join(INDEX_NAME)

    def part_paths(self) -> list[str]:
        """The parts' paths (or URLs), in row order."""
        return [self.join(p.path) for p in self.parts]

    def rejects_paths(self) -> list[str]:
        """The parts' rejects files (paths or URLs), for the parts that have one."""
        return [self.join(p.rejects) for p in self.parts if p.rejects]

    @property
    def content(self) -> str:
        """A digest of what the parts hold (their order, rows and fingerprints): equal for equal manifests wherever
        they are, whatever ``extra`` says. What the node cache is keyed by."""
        listed = [[p.path, p.rows, p.fingerprint] for p in self.parts]
        return text_digest(json.dumps({"kind": _KIND, "parts": listed}, sort_keys=True))

    def check_files(self) -> None:
        """A ManifestError naming the first local part that is missing or whose size differs from the index's."""
        if _is_url(self.location):
            return  # checked as each part is fetched (local_parts)
        for part in self.parts:
            path = self.join(part.path)
            try:
                size = os.stat(path).st_size
            except OSError:
                raise ManifestError(
                    f"manifest {self.location}: part {part.path} is missing; restore it or rebuild the manifest "
                    "with `dali-arb index`"
                ) from None
            if part.size >= 0 and size != part.size:
                raise ManifestError(
                    f"manifest {self.location}: part {part.path} has {size} bytes, its index {INDEX_NAME} records "
                    f"{part.size}; the part was changed after the index was written: rebuild the manifest"
                )


def _is_url(text: str | os.PathLike) -> bool:
    from .storage import is_url

    return is_url(str(text))


def _is_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and "\\" not in path and all(p not in ("", ".", "..") for p in parts)


def _location(location: str | os.PathLike) -> str:
    """The folder or prefix of ``location`` (a folder, a prefix, or the index itself): a local path without a
    trailing separator, or a URL ending in ``/``."""
    text = os.fspath(location)
    if _is_url(text):
        text = text[: -len(INDEX_NAME)] if text.endswith("/" + INDEX_NAME) else text
        return text.rstrip("/") + "/"
    path = Path(text)
    return str(path.parent if path.name == INDEX_NAME else path)


def is_parts(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a manifest in parts: a folder or object-storage prefix holding :data:`INDEX_NAME`, or
    that index itself. A ``.parquet`` name never is (no request is made for it)."""
    text = os.fspath(location)
    if _is_url(text):
        if text.rstrip("/").endswith(".parquet"):
            return False
        from .storage import exists

        try:
            return exists(_location(text) + INDEX_NAME)
        except StorageError:
            return False  # the caller's own read names the store's failure
    return os.path.isfile(os.path.join(_location(text), INDEX_NAME))


def file_fingerprint(path: str | os.PathLike) -> str:
    """blake2b (128 bits, hex) of a file's bytes, read in chunks: a part's content fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _local_target(folder: str, name: str):
    """A private temporary file to write ``name`` into; on success it is moved to ``folder/name`` (local) or uploaded
    to ``folder`` + ``name`` (object storage). Yields the temporary path; removed whatever happens."""
    remote = _is_url(folder)
    where = tempfile.gettempdir() if remote else folder
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=where)
    os.close(fd)
    try:
        yield Path(partial)
        if remote:
            from .storage import upload

            upload(partial, _location(folder) + name)
        else:
            os.chmod(partial, 0o644)
            os.replace(partial, os.path.join(folder, name))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)


def _checked_name(name: str) -> str:
    """``name`` as a part's file name (``.parquet`` added when absent); a ValueError echoing a bad one."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"a part name is letters, digits, '.', '_', '=' or '-' (not starting with '_' or '.'), got {name!r}"
        )
    return name if name.endswith(".parquet") else f"{name}.parquet"


def write_part(folder: str | os.PathLike, name: str, table: pa.Table, rejects: list[dict] | None = None) -> PartInfo:
    """Write ``table`` (manifest rows, validated as :class:`~dali_arb.data.manifest.Manifest` does) as the part
    ``folder/name.parquet`` and, when ``rejects`` is given, ``folder/name.rejects.jsonl`` (one JSON object per line),
    each atomically (a temporary file renamed into place; in object storage, one put). Overwrites a part of that name.

    Args:
        folder: an existing local folder, or an object-storage prefix (``s3://bucket/manifest/``).
        name: the part's name (``part-00003``; ``.parquet`` is added).
        table: ``(n,)`` rows; ``n`` may be 0.
        rejects: what was rejected while reading it (``{"source", "reason", ...}`` each), or None.
    Returns:
        its :class:`PartInfo`, to give to :func:`write_index`.
    """
    import pyarrow.parquet as pq

    file_name = _checked_name(name)
    folder = os.fspath(folder)
    if not _is_url(folder) and not os.path.isdir(folder):
        raise ManifestError(f"cannot write part {file_name}: folder {folder} does not exist; create it first")
    table = Manifest(table).table  # validates (types, sizes, offsets, pairs), as any manifest
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _VERSION_KEY: str(FORMAT_VERSION).encode()})
    with _local_target(folder, file_name) as partial:
        pq.write_table(table, partial, row_group_size=PART_ROW_GROUP)
        size, fingerprint = partial.stat().st_size, file_fingerprint(partial)
    rejects_file = None
    if rejects is not None:
        rejects_file = file_name[: -len(".parquet")] + ".rejects.jsonl"
        with _local_target(folder, rejects_file) as partial:
            with open(partial, "w", encoding="utf-8") as fh:
                for reject in rejects:
                    fh.write(json.dumps(reject, ensure_ascii=False) + "\n")
    return PartInfo(
        path=file_name,
        rows=table.num_rows,
        fingerprint=fingerprint,
        rejects=rejects_file,
        rejected=len(rejects or ()),
        size=size,
    )


def check_writable(prefix: str) -> None:
    """A StorageError, the store's own line (no bucket, access denied, no credentials), when nothing can be written
    under the object-storage ``prefix`` (ending in ``/``): a small object is put there and deleted, so a run that could
    not write its manifest stops before it reads its sources."""
    from .storage import delete, put_bytes

    probe = f"{prefix}.dali_arb-write-check-{os.getpid()}-{os.urandom(4).hex()}"
    put_bytes(probe, b"")
    with contextlib.suppress(StorageError):
        delete(probe)


def remove_stale(previous: ManifestParts | None, parts: Iterable[PartInfo]) -> None:
    """Delete the files of ``previous`` (the manifest's earlier index) that ``parts`` (its new one) no longer lists:
    parts and rejects files (in a local folder or an object-storage prefix; nothing to do without a previous index).
    Best effort: a file that cannot be deleted stays, unlisted."""
    if previous is None:
        return
    parts = list(parts)
    kept = {p.path for p in parts} | {p.rejects for p in parts if p.rejects}
    for gone in {p.path for p in previous.parts} | {p.rejects for p in previous.parts if p.rejects}:
        if gone not in kept:
            if _is_url(previous.location):
                from .storage import delete

                with contextlib.suppress(StorageError):
                    delete(previous.join(gone))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(previous.join(gone))


def write_index(folder: str | os.PathLike, parts: Iterable[PartInfo], *, extra: dict | None = None) -> Path | str:
    """Write the index of ``parts`` (in row order) into ``folder`` atomically, last, once every part is written:
    the manifest appears whole at once. Returns the index's path (a URL in object storage).

    ``extra`` (JSON-serialisable) is recorded as it is (the engine, the sources, options). A ValueError for a part
    named twice; a ManifestError for a local part that is not in ``folder`` with the size its PartInfo says."""
    parts = tuple(parts)
    folder = os.fspath(folder)
    names = [p.path for p in parts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"part {twice[0]!r} is listed twice; give each part once")
    for part in parts:
        if not isinstance(part, PartInfo):
            raise ValueError(f"parts must be PartInfo objects (from write_part), got {type(part).__name__}")
    listing = ManifestParts(
        location=_location(folder),
        parts=parts,
        rows=sum(p.rows for p in parts),
        rejected=sum(p.rejected for p in parts),
        extra=dict(extra or {}),
    )
    listing.check_files()
    document = {
        "format": _KIND,
        "version": INDEX_FORMAT,
        "rows": listing.rows,
        "rejected": listing.rejected,
        "parts": [p.to_dict() for p in parts],
        "extra": listing.extra,
    }
    try:
        text = json.dumps(document, indent=1, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serialisable: {exc}") from None
    with _local_target(folder, INDEX_NAME) as partial:
        partial.write_text(text + "\n", encoding="utf-8")
    return listing.index if _is_url(folder) else Path(listing.index)


def read_index(location: str | os.PathLike) -> ManifestParts:
    """The manifest in parts at ``location`` (its folder or prefix, or the index itself), with every local part
    checked to exist with its recorded size. A ManifestError saying what is wrong and what to do otherwise."""
    where = _location(location)
    index = where + INDEX_NAME if _is_url(where) else os.path.join(where, INDEX_NAME)
    try:
        if _is_url(where):
            from .storage import get_bytes

            raw = get_bytes(index)
        else:
            raw = Path(index).read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"manifest {where} has no index {INDEX_NAME}: not a manifest in parts (or its writer did not finish); "
            "build one with `dali-arb index SRC -o DIR/`"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read {index}: {exc.strerror or exc}") from None
    except ObjectMissing:
        raise ManifestError(
            f"manifest {where} has no index {INDEX_NAME}; build one with `dali-arb index SRC -o {where}`"
        ) from None
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest {where}: {exc}") from None
    return _parse_index(raw, where, index)


def _parse_index(raw: bytes, where: str, index: str) -> ManifestParts:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"{index} is not JSON ({exc}); rebuild the manifest with `dali-arb index`") from None
    if not isinstance(document, dict) or document.get("format") != _KIND:
        raise ManifestError(
            f"{index} is not the index of a dali_arb manifest in parts; rebuild it with `dali-arb index`"
        )
    version = document.get("version")
    if not isinstance(version, int) or version > INDEX_FORMAT:
        raise ManifestError(
            f"{index} was written by a newer dali_arb (index version {version!r}, this version reads {INDEX_FORMAT}); "
            "upgrade dali_arb"
        )
    if version < INDEX_FORMAT:
        raise ManifestError(f"{index} has index version {version}, this version reads {INDEX_FORMAT}; rebuild it")
    entries = document.get("parts")
    if not isinstance(entries, list):
        raise ManifestError(f"{index} lists no parts; rebuild the manifest with `dali-arb index`")
    parts = tuple(PartInfo.from_dict(entry, index) for entry in entries)
    listing = ManifestParts(
        location=where,
        parts=parts,
        rows=sum(p.rows for p in parts),
        rejected=sum(p.rejected for p in parts),
        extra=document.get("extra") if isinstance(document.get("extra"), dict) else {},
    )
    for name in ("rows", "rejected"):
        if document.get(name) != getattr(listing, name):
            raise ManifestError(
                f"{index} says {name} {document.get(name)!r} but its parts add up to {getattr(listing, name)}; "
                "the index was edited or damaged: rebuild the manifest"
            )
    listing.check_files()
    return listing


def local_parts(url: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local copy of the manifest in parts at the prefix ``url`` in the node's cache folder
    (``v<CACHE_FORMAT>/remote/<url digest>-<content digest>/``), fetched once per content: the index, then every part,
    each checked against its recorded size and fingerprint (rejects files are not copied). Whole or not at all."""
    import shutil

    from .cachefolder import cache_error
    from .storage import download

    listing = read_index(url)
    root = cache_root(cache_dir) / f"v{CACHE_FORMAT}" / "remote"
    local = root / f"{text_digest(listing.location)}-{listing.content}"
    if (local / INDEX_NAME).is_file():
        return local
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{local.name}.", suffix=".partial", dir=root))
    except OSError as exc:
        raise cache_error(cache_root(cache_dir), exc, f"copy manifest {url}") from None
    try:
        for part in listing.parts:
            target = building.joinpath(*part.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                download(listing.join(part.path), target)
            except StorageError as exc:
                raise ManifestError(f"cannot read part {part.path} of manifest {listing.location}: {exc}") from None
            if (part.size >= 0 and target.stat().st_size != part.size) or file_fingerprint(target) != part.fingerprint:
                raise ManifestError(
                    f"manifest {listing.location}: part {part.path} does not hold the bytes its index records; it "
                    "was rewritten after the index (or is being rewritten): open it again once written, or rebuild it"
                )
        document = {
            "format": _KIND,
            "version": INDEX_FORMAT,
            "rows": listing.rows,
            "rejected": 0,
            "parts": [{**p.to_dict(), "rejects": None, "rejected": 0} for p in listing.parts],
            "extra": {**listing.extra, "copied_from": listing.location},
        }
        (building / INDEX_NAME).write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        try:
            os.rename(building, local)
        except OSError:
            if not (local / INDEX_NAME).is_file():
                raise
    except OSError as exc:
        raise cache_error(cache_root(cache_dir), exc, f"copy manifest {url}") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return local


def local_copy(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> str | os.PathLike:
    """Where to read the manifest at ``path`` locally: a local path as it is (the folder, for the index of a manifest
    in parts), a prefix of parts in object storage copied (:func:`local_parts`), a manifest file at a URL copied
    (:func:`~dali_arb.data.cachefolder.local_manifest`)."""
    if _is_url(path):
        return (
            local_parts(str(path), cache_dir=cache_dir) if is_parts(path) else local_manifest(path, cache_dir=cache_dir)
        )
    if os.path.basename(os.fspath(path)) == INDEX_NAME and os.path.isfile(path):
        return Path(path).parent
    return path


def read_manifest(path: str | os.PathLike, columns: list[str] | None = None) -> Manifest | None:
    """The manifest in parts at ``path`` (a folder, prefix or index) read into memory, part after part (``columns``
    as :meth:`Manifest.read <dali_arb.data.manifest.Manifest.read>`); None where ``path`` is not one."""
    import pyarrow.parquet as pq

    if not is_parts(path):
        return None
    folder = Path(local_copy(path))
    listing = read_index(folder)
    tables = []
    for part in listing.part_paths():
        schema = check_file(Path(part))
        wanted = None if columns is None else [c for c in dict.fromkeys([*REQUIRED, *columns]) if c in schema.names]
        try:
            tables.append(pq.read_table(part, columns=wanted))
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"cannot read part {part} of manifest {folder}: {exc}") from None
    if not tables:
        return Manifest(SCHEMA.empty_table(), path=folder)
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowException, ValueError) as exc:
        raise ManifestError(
            f"the parts of manifest {folder} have columns that do not agree ({exc}); rebuild it"
        ) from None
    return Manifest(table, path=folder)


set_parts_reader(read_manifest)  # Manifest.read reads manifests in parts here (the manifest never imports this module)
