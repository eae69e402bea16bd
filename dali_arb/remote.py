"""How a loader process reads samples that live in object storage (``storage.py`` makes the requests).

- A batch's samples are fetched together: every part of every sample at once, concurrently, ranges of one
  object coalesced.
- Read-ahead follows the plan: the process that serves iteration ``i`` of the stream starts fetching the
  samples of iteration ``i + L`` in the background (the first one also ``1 .. L - 1``). DALI gives every
  iteration to exactly one worker, so every future step is fetched exactly once, whichever worker serves
  it. Fetched samples wait as files in a folder the loader's worker processes share (``/dev/shm`` by default,
  RAM), named by endpoint, URL, byte range and the object's version (its ETag at indexing: a replaced object,
  re-indexed, is fetched again), written whole or not at all; a worker that finds its sample there
  reads it (a hit), else fetches it (a miss).
- The folder doubles as a cache: by default a sample file is removed once it is read; with ``keep`` (the
  loader's ``sample_cache``) files stay for later epochs, on a disk folder that the ranks of a node may share,
  the least recently used removed beyond ``limit_bytes``.

Memory for read-ahead is bounded: at most ``L`` steps of encoded samples wait in the folder, and each
process has at most its own batch and one read-ahead step in flight.
"""

from __future__ import annotations

import hashlib
import os
import threading

from .errors import StorageError
from .storage import Fetcher, IOStats, Request, endpoint_of

__all__ = ["RemoteReads"]

#: After this many files written, the writer checks the folder's size against the limit.
EVICT_EVERY = 64


class RemoteReads:
    """One process's reads from object storage (see the module's docstring).

    Args:
        folder: where read-ahead samples wait (shared by the loader's processes); ``None``: no read-ahead.
        keep: leave files after reading them (a persistent sample cache).
        limit_bytes: the folder's size limit; the least recently used files are removed beyond it.
        concurrency: requests in flight at most.
    """

    def __init__(self, folder: str | None, *, keep: bool = False, limit_bytes: int = 1 << 30, concurrency: int = 32):
        self.folder, self.keep, self.limit_bytes, self.concurrency = folder, keep, int(limit_bytes), concurrency
        self.stats = IOStats()
        self._fetcher: Fetcher | None = None
        self._held: dict[Request, bytes | StorageError] = {}
        self._writes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # worker processes make their own fetcher and counters
        return {
            "folder": self.folder,
            "keep": self.keep,
            "limit_bytes": self.limit_bytes,
            "concurrency": self.concurrency,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def fetcher(self) -> Fetcher:
        if self._fetcher is None:
            self._fetcher = Fetcher(concurrency=self.concurrency, stats=self.stats)
        return self._fetcher

    # -- files in the shared folder --------------------------------------------------------------
    def _path(self, r: Request) -> str:
        """The file of ``r``'s bytes: named by the endpoint (one bucket name on two servers is two objects), URL,
        range and version (bytes are written only once a fetch checked that version)."""
        name = f"{endpoint_of(r.url)}\0{r.url}\0{r.start}\0{r.end}\0{r.version or ''}"
        digest = hashlib.blake2b(name.encode(), digest_size=20).hexdigest()
        return os.path.join(self.folder, digest[:2], digest)

    def _from_folder(self, r: Request) -> bytes | None:
        if self.folder is None:
            return None
        path = self._path(r)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        try:
            if self.keep:
                os.utime(path)  # recently used
            else:
                os.unlink(path)  # read once: free the room
        except OSError:
            pass
        return data

    def _write(self, r: Request, data: bytes) -> None:
        path = self._path(r)
        partial = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(partial, "wb") as fh:
                fh.write(data)
            os.replace(partial, path)
        except OSError:  # a full or vanished folder costs a fetch later, never a failure
            try:
                os.unlink(partial)
            except OSError:
                pass
            return
        with self._lock:
            self._writes += 1
            check = self._writes % EVICT_EVERY == 0
        if check:
            self.evict()

    def evict(self) -> int:
        """Remove the least recently used files until the folder holds at most 90% of ``limit_bytes`` (when it
        holds more than the limit); returns the bytes removed. Safe against other processes doing the same."""
        entries = []
        for sub in os.scandir(self.folder):
            if sub.is_dir():
                for f in os.scandir(sub.path):
                    if not f.name.endswith(".partial"):
                        try:
                            info = f.stat()
                        except OSError:
                            continue
                        entries.append((info.st_mtime_ns, info.st_size, f.path))
        total = sum(size for _, size, _ in entries)
        if total <= self.limit_bytes:
            return 0
        removed = 0
        for _, size, path in sorted(entries):
            if total - removed <= 0.9 * self.limit_bytes:
                break
            try:
                os.unlink(path)
                removed += size
            except OSError:
                pass
        return removed

    # -- reading ---------------------------------------------------------------------------------
    def gather(self, requests: list[Request]) -> None:
        """Have every request's bytes at hand for :meth:`take`: from the folder, else fetched now, all at once."""
        missing, hits = [], 0
        for r in dict.fromkeys(requests):
            data = self._from_folder(r)
            if data is not None:
                self._held[r] = data
                hits += 1
            else:
                missing.append(r)
        self.stats.add(hits=hits, misses=len(missing))
        if missing:
            for r, result in zip(missing, self.fetcher.fetch(missing)):
                self._held[r] = result
                if self.keep and isinstance(result, bytes):
                    self._write(r, result)

    def take(self, r: Request) -> bytes | StorageError:
        """The bytes of ``r`` (gathered before, waiting in the folder, or fetched now), or why there are none."""
        result = self._held.pop(r, None)
        if result is None:
            result = self._from_folder(r)
            if result is not None:
                self.stats.add(hits=1)
            else:
                self.stats.add(misses=1)
                result = self.fetcher.fetch([r])[0]
                if self.keep and isinstance(result, bytes):
                    self._write(r, result)
        if isinstance(result, bytes):
            self.stats.add(bytes_served=len(result))
        else:
            self.stats.add(failures=1)
        return result

    def clear(self) -> None:
        """Drop what was gathered and not taken (samples a batch replaced)."""
        self._held.clear()

    def read_ahead(self, requests: list[Request]) -> None:
        """Start fetching ``requests`` into the folder in the background (those not there already)."""
        if self.folder is None:
            return
        todo = [r for r in dict.fromkeys(requests) if not os.path.exists(self._path(r))]
        if todo:
            self.fetcher.submit(todo, self._written)

    def _written(self, requests: list[Request], results: list) -> None:
        for r, result in zip(requests, results):
            if isinstance(result, bytes):
                self._write(r, result)
