"""Webdataset tar shards: every sample's image member (its byte offset and length), caption, and header."""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from typing import Any, BinaryIO, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.imagefacts import inspect_image, jpeg_stored_size, jpeg_swaps_sides
from ..data.manifest import ORIGINAL
from ..data.storage.ranged import Seekable
from ..data.videofacts import inspect_video, is_video_name
from ..errors import IndexingError, StorageError
from .folders import FILE_ERRNOS, NOT_IMAGES, decode_caption, display_path, is_utf8
from .pairing import FolderListings, find_pairs
from .records import Reject, Row, original_sizes, whole_numbers

__all__ = [
    "LocalShard",
    "MemberFile",
    "OpenShard",
    "inspect_shard",
    "member_key",
    "shard_task",
    "sidecar_gives_original",
    "sidecar_metadata",
]

#: img2dataset's columns the sizes of a shard's samples are taken from (``caption`` too, where present).
SIDECAR_COLUMNS = ("key", "width", "height")
#: A JPEG's first bytes read to find its EXIF orientation where the Parquet sizes it (the Exif segment's first
#: entries: 1 KiB holds them after a JFIF or ICC segment of a few KB too); a longer look for the rare JPEG whose
#: earlier segments are longer.
EXIF_PROBE = 4 << 10
EXIF_MOST = 128 << 10
JPEG_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif")


def member_key(name: str) -> tuple[str, str, str] | None:
    """``(key, side, ext)`` of a tar member by the webdataset convention, or None for a hidden member.

    The key is the path up to the first dot of the base name; ``ext`` is the last dot-part (lower case,
    with its dot); ``side`` is what lies between (``"depth"`` in ``0000.depth.png``, ``""`` for the sample's
    own ``0000.jpg``). A leading ``./`` (``tar -C dir .``) is not part of the key; members whose path has a
    part starting with a dot (``.x.jpg``, ``._x.jpg``, ``.git/...``) are not samples.
    """
    path = posixpath.normpath(name.lstrip("/"))
    parts = path.split("/")
    if any(part.startswith(".") for part in parts):
        return None
    stem, dot, rest = parts[-1].partition(".")
    key = "/".join([*parts[:-1], stem])
    side, _, last = rest.rpartition(".")
    return key, side, ("." + last.lower() if dot else "")


def sidecar_metadata(shard: str) -> str | None:
    """img2dataset's per-shard Parquet beside a local ``shard`` (``00000.tar`` -> ``00000.parquet``) when it has
    :data:`SIDECAR_COLUMNS`, else None."""
    names = _sidecar_names(shard)
    return os.path.splitext(shard)[0] + ".parquet" if set(SIDECAR_COLUMNS) <= set(names) else None


def sidecar_gives_original(shard: str) -> bool:
    """Whether the per-shard Parquet beside ``shard`` (:func:`sidecar_metadata`) has the original-size columns."""
    names = set(_sidecar_names(shard))
    return set(SIDECAR_COLUMNS) <= names and set(ORIGINAL.names) <= names


def _sidecar_names(shard: str) -> list[str]:
    """The column names of the Parquet beside ``shard`` (none where there is none, or it cannot be read)."""
    path = os.path.splitext(shard)[0] + ".parquet"
    if not os.path.isfile(path):
        return []
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return []


def _sidecar_facts(path: str, max_pixels: int) -> tuple[dict[str, tuple], bool]:
    """``({key: (width, height, caption, original_width, original_height)}, has captions)`` of the usable rows of
    img2dataset's per-shard Parquet: ``status`` "success" (where the column exists), sizes whole numbers of at most
    ``max_pixels`` pixels. Other rows are left out: their samples are read from the shard as without the Parquet; so
    is a key the Parquet lists twice with different facts (neither can be trusted). The original sizes (the image's
    before img2dataset resized it) are read as metadata's are: None where the Parquet lacks them or a value is not a
    whole number from 1 to ``2**31 - 1`` (numbers or their text)."""
    names = pq.read_schema(path).names
    columns = [c for c in (*SIDECAR_COLUMNS, "caption", "status", *ORIGINAL.names) if c in names]
    table = pq.read_table(path, columns=columns)
    if "status" in names:
        table = table.filter(pc.fill_null(pc.equal(pc.cast(table.column("status"), pa.string()), "success"), False))
    facts: dict[str, tuple] = {}
    conflicting: set[str] = set()
    captions = table.column("caption").to_pylist() if "caption" in names else [None] * table.num_rows
    originals = _sidecar_originals(table, path)
    for key, width, height, caption, original in zip(
        pc.cast(table.column("key"), pa.string()).to_pylist(),
        table.column("width").to_pylist(),
        table.column("height").to_pylist(),
        captions,
        originals,
    ):
        whole = all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in (width, height))
        if key is None or not whole or not (0 < width < 2**31 and 0 < height < 2**31) or width * height > max_pixels:
            continue
        text = caption.strip() if isinstance(caption, str) else None
        fact = (int(width), int(height), text or None, *original)
        if facts.setdefault(key, fact) != fact:
            conflicting.add(key)
    for key in conflicting:
        del facts[key]
    return facts, "caption" in names


def _sidecar_originals(table: pa.Table, path: str) -> list[tuple[int | None, int | None]]:
    """``(original_width, original_height)`` of each row of the per-shard Parquet at ``path`` (None, None where not
    given), read as metadata reads them (:func:`~dali_arb.index.records.whole_numbers`); columns of another kind give none."""
    if not all(name in table.column_names for name in ORIGINAL.names):
        return [(None, None)] * table.num_rows
    try:
        sizes = [whole_numbers(table.column(name), name, path)[0] for name in ORIGINAL.names]
    except IndexingError:  # (dates, lists...: not sizes; the rows keep their own, as without the columns)
        return [(None, None)] * table.num_rows
    width, height = original_sizes(*sizes)
    return list(zip(width.to_pylist(), height.to_pylist()))


def shard_task(args: tuple) -> tuple[list[Row], list[Reject]]:
    """Inspect every sample of one local tar shard: ``(shard path, max_pixels, pairs[, sidecar])``
    (:func:`inspect_shard` on the shard open)."""
    shard, max_pixels, pairs, *rest = args
    sidecar = rest[0] if rest else None
    try:
        opened = LocalShard(shard)
    except OSError as exc:
        if exc.errno not in FILE_ERRNOS:  # the disk or the system (EIO, EMFILE): never a reject of good samples
            raise _system_failed(shard, exc) from None
        return [], [{"source": shard, "reason": f"unreadable tar shard ({exc})"}]
    return inspect_shard(opened, max_pixels, pairs, sidecar)


def inspect_shard(
    opened: OpenShard, max_pixels: int, pairs: list, sidecar: str | None = None
) -> tuple[list[Row], list[Reject]]:
    """Inspect every sample of one tar shard, ``opened`` (a local file, or an object read with ranged GETs:
    ``remote.RemoteShard``), and close it.

    A sample's image is its member with no extra dot-part (``key.jpg``); members with one
    (``key.depth.png``) belong to the sample and never replace its image: a pair without a folder
    (``--pair depth``) is that member.

    ``sidecar``: img2dataset's per-shard Parquet (:func:`sidecar_metadata`), a local file. Then only the tar's
    headers are read (a 512-byte read per member, seeking over the data): a sample it lists (``status`` success)
    takes its size, caption and original size (``original_width``/``original_height``, where given) from it (its
    caption from the tar where the Parquet gives none: null or blank); a sample it does not list is read as without
    it.
    """
    shard = opened.name
    rows: list[Row] = []
    rejects: list[Reject] = []
    with opened:
        # one open file for the identity, the member list and every read: a shard replaced meanwhile (renamed
        # over) is not mixed in (its identity with the offsets of the one read would serve keys other images)
        stat, identity = opened.stat, opened.identity
        try:
            facts, has_captions = _sidecar_facts(sidecar, max_pixels) if sidecar else ({}, False)
        except (pa.ArrowException, OSError) as exc:
            raise IndexingError(
                f"cannot read {display_path(sidecar)}, the metadata beside {shard}: {str(exc).splitlines()[0]}; "
                "write it again, or move it away (the shard is then read whole)"
            ) from None
        try:
            samples, unnamed = _members(shard, opened.raw, read_texts=not sidecar)
        except OSError as exc:  # the shard opened: reading it failed in the disk or the system
            raise _system_failed(shard, exc) from None
        except (tarfile.TarError, EOFError) as exc:
            return [], [{"source": shard, "reason": f"unreadable tar shard ({exc})"}]
        rejects += unnamed
        listings = FolderListings()

        read_member = opened.read

        for key, sample in samples.items():
            if "image" not in sample:
                continue
            images = sample.pop("image")  # {member name: (offset, length)}, in order of first appearance
            name, (offset, length) = next(iter(images.items()))
            for other in list(images)[1:]:
                rejects.append({"source": f"{shard}:{other}", "reason": f"duplicate key {key!r} (kept {name})", "key": key})  # fmt: skip
            # a member written again (tar -rf) is not what the Parquet describes: the sample is read as without it
            fact = None if sample.pop("copies", False) or is_video_name(name) else facts.get(key)
            for ext, (at, size) in sample.pop("texts_at", {}).items():  # (headers only: read when needed)
                if fact is None or not has_captions or fact[2] is None:
                    sample[ext] = read_member(at, size)
            if fact is not None:
                width, height, caption, *original = fact
                if _exif_turned(name, length, (width, height), sample.pop("head", b""), read_member, offset):
                    # img2dataset measured both sizes unturned: the original size turns with the image it describes
                    width, height = height, width
                    original = original[::-1]
                if caption is None:  # (none in the Parquet, or no such column: the tar's, as read without it)
                    caption, problem = _caption(key, sample)
                    if problem:
                        rejects.append({"source": f"{shard}:{name}", "reason": problem, "key": key})
                        continue
                rows.append(Row(key, width, height, caption, shard, offset, length, stat.st_mtime_ns, (), **identity,
                                original_width=original[0], original_height=original[1]))  # fmt: skip
                continue
            video = None
            if is_video_name(name):  # read in place through a window on the shard: never the whole member at once
                video = inspect_video(opened.member(offset, length), max_pixels=max_pixels)
                result = video if isinstance(video, str) else (video.width, video.height)
            else:
                result = inspect_image(read_member(offset, length), max_pixels=max_pixels)
            if isinstance(result, str):
                rejects.append({"source": f"{shard}:{name}", "reason": result, "key": key})
                continue
            caption, problem = _caption(key, sample)
            if problem:
                rejects.append({"source": f"{shard}:{name}", "reason": problem, "key": key})
                continue
            paired, problem = find_pairs(
                pairs, key, result, max_pixels=max_pixels, listings=listings, sides=sample.get("sides", {}),
                read_member=read_member, shard=shard,
            )  # fmt: skip
            if problem:
                rejects.append({"source": f"{shard}:{name}", "reason": problem, "key": key})
                continue
            where = (shard, offset, length, stat.st_mtime_ns)
            rows.append(Row(key, result[0], result[1], caption, *where, paired, **identity, video=video))
    return rows, rejects


def _exif_turned(name: str, length: int, given: tuple[int, int], head: bytes, read_member, offset: int) -> bool:
    """Whether the sizes ``given`` by img2dataset's Parquet for the JPEG member ``name`` (``length`` bytes at
    ``offset``) are its stored sides of a photo its EXIF orientation turns (5-8): img2dataset measures with cv2's
    ``IMREAD_UNCHANGED`` (orientation not applied) and keeps a JPEG's bytes with ``--skip_reencode``. Not where the
    frame header (in the bytes read) shows ``given`` already turned. ``head``: its first bytes where already read;
    else :data:`EXIF_PROBE` bytes are read (then up to :data:`EXIF_MOST` for long segments before the Exif one)."""
    if member_key(name)[2] not in JPEG_EXTS:
        return False
    turned = jpeg_swaps_sides(head) if head else None
    if turned is None:
        head = read_member(offset, min(length, EXIF_PROBE))
        turned = jpeg_swaps_sides(head)
    if turned is None and length > EXIF_PROBE:
        head = read_member(offset, min(length, EXIF_MOST))
        turned = jpeg_swaps_sides(head)
    stored = jpeg_stored_size(head) if turned else None
    return bool(turned) and (stored is None or stored == given)


class MemberFile(Seekable):
    """A read-only, seekable window ``[offset, offset + length)`` of an open shard, read with ``pread`` (a tar member
    as a file: what PyAV reads a video member through). ``size``: the member's length."""

    def __init__(self, fh: BinaryIO, offset: int, length: int) -> None:
        super().__init__(length)
        self._fd, self._offset = fh.fileno(), offset

    def read(self, n: int = -1) -> bytes:
        n = self.size - self._at if n is None or n < 0 else min(n, self.size - self._at)
        data = os.pread(self._fd, max(0, n), self._offset + self._at) if n > 0 else b""
        self._at += len(data)
        return data


class OpenShard(Protocol):
    """A tar shard open for :func:`inspect_shard` (a context manager that closes it).

    Attributes:
        name: the shard as rows and rejects name it (a path or a URL).
        stat: its ``st_mtime_ns`` (and, locally, the rest of ``os.stat``).
        identity: what rows record to recognise it (``ctime_ns``, ``source_size``...).
        raw: a seekable binary file of the whole shard, that ``tarfile`` walks.
    """

    name: str
    stat: Any
    identity: dict[str, Any]
    raw: BinaryIO

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of the shard."""

    def member(self, offset: int, length: int) -> BinaryIO:
        """A seekable file of bytes ``[offset, offset + length)`` of the shard, read as needed (a video member)."""

    def __enter__(self) -> OpenShard: ...

    def __exit__(self, *exc: object) -> None: ...


class LocalShard:
    """A local shard open: one open file for the identity, the member list and every read (``pread``), so a shard
    replaced meanwhile (renamed over) is not mixed in (its identity with the offsets of the one read would serve keys
    other images). ``open`` raises OSError."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.raw = open(path, "rb")
        try:
            self.stat = os.fstat(self.raw.fileno())
        except OSError:
            self.raw.close()
            raise
        self.identity = {"ctime_ns": self.stat.st_ctime_ns, "source_size": self.stat.st_size}

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.raw.fileno(), length, offset)

    def member(self, offset: int, length: int) -> MemberFile:
        return MemberFile(self.raw, offset, length)

    def __enter__(self) -> LocalShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def _system_failed(shard: str, exc: OSError) -> StorageError:
    """The error that stops indexing when the OS fails under ``shard`` (not the shard's own content)."""
    return StorageError(
        f"{display_path(shard)}: {exc.strerror or exc}; the disk or the system failed (not this shard): fix that "
        "and index again"
    )


def _members(shard: str, raw: BinaryIO, *, read_texts: bool = True) -> tuple[dict[str, dict], list[Reject]]:
    """``{key: sample}`` of a shard's members (read from ``raw``, the shard open) by the webdataset convention,
    and rejects for names that are not UTF-8. A sample holds ``"image"`` (``{member name: (offset, length)}``), its captions' bytes by extension and
    ``"sides"`` (without ``read_texts``, the captions' ``(offset, size)`` in ``"texts_at"`` instead of their bytes:
    only headers are read). A member that occurs twice (``tar -rf`` / ``tar -uf`` append a new copy) is its last copy, as
    for every tar extractor: the picture, its caption and its pairs all come from the latest copies (and the sample
    holds ``"copies"``: True, where its image or caption was written again)."""
    samples: dict[str, dict] = {}
    rejects: list[Reject] = []
    held = None if read_texts else getattr(raw, "held_from", None)
    raw.seek(0)
    with tarfile.open(fileobj=raw, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            named = member_key(member.name)
            if named is None:
                continue
            key, side, ext = named
            if not is_utf8(member.name):
                reason = "member name is not valid UTF-8 (rename it when writing the shard)"
                rejects.append({"source": display_path(f"{shard}:{member.name}"), "reason": reason})
                continue
            sample = samples.setdefault(key, {})
            if side:  # key.NAME.ext: a side file of the sample (pairs, masks, metadata)
                sample.setdefault("sides", {})[f"{side}{ext}"] = (member.name, member.offset_data, member.size)
            elif ext in (".txt", ".caption", ".json") and not read_texts:
                texts = sample.setdefault("texts_at", {})
                sample["copies"] = sample.get("copies", False) or ext in texts
                texts[ext] = (member.offset_data, member.size)
            elif ext in (".txt", ".caption", ".json"):
                sample[ext] = tar.extractfile(member).read()
            elif ext not in NOT_IMAGES:
                images = sample.setdefault("image", {})
                sample["copies"] = sample.get("copies", False) or member.name in images
                images[member.name] = (member.offset_data, member.size)
                if held is not None and ext in JPEG_EXTS:  # (its first bytes, where the walk's window holds them)
                    sample["head"] = held(member.offset_data, min(member.size, EXIF_PROBE))
        damaged = _damaged_header(raw, tar.offset)
    if damaged is not None:
        rejects.append({"source": display_path(shard), "reason": damaged})
    return samples, rejects


def _damaged_header(raw: BinaryIO, offset: int) -> str | None:
    """Why the member list of the tar open in ``raw`` ended early, or None: ``tarfile`` stops without a word at a
    header after the first that is not one (a failed checksum), so the block where it stopped (``offset``) must be
    the end of the archive (zeros) or of the file."""
    raw.seek(offset)
    block = raw.read(512)
    if not block or block == bytes(len(block)):
        return None
    return (
        f"damaged tar header at byte {offset}: the members after it were not read (rewrite the shard; GNU tar "
        "extracts them, skipping to the next header)"
    )


def _caption(key: str, sample: dict) -> tuple[str | None, str | None]:
    """The caption of a sample (``.txt``, ``.caption``, or the ``caption`` field of ``.json``) and, if it
    cannot be used, why."""
    for ext in (".txt", ".caption"):
        if ext in sample:
            return decode_caption(sample[ext]) or None, None
    if ".json" not in sample:
        return None, None
    try:
        meta = json.loads(decode_caption(sample[".json"]))
    except ValueError:
        return None, f"{key}.json is not valid JSON (fix or drop it)"
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if caption is None:
        return None, None
    if not isinstance(caption, str):
        shown = json.dumps(caption)[:40] if not isinstance(caption, float) else repr(caption)
        return None, f"caption in {key}.json is not text (a {type(caption).__name__}: {shown}); write it as a string"
    return caption.strip() or None, None
