"""A long video read in pieces: a read-only, seekable file over a byte range of an object in storage
(:class:`RangedObject`), fed by ranged GETs of whole blocks, the last few kept, so that a decoder (PyAV) reads the
header and seeks to a clip's keyframe without the object ever being read whole.

Every GET names the indexed version (``If-Match`` with the ETag, where the manifest has one) and its answer's object
size is checked against the indexed size: an object rewritten after indexing is :class:`ObjectChanged` on its first
read, as a whole-object read would be. A read that fails is recorded on the view (:attr:`ViewBase.error`) and the
view reports the end of the file from then on: FFmpeg sees a short file, and its caller (which holds the view) reads
``error`` to tell the store's failure from the file's own.

Memory per open view: the blocks kept, ``blocks x block_bytes`` (:data:`BLOCK_BYTES`, :data:`CACHED_BLOCKS`: 16 x 1
MiB), and at most one GET's bytes besides (:data:`MAX_RUN_BYTES`, the rest of a GET whose first blocks are still
kept): 24 MiB at most, whatever the object's size. Imports the standard library and ``.base``/``.retries``/``.schemes``/``.objects``
(obstore when it reads).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

from ...errors import ObjectChanged, StorageError
from .base import IOStats
from .objects import head
from .retries import check_version, with_retries
from .schemes import store_of

__all__ = ["BLOCK_BYTES", "CACHED_BLOCKS", "MAX_RUN_BYTES", "RangedObject", "Seekable", "ViewBase"]

#: The unit of a ranged GET (a block); chosen against moto by ``python -m benchmarks video_long`` (RESULTS.md).
BLOCK_BYTES = 1 << 20
#: Blocks one view keeps (least recently used dropped): a container's header, the clip's keyframe region and what
#: follows it.
CACHED_BLOCKS = 16
#: The most one GET reads ahead: reads that go on where the last GET ended double its blocks up to this (1, 2, 4,
#: 8 MiB), so a high-bitrate clip costs a few requests and a low-bitrate one reads little past it.
MAX_RUN_BYTES = 8 << 20


class Seekable(io.RawIOBase):
    """What every read-only, seekable view over ``size`` bytes shares (its position ``_at``, ``seek``, ``tell``,
    ``readinto`` through ``read``); a subclass reads. The views: :class:`ViewBase` (the loader's, whose failed read
    ends the view), and the indexer's (``index.remote``: a read that fails raises)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self.size}[whence]
        self._at = max(0, base + int(offset))
        return self._at

    def tell(self) -> int:
        return self._at

    def readinto(self, out: Any) -> int:
        target = memoryview(out).cast("B")
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)


class ViewBase(Seekable):
    """A read-only, seekable file over ``size`` bytes read by :meth:`_read_at`; a subclass reads them.

    Attributes:
        size: the view's length in bytes.
        error: the StorageError that ended its reads (None while none did): reads return nothing after it.
        bytes_read: bytes read from the backing file or store (counted by the subclass).
        requests: reads made of the backing file or store.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.error: StorageError | None = None
        self.bytes_read = 0
        self.requests = 0

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes from the position (-1: to the end); ``b""`` at the end or once a read failed."""
        if self.error is not None or self._at >= self.size:
            return b""
        n = self.size - self._at if size is None or size < 0 else min(int(size), self.size - self._at)
        if n <= 0:
            return b""
        try:
            data = self._read_at(self._at, n)
        except StorageError as exc:
            self.error = exc
            return b""
        self._at += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def _read_at(self, position: int, n: int) -> bytes:
        """``n`` bytes at ``position`` (``position + n <= size``); a StorageError when they cannot be read."""
        raise NotImplementedError


class RangedObject(ViewBase):
    """Bytes ``[offset, offset + length)`` of the object at ``url`` as a read-only, seekable file, read by ranged GETs
    of whole :data:`BLOCK_BYTES` blocks (consecutive missing blocks in one GET; a read that goes on where the last GET
    ended reads twice as many ahead, up to :data:`MAX_RUN_BYTES` and half the blocks kept), the last ``blocks`` kept.

    Args:
        url: the object.
        offset, length: the range (a tar member's); ``length`` -1: to the object's end.
        size: the object's size at indexing (None: unknown, asked with one HEAD when ``length`` is -1); every GET's
            answer must name it (else :class:`ObjectChanged`).
        version: the object's ETag at indexing (None: not checked): each GET carries it as ``If-Match``.
        stats: counters to add requests, retries and bytes read to (the loader's).
        block_bytes, blocks: the block size and the blocks kept (None: :data:`BLOCK_BYTES`, :data:`CACHED_BLOCKS`).
        read_ahead_bytes: the most one GET reads ahead (None: :data:`MAX_RUN_BYTES`; ``block_bytes``: one block).
    """

    def __init__(
        self,
        url: str,
        *,
        offset: int = 0,
        length: int = -1,
        size: int | None = None,
        version: str | None = None,
        stats: IOStats | None = None,
        block_bytes: int | None = None,
        blocks: int | None = None,
        read_ahead_bytes: int | None = None,
    ) -> None:
        block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
        blocks = CACHED_BLOCKS if blocks is None else blocks
        if block_bytes < 1 or blocks < 1:
            raise ValueError(f"block_bytes and blocks must be positive, got {block_bytes!r} and {blocks!r}")
        self.url, self.offset, self.version, self.stats = url, int(offset), version, stats
        self.block_bytes, self.blocks = int(block_bytes), int(blocks)
        self.object_size = size
        asked = 0
        if length < 0:
            if size is None:  # one HEAD: the object's size (and version) now
                found = head(url, stats)
                self.object_size, asked = found.size, 1
                if version is not None and found.etag is not None:
                    check_version(url, {"e_tag": found.etag}, version)
            length = int(self.object_size) - self.offset
        super().__init__(max(0, int(length)))
        self.requests = asked
        ahead = MAX_RUN_BYTES if read_ahead_bytes is None else int(read_ahead_bytes)
        self.max_run = max(1, min(self.blocks // 2, ahead // self.block_bytes))
        self._cache: OrderedDict[int, memoryview] = OrderedDict()
        self._run, self._next = 0, -1  # blocks the last GET took; the block after it

    def close(self) -> None:
        self._cache.clear()
        super().close()

    def _read_at(self, position: int, n: int) -> bytes:
        first, last = position // self.block_bytes, (position + n - 1) // self.block_bytes
        pieces = []
        block = first
        while block <= last:
            if block in self._cache:
                self._cache.move_to_end(block)
                pieces.append(self._cache[block])
                block += 1
                continue
            # one GET: the missing blocks the read needs, and, where it goes on from the last GET (a demuxer reading a
            # clip's packets), twice as many as that GET took, up to ``max_run`` (a seek starts again at one)
            self._run = min(2 * self._run, self.max_run) if block == self._next else 1
            want = max(last, block + self._run - 1)
            run = block
            while run + 1 <= want and run + 1 not in self._cache and (run + 1) * self.block_bytes < self.size:
                run += 1
            self._next = run + 1
            # (the blocks are views of the GET's bytes, not copies: those live while any of their blocks is kept)
            data = self._get(block * self.block_bytes, min((run + 1) * self.block_bytes, self.size))
            for b in range(block, run + 1):
                piece = data[(b - block) * self.block_bytes : (b - block + 1) * self.block_bytes]
                self._cache[b] = piece
                pieces.append(piece)
            while len(self._cache) > self.blocks:
                self._cache.popitem(last=False)
            block = run + 1
        skip = position - first * self.block_bytes
        if len(pieces) == 1:
            return bytes(pieces[0][skip : skip + n])
        return b"".join(pieces)[skip : skip + n]

    def _get(self, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of the view (with retries), of the indexed version and size."""
        import obstore

        store, key = store_of(self.url)
        options: dict[str, Any] = {"range": (self.offset + start, self.offset + end)}
        if self.version is not None:
            options["if_match"] = self.version  # another version: 412, never its bytes

        def get() -> tuple[dict, memoryview]:
            got = obstore.get(store, key, options=options)
            return got.meta, memoryview(got.bytes()).cast("B")  # (obstore's buffer, not a copy)

        meta, data = with_retries(get, self.url, self.stats, version=self.version)
        self.requests += 1
        self.bytes_read += len(data)
        if self.stats is not None:
            self.stats.add(bytes_read=len(data))
        check_version(self.url, meta, self.version)
        found = int(meta.get("size", -1))
        if (self.object_size is not None and found >= 0 and found != self.object_size) or len(data) != end - start:
            raise ObjectChanged(
                f"{self.url} changed since indexing: {found} bytes, not {self.object_size}"
                if found != self.object_size
                else f"{self.url} changed since indexing: {len(data)} bytes at {self.offset + start}, not {end - start}",
                source=self.url,
                kind="size_changed",
            )
        return data
