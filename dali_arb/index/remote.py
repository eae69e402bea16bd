"""Indexing from object storage: a prefix is a folder; shards are walked header by header where img2dataset's
Parquet is beside them, else fetched whole; metadata is fetched whole.

Per image under a prefix the indexer reads headers only: Pillow reads through :class:`RemoteFile`, which fetches
64 KiB blocks on demand, so a JPEG's size and EXIF orientation usually cost one ranged GET and the truncation
check one more (the last 64 KiB); an image of 64 KiB or less is one GET. Sidecar captions (``KEY.txt``,
``KEY.caption``) are fetched whole. Per shard with img2dataset's Parquet beside it (``00000.tar`` and
``00000.parquet``): one GET of the Parquet (sizes, captions) and the tar's headers (offsets), read in windows of
:data:`SHARD_WINDOW` bytes (:class:`HeaderWindows`): a tar has no index and each header gives the next one's
offset, so one request reads every header inside its window and the next starts at the first header past it. Per
shard without one: one streaming GET of the whole shard (its images' headers lie inside it), read as a local file.
Metadata (img2dataset Parquet/CSV): one GET.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from ..data.imagefacts import inspect_image
from ..data.pairs import PairSpec
from ..data.storage import IOStats, ObjectInfo, download, get_bytes, get_range, is_url
from ..data.storage import info as object_info
from ..data.storage.ranged import Seekable
from ..data.videofacts import inspect_video, is_video_name
from ..errors import IndexingError, ObjectChanged, ObjectMissing, StorageError
from .folders import CAPTION_EXTS, NOT_IMAGES, PreviousRows, decode_caption
from .pairing import pair_problem
from .records import Reject, Row

__all__ = [
    "BLOCK",
    "SHARD_WINDOW",
    "WALK_MIN_STRIDE",
    "HeaderWindows",
    "RemoteFile",
    "RemoteShard",
    "fetched",
    "list_objects",
    "pair_listings",
    "prefix_tasks",
    "remote_folder_task",
    "remote_shard_task",
]

#: Bytes a header read fetches at once.
BLOCK = 64 << 10
#: A video's reads: 1 MiB per request, 4 held (a video demuxed to count its frames streams through 4 MiB)
VIDEO_BLOCK = 1 << 20
#: Bytes of a tar shard one request reads while its headers are walked (``RemoteShard``): every header inside a
#: window is read with it (``benchmarks/RESULTS.md``, shards-meta, chose it).
SHARD_WINDOW = 8 << 10
#: A shard with img2dataset's Parquet beside it is walked header by header where it holds this many bytes or more per
#: sample (its images are large: the walk reads a small share of it); a shard of smaller images is fetched whole,
#: which costs 1 request instead of about 1 per sample for most of its bytes anyway (shards-meta-s3).
WALK_MIN_STRIDE = 64 << 10
#: Images of one task inspected at once (network-bound: more than the cores).
CONCURRENT_HEADERS = 16
FILES_PER_TASK = 256


class RemoteFile(Seekable):
    """A read-only, seekable view of an object in storage that fetches :data:`BLOCK`-sized blocks on demand
    (and keeps them), so Pillow reads a header with one request. ``size``: the object's size in bytes."""

    def __init__(self, url: str, size: int, stats: IOStats | None = None, *, block: int | None = None,
                 keep: int | None = None) -> None:  # fmt: skip
        super().__init__(size)
        self.url, self.stats = url, stats
        self.block = block or BLOCK  # bytes per request
        self.keep = keep  # blocks held at most (the oldest dropped first); None: all
        self._blocks: dict[int, bytes] = {}

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            start = index * self.block
            self._blocks[index] = get_range(self.url, start, min(self.size, start + self.block), self.stats)
            if self.keep is not None and len(self._blocks) > self.keep:
                self._blocks.pop(next(iter(self._blocks)))
        return self._blocks[index]

    def readinto(self, buffer) -> int:
        end = min(self.size, self._at + len(buffer))
        if end <= self._at:
            return 0
        B = self.block
        if end - self._at > 4 * B:  # a long read (the whole file): one request for the span not held
            data = get_range(self.url, self._at, end, self.stats)
        else:
            data = b"".join(self._block(i) for i in range(self._at // B, (end - 1) // B + 1))
            first = (self._at // B) * B
            data = data[self._at - first : end - first]
        buffer[: len(data)] = data
        self._at += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        size = self.size - self._at if size is None or size < 0 else size
        buffer = bytearray(min(size, max(0, self.size - self._at)))
        n = self.readinto(memoryview(buffer))
        return bytes(buffer[:n])


class HeaderWindows(Seekable):
    """A read-only, seekable view of an object for a walk that reads forward (a tar's headers): a read outside the
    window held fetches ``[position, position + window)`` with one ranged GET (clipped to the object) and keeps that
    window only, so every header inside it costs nothing more. ``size``: the object's size in bytes."""

    def __init__(self, url: str, size: int, stats: IOStats | None = None, *, window: int) -> None:
        super().__init__(size)
        self.url, self.stats, self.window = url, stats, int(window)
        self._start, self._data = 0, b""

    def held(self, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` where the window held covers them, else None (nothing is fetched)."""
        if self._start <= start and end <= self._start + len(self._data):
            return self._data[start - self._start : end - self._start]
        return None

    def held_from(self, start: int, most: int) -> bytes:
        """Up to ``most`` bytes from ``start`` that the window held covers (b"" where it does not cover ``start``)."""
        if not self._start <= start < self._start + len(self._data):
            return b""
        return self._data[start - self._start : start - self._start + most]

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._at + size)
        if end <= self._at:
            return b""
        data = self.held(self._at, end)
        if data is None:
            self._start = self._at
            self._data = get_range(self.url, self._at, min(self.size, self._at + max(self.window, end - self._at)),
                                   self.stats)  # fmt: skip
            data = self._data[: end - self._at]
        self._at += len(data)
        return data


class _Slice(Seekable):
    """Bytes ``[offset, offset + length)`` of a :class:`RemoteFile` as a seekable file (a tar member: a video)."""

    def __init__(self, whole: RemoteFile, offset: int, length: int) -> None:
        super().__init__(length)
        self._whole, self._offset = whole, offset

    def read(self, size: int = -1) -> bytes:
        size = self.size - self._at if size is None or size < 0 else min(size, self.size - self._at)
        if size <= 0:
            return b""
        self._whole.seek(self._offset + self._at)
        data = self._whole.read(size)
        self._at += len(data)
        return data


class RemoteShard:
    """A tar shard in object storage open for ``shards.inspect_shard``: its headers walked through
    :class:`HeaderWindows` of :data:`SHARD_WINDOW` bytes, a member's bytes from the window held or one ranged GET,
    a video member through :class:`RemoteFile` blocks. ``info``: the object as a HEAD found it (its size bounds every
    read; its identity is what ``readers.read_remote_shard`` records)."""

    def __init__(self, info: ObjectInfo, stats: IOStats, *, window: int | None = None) -> None:
        self.name, self.stats = info.url, stats
        self.stat = os.stat_result((0, 0, 0, 0, 0, 0, info.size, 0, 0, 0, 0, 0, info.mtime_ns, 0))
        self.identity = {"ctime_ns": None, "source_size": info.size, "etag": info.etag}
        self.raw = HeaderWindows(info.url, info.size, stats, window=window or SHARD_WINDOW)

    def read(self, offset: int, length: int) -> bytes:
        held = self.raw.held(offset, offset + length)
        return held if held is not None else get_range(self.name, offset, offset + length, self.stats)

    def member(self, offset: int, length: int) -> _Slice:
        return _Slice(RemoteFile(self.name, self.raw.size, self.stats, block=VIDEO_BLOCK, keep=4), offset, length)

    def __enter__(self) -> RemoteShard:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def sidecar_url(url: str) -> str:
    """The URL of img2dataset's Parquet beside the shard at ``url`` (``.../00000.tar`` -> ``.../00000.parquet``)."""
    return url.rsplit(".", 1)[0] + ".parquet"


def remote_sidecar(url: str, local: str, stats: IOStats) -> bool:
    """Fetch img2dataset's Parquet beside the shard at ``url`` (``00000.tar`` -> ``00000.parquet``) into the local file
    ``local`` (one GET); whether there is one with ``shards.SIDECAR_COLUMNS``. A failing store raises."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .shards import SIDECAR_COLUMNS

    try:
        download(sidecar_url(url), local, stats)
    except ObjectMissing:
        return False
    try:
        return set(SIDECAR_COLUMNS) <= set(pq.read_schema(local).names)
    except (pa.ArrowException, OSError):
        return False


def remote_shard_task(args: tuple) -> tuple[list[Row], list[Reject], dict[str, int], bool] | None:
    """Index the shard in object storage ``(info, max_pixels[, window])`` (``info``: its :class:`ObjectInfo`) from
    img2dataset's Parquet beside it: sizes and captions from the Parquet, offsets from the tar's headers, no image
    read. The headers are walked with ranged GETs (``shards.inspect_shard`` on a :class:`RemoteShard`) where the shard
    holds :data:`WALK_MIN_STRIDE` bytes or more per sample the Parquet lists; else the shard is fetched whole (one
    streaming GET: the walk would read most of it, a request per sample) and its headers read locally. Returns rows,
    rejects, the requests and bytes read (the Parquet's included) and whether the headers were walked; None when no
    usable Parquet is beside it (then nothing else was read)."""
    import pyarrow.parquet as pq

    from .shards import LocalShard, inspect_shard

    info, max_pixels, *rest = args
    stats = IOStats()
    folder = tempfile.mkdtemp(prefix="dali_arb-sidecar-")
    local = os.path.join(folder, "sidecar.parquet")
    try:
        if not remote_sidecar(info.url, local, stats):
            return None
        listed = pq.read_metadata(local).num_rows
        walk = info.size >= WALK_MIN_STRIDE * max(1, listed)
        if walk:
            opened: RemoteShard | LocalShard = RemoteShard(info, stats, window=rest[0] if rest else None)
        else:
            download(info.url, os.path.join(folder, "shard.tar"), stats)
            opened = LocalShard(os.path.join(folder, "shard.tar"))
            opened.name = info.url  # (rows and rejects name the object; its identity is set by the reader)
        try:
            rows, rejects = inspect_shard(opened, max_pixels, [], local)
        except IndexingError as exc:  # (a Parquet that cannot be read: named by its URL, not the local copy)
            raise IndexingError(str(exc).replace(local, sidecar_url(info.url))) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows, rejects, stats.take(), walk


def _listing(base: str, rejects: list[Reject] | None = None) -> tuple[dict[str, ObjectInfo], dict[str, str], int]:
    """The objects under the prefix ``base`` (ending in ``/``) as a folder walk sees them: ``{relative name:
    info}`` of the images, ``{stem: url}`` of the sidecar captions (``.txt`` first), and how many were listed.
    Hidden names (a part starting with ``.``) are skipped; objects that cannot be addressed are added to
    ``rejects`` (:func:`list_objects`)."""
    images: dict[str, ObjectInfo] = {}
    captions: dict[str, str] = {}
    listed = 0
    for info in list_objects(base, rejects if rejects is not None else []):
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


#: Where the store's listing names an object whose key cannot be a path (object_store's message).
_BAD_PATH = re.compile(r'Path "(.*)"(?:: Encountered| contained)', re.DOTALL)


def list_objects(base: str, rejects: list[Reject]) -> Iterator[ObjectInfo]:
    """Every object under the prefix ``base``, in key order, like ``storage.list_prefix``, except that a key with an
    empty, ``.`` or ``..`` segment (``a//x.jpg``, ``a/../x.jpg``: object storage allows them, paths do not) is
    added to ``rejects`` with a reason and the listing goes on after it (and after the keys below that segment).
    The store returns such a key in a page of up to 1000 that fails whole: the keys of that page before it are
    listed again folder by folder (:func:`_between`). A transient failure resumes after the last key listed."""
    import obstore
    from obstore.exceptions import InvalidPathError

    from ..data.storage import RETRIES, backoff, failed, is_transient, store_of

    store, prefix = store_of(base)
    root = base[: len(base) - len(prefix)]  # scheme://bucket/
    last: str | None = None
    attempt = 0
    while True:
        try:
            for page in obstore.list(store, prefix.rstrip("/") or None, offset=last, chunk_size=1000):
                for meta in page:
                    attempt = 0
                    last = meta["path"]
                    yield object_info(root, meta)
            return
        except InvalidPathError as exc:
            found = _BAD_PATH.search(str(exc))
            if found is None:
                raise failed(exc, base) from exc
            key = found.group(1)
            parts = key.split("/")
            bad = next(i for i, part in enumerate(parts) if part in ("", ".", ".."))
            folder = root + "/".join(parts[:bad]) + "/"
            rejects.append({"source": root + key, "reason": "key has an empty, '.' or '..' path segment, which "
                            f"this reader cannot address; rename the object and index again (objects of {folder} "
                            "whose names sort before that segment may be missing until then)"})  # fmt: skip
            yield from _between(store, root, prefix, last, key, rejects)
            last, extra = _past(key)
            if extra is not None:  # the one key the new offset leaves out
                yield from _heads(root, [extra])
        except Exception as exc:
            if attempt >= RETRIES or not is_transient(exc):
                raise failed(exc, base) from exc
            time.sleep(backoff(attempt))
            attempt += 1


def _past(key: str) -> tuple[str, str | None]:
    """``(offset, key)``: a valid listing offset after every key that shares ``key``'s first bad segment, and the one
    key that may lie between them and the offset (listed with a HEAD), or None."""
    parts = key.split("/")
    bad = next(i for i, part in enumerate(parts) if part in ("", ".", ".."))
    folder = "/".join(parts[:bad]) + "/" if bad else ""
    if parts[bad]:  # "F/." or "F/..": what lies before "F/.." + U+10FFFF and after them is hidden (skipped)
        return folder + parts[bad] + "\U0010ffff", None
    return folder + "0", folder + "0"  # "F//...": "F/0" is the first key after them ("/" + 1)


def _between(store, root: str, prefix: str, low: str | None, high: str, rejects: list[Reject]) -> Iterator[ObjectInfo]:
    """The objects under ``prefix`` with keys in ``(low, high)`` (``high``: a bad key), folder by folder along
    ``high``'s path: a folder's own objects and its subfolders that lie between, each listed on its own."""
    import obstore
    from obstore.exceptions import InvalidPathError

    from ..data.storage import failed

    parts = high.split("/")
    bad = next(i for i, part in enumerate(parts) if part in ("", ".", ".."))
    folder = prefix.rstrip("/")
    depth = len(folder.split("/")) if folder else 0
    while depth < bad:
        try:
            found = obstore.list_with_delimiter(store, folder or None)
        except InvalidPathError:
            break
        except Exception as exc:
            raise failed(exc, root + folder) from exc
        for meta in found["objects"]:
            if (low is None or meta["path"] > low) and meta["path"] < high:
                yield object_info(root, meta)
        toward = "/".join(parts[: depth + 1])
        for sub in found["common_prefixes"]:
            sub = sub.rstrip("/")
            if sub != toward and (low is None or sub + "/\U0010ffff" > low) and sub < high:
                inner = low if low is not None and low.startswith(sub + "/") else None
                yield from (i for i in list_objects(root + sub + "/", rejects) if inner is None or i.url > root + inner)
        folder, depth = toward, depth + 1
    if depth < bad:  # a folder whose own entries include a bad name: what sorts before it there is unknown
        rejects.append({"source": root + folder + "/", "reason": f"objects of this folder that sort between "
                        f"{low or '(the start)'} and {high} could not be listed (the store returns them with that "
                        "key); rename it and index again"})  # fmt: skip


def _heads(root: str, keys: list[str]) -> Iterator[ObjectInfo]:
    """The objects among ``keys`` that exist (one HEAD each)."""
    from ..data.storage import head

    for key in keys:
        try:
            yield head(root + key)
        except ObjectMissing:
            continue


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
    url: str,
    max_pixels: int,
    previous: PreviousRows | None = None,
    pairs: list[tuple] = (),
    rejects: list[Reject] | None = None,
) -> tuple[list[tuple], int]:
    """The tasks of one prefix (``s3://bucket/prefix/``): groups of image objects with their sidecar captions
    and, from ``previous`` (``--update``), the earlier rows of those objects, and from ``pairs``
    (:func:`pair_listings`) their paired objects; and how many objects were listed. Objects the listing cannot
    address are added to ``rejects``. A StorageError when the listing holds no images."""
    base = url.rstrip("/") + "/"
    unlisted: list[Reject] = []
    images, captions, listed = _listing(base, unlisted)
    if rejects is not None:
        rejects += unlisted
    if not images:
        worst = sorted(unlisted, key=lambda r: "could not be listed" not in r["reason"])[:1]
        why = "".join(f"; {r['source']}: {r['reason']}" for r in worst)
        raise StorageError(
            f"no images under {base} ({listed} objects listed); check the prefix (a folder of images ends with '/')"
            + why
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
        video = None
        if is_video_name(rel):  # (never reused: its facts are more than a size) sequential reads, bounded memory
            try:
                video = inspect_video(RemoteFile(url, size, stats, block=VIDEO_BLOCK, keep=4), max_pixels=max_pixels)
            except (ObjectMissing, ObjectChanged) as exc:
                return None, {"source": url, "reason": f"unreadable ({exc})", "key": key}
            result: tuple[int, int] | str = video if isinstance(video, str) else (video.width, video.height)
        elif PreviousRows.unchanged(earlier, size, mtime, etag=info.etag):
            result = (earlier[2], earlier[3])
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
        if captions.get(key):  # a caption that cannot be read is never "no caption"; a failing store stops the run
            try:
                caption = decode_caption(get_bytes(captions[key], stats)) or None
            except ObjectMissing:
                reason = f"caption {captions[key]} was listed but is gone (deleted while indexing?); index again"
                return None, {"source": url, "reason": reason, "key": key}
        identity = {"source_size": size, "etag": info.etag, "video": None if isinstance(video, str) else video}
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
