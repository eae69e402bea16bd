"""Local files as a backend: a sample's bytes read from a file (or a range of a tar shard), its identity checked.

The three outcomes of the error model (DESIGN.md), told apart here: the bytes; the file's own problem (gone, shut
out, not a regular file, changed since indexing, shorter than indexed, too large), returned as a
:class:`FileProblem` so the sample is replaced; or the OS or the disk failing (EMFILE, ENOMEM, EIO, ESTALE...),
raised as a :class:`~dali_arb.errors.StorageError` that stops the run with nothing blocklisted.

:func:`open_local` is the same checks without the read: a :class:`LocalRange`, a read-only seekable file over the
sample's bytes (a whole file, or a tar member's range) that a video decoder reads in pieces (``pread``), so a long
video is never in memory whole.

Imports the standard library, ``errors`` and ``data.storage`` (its sample size limit, the view base; no obstore).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from typing import NamedTuple

from ..errors import StorageError
from .storage import max_sample_bytes
from .storage.ranged import ViewBase

__all__ = ["THE_FILES_OWN", "UNKNOWN", "FileProblem", "Identity", "LocalRange", "local_change", "open_local",
           "os_failure", "read_local"]  # fmt: skip

#: Errors of opening a sample's file that are the file's own (it is gone, or its permissions shut this process
#: out: the indexer read it): the sample is replaced. Any other OSError is the OS or the disk failing (EMFILE,
#: ENFILE, ENOMEM, EIO, ESTALE...): the run stops and nothing is blocklisted, so a resume loses nothing.
THE_FILES_OWN = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM})


class FileProblem(enum.Enum):
    """A local sample's own problem; each is named as the loader's
    :class:`~dali_arb.loader.contracts.Failure` code that reports it."""

    MISSING = "missing or unreadable"
    NOT_REGULAR = "not a regular file"
    CHANGED = "changed since indexing"
    SHORT = "shorter than indexed"
    TOO_LARGE = "too large for one sample"


class Identity(NamedTuple):
    """What a sample's source was when it was indexed (None where unknown): its size in bytes, its modification
    time (local files) and its ETag (object storage)."""

    size: int | None
    mtime_ns: int | None
    etag: str | None


#: Nothing known of a source (a pair in a file of its own).
UNKNOWN = Identity(None, None, None)


def os_failure(path: str, error: OSError) -> StorageError:
    """The error that stops the run when the OS or the disk fails reading ``path`` (not the file)."""
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    return StorageError(
        f"cannot read {path}: {error.strerror} ({name}): the OS or the disk failed, not the file; fix that (the "
        "open-file limit `ulimit -n`, memory, the disk) and resume from the last checkpoint",
        source=path,
        cause=error,
        kind="os",
    )


def local_change(info: os.stat_result, offset: int, length: int, expected: Identity) -> FileProblem | None:
    """Whether the file ``info`` (its ``fstat``) is still the one indexed (None: it is): the local identity is its
    size and mtime (a copy that keeps them, ``cp -a`` or ``rsync -a``, serves on; a ``chmod`` changes only the
    ctime). Without a recorded size (older manifests), a whole file's size must be its ``length``."""
    size = expected.size if expected.size is not None else (length if offset == 0 and length >= 0 else None)
    if size is not None and info.st_size != size:
        return FileProblem.CHANGED
    if expected.mtime_ns is not None and info.st_mtime_ns != expected.mtime_ns:
        return FileProblem.CHANGED
    return None


def _open_checked(path: str, offset: int, length: int, expected: Identity) -> tuple[int, os.stat_result] | FileProblem:
    """The file ``path`` open (its descriptor, for the caller to close) with its ``fstat``, when it is a regular
    file (a FIFO must not block the open), still the ``expected`` one, and holds ``[offset, offset + length)``
    (``length`` -1: to its end); else the file's own problem (and nothing open).

    Raises:
        StorageError: the OS or the disk failed (:func:`os_failure`), not the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in THE_FILES_OWN:
            return FileProblem.MISSING
        raise os_failure(path, exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            problem: FileProblem | None = FileProblem.NOT_REGULAR
        else:
            problem = local_change(info, offset, length, expected)
            if problem is None and length >= 0 and offset + length > info.st_size:  # (never allocate for bytes
                problem = FileProblem.SHORT  # that are not there)
    except OSError as exc:
        os.close(fd)
        raise os_failure(path, exc) from None
    if problem is not None:
        os.close(fd)
        return problem
    return fd, info


def read_local(path: str, offset: int, length: int, expected: Identity) -> bytes | FileProblem:
    """The ``length`` bytes at ``offset`` of the file ``path`` (``length`` -1: the whole file, at most
    ``max_sample_bytes()``), or the file's own problem (the checks of :func:`_open_checked`).

    Raises:
        StorageError: the OS or the disk failed (:func:`os_failure`), not the file.
    """
    opened = _open_checked(path, offset, length, expected)
    if isinstance(opened, FileProblem):
        return opened
    fd, info = opened
    try:
        if length < 0:
            if info.st_size > max_sample_bytes():
                return FileProblem.TOO_LARGE
            return os.pread(fd, info.st_size, 0)
        data = os.pread(fd, length, offset)
        return data if len(data) == length else FileProblem.SHORT
    except OSError as exc:  # the file opened: reading it failed in the OS or the disk (EIO)
        raise os_failure(path, exc) from None
    finally:
        os.close(fd)


class LocalRange(ViewBase):
    """Bytes ``[offset, offset + length)`` of an open file (its descriptor, owned: closed with the view) as a
    read-only, seekable file, read with ``pread`` (nothing held but the read's own bytes). A read the OS fails
    (EIO) is recorded in :attr:`~dali_arb.data.storage.ranged.ViewBase.error` (:func:`os_failure`)."""

    def __init__(self, fd: int, path: str, offset: int, length: int) -> None:
        super().__init__(length)
        self.fd, self.path, self.offset = fd, path, int(offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()

    def _read_at(self, position: int, n: int) -> bytes:
        try:
            data = os.pread(self.fd, n, self.offset + position)
        except OSError as exc:
            raise os_failure(self.path, exc) from None
        self.requests += 1
        self.bytes_read += len(data)
        return data


def open_local(path: str, offset: int, length: int, expected: Identity) -> LocalRange | FileProblem:
    """The ``length`` bytes at ``offset`` of the file ``path`` (``length`` -1: the whole file) as a
    :class:`LocalRange` (close it), or the file's own problem; the checks of :func:`_open_checked` but no size limit:
    nothing is read until the view is.

    Raises:
        StorageError: the OS or the disk failed (:func:`os_failure`), not the file.
    """
    opened = _open_checked(path, offset, length, expected)
    if isinstance(opened, FileProblem):
        return opened
    fd, info = opened
    return LocalRange(fd, path, offset, info.st_size - offset if length < 0 else length)
