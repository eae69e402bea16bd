"""Indexing from object storage: a prefix is a folder, shards and metadata are fetched whole.

Per image under a prefix the indexer reads headers only: Pillow reads through :class:`RemoteFile`, which fetches
64 KiB blocks on demand, so a JPEG's size and EXIF orientation usually cost one ranged GET and the truncation
check one more (the last 64 KiB); an image of 64 KiB or less is one GET. Sidecar captions (``KEY.txt``,
``KEY.caption``) are fetched whole. Per shard: one streaming GET of the whole shard (its images' headers lie
inside it), read as a local file. Metadata (img2dataset Parquet/CSV): one GET.
"""

from __future__ import annotations

import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

from ..errors import ObjectChanged, ObjectMissing, StorageError
from ..imagefacts import inspect_image
from ..pairs import PairSpec
from ..storage import IOStats, ObjectInfo, download, get_bytes, get_range, is_url, list_prefix
from .folders import CAPTION_EXTS, NOT_IMAGES, PreviousRows, decode_caption
from .pairing import pair_problem
from .records import Reject, Row

__all__ = ["BLOCK", "RemoteFile", "fetched", "pair_listings", "prefix_tasks", "remote_folder_task"]

#: Bytes a header read fetches at once.
BLOCK = 64 << 10
#: Images of one task inspected at once (network-bound: more than the cores).
CONCURRENT_HEADERS = 16
FILES_PER_TASK = 256


class RemoteFile(io.RawIOBase):
    """A read-only, seekable view of an object in storage that fetches :data:`BLOCK`-sized blocks on demand
    (and keeps them), so Pillow reads a header with one request. ``size``: the object's size in bytes."""

    def __init__(self, url: str, size: int, stats: IOStats | None = None) -> None:
        super().__init__()
        self.url, self.size, self.stats = url, int(size), stats
        self._pos = 0
        self._blocks: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            start = index * BLOCK
            self._blocks[index] = get_range(self.url, start, min(self.size, start + BLOCK), self.stats)
        return self._blocks[index]

    def readinto(self, buffer) -> int:
        end = min(self.size, self._pos + len(buffer))
        if end <= self._pos:
            return 0
        if end - self._pos > 4 * BLOCK:  # a long read (the whole file): one request for the span not held
            data = get_range(self.url, self._pos, end, self.stats)
        else:
            data = b"".join(self._block(i) for i in range(self._pos // BLOCK, (end - 1) // BLOCK + 1))
            first = (self._pos // BLOCK) * BLOCK
            data = data[self._pos - first : end - first]
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        size = self.size - self._pos if size is None or size < 0 else size
        buffer = bytearray(min(size, max(0, self.size - self._pos)))
        n = self.readinto(memoryview(buffer))
        return bytes(buffer[:n])


def _listing(base: str) -> tuple[dict[str, ObjectInfo], dict[str, str], int]:
    """The objects under the prefix ``base`` (ending in ``/``) as a folder walk sees them: ``{relative name:
    info}`` of the images, ``{stem: url}`` of the sidecar captions (``.txt`` first), and how many were listed.
    Hidden names (a part starting with ``.``) are skipped."""
    images: dict[str, ObjectInfo] = {}
    captions: dict[str, str] = {}
    listed = 0
    for info in list_prefix(base):
        listed += 1
        rel = info.url[len(base) :]
        name = rel.rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stem, ext = os.path.splitext(rel)
        if ext.lower() in CAPTION_EXTS:
            if stem not in captions or ext.lower() == ".txt":
                captions[stem] = info.url
        elif ext.lower() not in NOT_IMAGES and name:
            images[rel] = info
    return images, captions, listed


def pair_listings(pairs: list[PairSpec]) -> list[tuple[PairSpec, dict[str, tuple[str, int]]]]:
    """Each pair whose folder is a prefix in object storage, with ``{key: (url, size)}`` of the images under it
    (listed once; the first name in order where a key has several). A StorageError for an empty prefix."""
    found = []
    for spec in pairs:
        if spec.folder is None or not is_url(spec.folder):
            continue
        images, _, _ = _listing(spec.folder)
        objects: dict[str, tuple[str, int]] = {}
        for rel in sorted(images):
            objects.setdefault(os.path.splitext(rel)[0], (images[rel].url, images[rel].size))
        if not objects:
            raise StorageError(f"--{spec.kind} {spec.name}={spec.folder}: no images under that prefix")
        found.append((spec, objects))
    return found


def prefix_tasks(
    url: str, max_pixels: int, previous: PreviousRows | None = None, pairs: list[tuple] = ()
) -> tuple[list[tuple], int]:
    """The tasks of one prefix (``s3://bucket/prefix/``): groups of image objects with their sidecar captions
    and, from ``previous`` (``--update``), the earlier rows of those objects, and from ``pairs``
    (:func:`pair_listings`) their paired objects; and how many objects were listed. A StorageError when the
    listing holds no images."""
    base = url.rstrip("/") + "/"
    images, captions, listed = _listing(base)
    if not images:
        raise StorageError(
            f"no images under {base} ({listed} objects listed); check the prefix (a folder of images ends with '/')"
        )
    ordered = sorted(images)
    tasks = []
    earlier: dict[str, dict[str, tuple]] = {}  # folder URL -> {url: PreviousRows.folder's facts}
    for start in range(0, len(ordered), FILES_PER_TASK):
        chunk = ordered[start : start + FILES_PER_TASK]
        objects = [(rel, images[rel]) for rel in chunk]
        known = {}
        if previous is not None:
            for _, info in objects:
                object_url = info.url
                folder = object_url.rsplit("/", 1)[0]
                if folder not in earlier:
                    earlier[folder] = previous.folder(folder)
                if object_url in earlier[folder]:
                    known[object_url] = earlier[folder][object_url]
        keys = [os.path.splitext(rel)[0] for rel in chunk]
        paired = [
            (spec.name, spec.kind, spec.folder, {k: found[k] for k in keys if k in found}) for spec, found in pairs
        ]
        tasks.append((objects, {key: captions.get(key) for key in keys}, max_pixels, known, paired))
    return tasks, listed


def remote_folder_task(args: tuple) -> tuple[list[Row], list[Reject], dict[str, int]]:
    """Inspect a group of objects of one prefix (headers only, :data:`CONCURRENT_HEADERS` at once; an object whose
    size, modification time and ETag match its row in ``known`` keeps that row's size unread): rows, rejects, and
    the requests and bytes it read, with ``reused``, the rows taken from ``known``."""
    objects, captions, max_pixels, known, paired = args
    stats = IOStats()
    reused = []

    def inspect(item: tuple) -> tuple[Row | None, Reject | None]:
        rel, info = item
        url, size, mtime = info.url, info.size, info.mtime_ns
        key = os.path.splitext(rel)[0]
        earlier = known.get(url)
        if PreviousRows.unchanged(earlier, size, mtime, etag=info.etag):
            result: tuple[int, int] | str = (earlier[2], earlier[3])
            reused.append(url)
        else:
            try:
                result = inspect_image(RemoteFile(url, size, stats), max_pixels=max_pixels)
            except (ObjectMissing, ObjectChanged) as exc:  # the object's own; a failing store stops the run
                return None, {"source": url, "reason": f"unreadable ({exc})", "key": key}
        if isinstance(result, str):
            return None, {"source": url, "reason": result, "key": key}
        facts = []
        for name, kind, folder, found in paired:
            what = f"{kind} {name!r}"
            if key not in found:
                return None, {"source": url, "reason": f"{what} missing: no {folder}{key}.* (an image object) for "
                              "this sample", "key": key}  # fmt: skip
            pair_url, pair_size = found[key]
            try:
                pair = inspect_image(RemoteFile(pair_url, pair_size, stats), max_pixels=max_pixels)
            except (ObjectMissing, ObjectChanged) as exc:
                pair = f"unreadable ({exc})"
            problem = pair_problem(what, pair_url, pair, result)
            if problem:
                return None, {"source": url, "reason": problem, "key": key}
            facts.append((pair_url, 0, pair_size, *pair))
        caption = None
        if captions.get(key):
            try:
                caption = decode_caption(get_bytes(captions[key], stats)) or None
            except ObjectMissing:
                caption = None
        identity = {"source_size": size, "etag": info.etag}
        return Row(key, result[0], result[1], caption, url, 0, size, mtime, tuple(facts), **identity), None

    rows, rejects = [], []
    with ThreadPoolExecutor(CONCURRENT_HEADERS) as pool:
        for row, reject in pool.map(inspect, objects):
            if row is not None:
                rows.append(row)
            if reject is not None:
                rejects.append(reject)
    return rows, rejects, {**stats.take(), "reused": len(reused)}


class fetched:
    """A local copy of the object at ``url`` for the duration of a ``with`` block (shards, metadata)."""

    def __init__(self, url: str, suffix: str = "") -> None:
        self.url, self.suffix = url, suffix
        self.path: str | None = None

    def __enter__(self) -> str:
        handle, self.path = tempfile.mkstemp(prefix="dali_arb-", suffix=self.suffix)
        os.close(handle)
        download(self.url, self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)
