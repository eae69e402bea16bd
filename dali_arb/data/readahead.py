"""How a loader process reads samples that live in object storage (``storage`` makes the requests).

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

Lifetimes: a :class:`RemoteReads` is closed with the pipeline (or loader) that owns it: its fetcher thread ends and
nothing it fetched is written after that. A loader's private folder (:class:`ReadAheadFolder`) is created once,
never re-created by a write, held under an ``flock`` for its life and removed with the loader; cleanup of
folders left by killed loaders (:func:`remove_stale_read_ahead`) removes only folders whose lock it can take.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
import threading

from ..errors import StorageError
from .storage import Fetcher, IOStats, Request, endpoint_of, replacing

__all__ = ["READ_AHEAD_PREFIX", "ReadAheadFolder", "RemoteReads", "remove_stale_read_ahead"]

#: Private read-ahead folders are named ``READ_AHEAD_PREFIX<pid>-<random>``, each with ``<name>.lock`` beside it.
READ_AHEAD_PREFIX = "dali_arb-readahead-"

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
        self._closed = False

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
        with self._lock:
            if self._closed:
                raise RuntimeError("dali_arb: a read through RemoteReads after it was closed with its pipeline")
            if self._fetcher is None:
                self._fetcher = Fetcher(concurrency=self.concurrency, stats=self.stats)
            return self._fetcher

    def close(self) -> None:
        """End the fetcher (its thread, event loop and sockets) and every fetch in flight; nothing is written into
        the folder after this returns. Idempotent."""
        with self._lock:
            self._closed = True
            fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            fetcher.close()
        self._held.clear()

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
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a link planted in a shared folder is not a sample
        except OSError:
            return None
        try:
            with open(fd, "rb") as fh:
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
        """Put ``data`` in the folder as ``r``'s file, whole (see :func:`~dali_arb.data.storage.replacing`). Only into the
        folder as it is: a folder removed (its loader closed) is never created again."""
        if self._closed:
            return
        path = self._path(r)
        sub = os.path.dirname(path)
        try:
            try:
                os.mkdir(sub)  # not makedirs: the folder itself must still be there
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(sub).st_mode):  # a link planted in a shared folder: not ours to follow
                    return
            with replacing(path) as fh:
                fh.write(data)
        except OSError:  # a full or vanished folder costs a fetch later, never a failure
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


class ReadAheadFolder:
    """A loader's private read-ahead folder in ``base`` (``/dev/shm``), alive as long as this object.

    Its lock file, ``<folder>.lock`` beside it, is created first and held with ``flock`` for the folder's life:
    ``flock`` works across PID namespaces on a shared tmpfs (containers run with ``--ipc=host``), where a process id
    says nothing. :meth:`remove` (at the loader's close, collection or exit) removes both. Folders left by loaders
    that were killed are removed when the next one starts (:func:`remove_stale_read_ahead`).
    """

    def __init__(self, base: str) -> None:
        remove_stale_read_ahead(base)
        while True:
            path = os.path.join(base, f"{READ_AHEAD_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
            try:
                fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                break
            except FileExistsError:
                continue
        if not _try_lock(fd):  # no flock here: no lock file either, so cleanup falls back to the process id
            os.unlink(f"{path}.lock")
            os.close(fd)
            fd = None
        try:
            os.mkdir(path, 0o700)
        except OSError:
            _release_lock(path, fd)
            raise
        self.path, self._fd = path, fd

    def remove(self) -> None:
        """Remove the folder and its lock (call after every writer into it was closed). Idempotent."""
        _remove_tree(self.path)
        fd, self._fd = self._fd, None
        _release_lock(self.path, fd)


def _try_lock(fd: int) -> bool:
    """Whether an exclusive, non-blocking ``flock`` on ``fd`` was taken."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _release_lock(path: str, fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(f"{path}.lock")
        os.close(fd)


def _remove_tree(path: str) -> None:
    """``rmtree`` that also wins against a writer finishing a file inside while the tree goes (a few tries)."""
    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return


def remove_stale_read_ahead(base: str) -> list[str]:
    """Remove read-ahead folders in ``base`` left by loaders that no longer run (killed with SIGKILL, say:
    ``/dev/shm`` is memory); returns what was removed.

    A folder is stale when its lock (``<folder>.lock``) can be taken: its loader held it until it ended, in
    whatever PID namespace it ran. A folder without a lock file (an earlier dali_arb) is stale when its process
    id (``READ_AHEAD_PREFIX<pid>-...``) runs nowhere here. Another user's folders are left alone."""
    removed = []
    try:
        names = sorted(entry.name for entry in os.scandir(base) if entry.name.startswith(READ_AHEAD_PREFIX))
    except OSError:
        return removed
    for name in names:
        folder = os.path.join(base, name.removesuffix(".lock"))
        if name.endswith(".lock"):
            if not os.path.lexists(folder):
                _stale_by_lock(folder)  # a lock whose folder is gone (a loader killed between the two)
            continue  # else judged with its folder
        if _stale_by_lock(folder) if os.path.lexists(f"{folder}.lock") else _stale_by_pid(folder):
            removed.append(folder)
    return removed


def _stale_by_lock(folder: str) -> bool:
    """Take ``folder``'s lock; when it is free, remove the folder and the lock (holding it) and say True."""
    try:
        fd = os.open(f"{folder}.lock", os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile, another user's, or a link: not ours to judge
        return False
    try:
        if not _try_lock(fd):
            return False  # its loader runs (here or in another container)
        _remove_tree(folder)
        with contextlib.suppress(OSError):
            os.unlink(f"{folder}.lock")
        return True
    finally:
        os.close(fd)


def _stale_by_pid(folder: str) -> bool:
    """For a folder without a lock file: remove it when its process id runs nowhere in this PID namespace."""
    pid_text = os.path.basename(folder)[len(READ_AHEAD_PREFIX) :].split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
        return False  # its process still runs
    except ProcessLookupError:
        pass
    except OSError as exc:  # another user's process: not ours to touch
        if exc.errno != errno.ESRCH:
            return False
    _remove_tree(folder)
    return True
