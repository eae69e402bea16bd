"""Image folders: walking them (in groups of files for the worker processes), reading headers and
sidecar captions, and reusing the rows of unchanged files for ``--update``."""

from __future__ import annotations

import errno
import os
import stat as stat_module
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ..data.imagefacts import inspect_image
from ..data.manifest import IDENTITY
from ..data.videofacts import inspect_video, is_video_name
from ..errors import StorageError
from .pairing import FolderListings, find_pairs
from .records import NOT_IMAGES, Reject, Row

__all__ = [
    "CAPTION_EXTS",
    "NOT_IMAGES",
    "FolderWalk",
    "PreviousRows",
    "caption_files",
    "decode_caption",
    "display_path",
    "folder_task",
    "read_caption",
]

CAPTION_EXTS = (".txt", ".caption")
FILES_PER_TASK = 256


def decode_caption(data: bytes) -> str:
    """Caption text from a file's bytes: UTF-8 (a BOM is dropped), UTF-16 when it starts with its BOM, and
    otherwise, when the bytes are not valid UTF-8, Windows-1252 (what Windows editors wrote before UTF-8)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16", errors="replace").strip()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace").strip()


#: Errors of a caption file itself (its sample is rejected); any other OSError is the disk or the system failing.
FILE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG})


def read_caption(path: str | None) -> tuple[str | None, str | None]:
    """``(text, None)`` of a sidecar caption file found in the folder's listing (``(None, None)`` for no file),
    or ``(None, why)`` when the file cannot be read (its sample is rejected: never "no caption"). A
    StorageError when the disk or the system fails (EIO, EMFILE...): the run stops."""
    if path is None:
        return None, None
    try:
        with open(path, "rb") as fh:
            return decode_caption(fh.read()), None
    except OSError as exc:
        if exc.errno in FILE_ERRNOS:
            return None, f"caption file {display_path(path)} is unreadable ({exc.strerror or exc})"
        raise StorageError(
            f"{display_path(path)}: {exc.strerror or exc}; the disk or the system failed (not this file): "
            "fix that and index again"
        ) from None


def caption_files(names: list[str]) -> dict[str, str]:
    """``{stem: caption file name}`` from one folder's listing: ``stem.txt`` before ``stem.caption``, the
    extension in any case (``IMG.TXT``)."""
    found: dict[str, str] = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        rank = CAPTION_EXTS.index(ext.lower()) if ext.lower() in CAPTION_EXTS else None
        if rank is not None and (
            stem not in found or rank < CAPTION_EXTS.index(os.path.splitext(found[stem])[1].lower())
        ):
            found[stem] = name
    return found


def display_path(path: str) -> str:
    """``path`` as text that can be written anywhere (undecodable bytes of a file name shown as U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a name os.fsdecode kept as surrogates: its bytes are not UTF-8
        return False
    return True


def folder_task(args: tuple) -> tuple[list[Row], list[Reject], int]:
    """Inspect a group of files of one folder: ``(root, [relative paths], max_pixels, known, captions, pairs)``;
    ``captions`` holds each path's sidecar caption file (relative too) or None; ``pairs`` the
    :class:`~dali_arb.data.pairs.PairSpec` of the run (each with its folder).

    Returns rows, rejects, and how many rows were reused from ``known`` (:meth:`PreviousRows.unchanged`).
    """
    root, relpaths, max_pixels, known, captions, pairs = args
    listings = FolderListings()
    reused = 0
    rows: list[Row] = []
    rejects: list[dict] = []
    kept_by_key: dict[str, str] = {}
    for rel, caption_rel in zip(relpaths, captions):
        path = os.path.join(root, rel)
        key = os.path.splitext(rel)[0].replace(os.sep, "/")
        if not is_utf8(path):
            reason = "file name is not valid UTF-8 (rename the file; manifests hold UTF-8 text)"
            rejects.append({"source": display_path(path), "reason": reason})
            continue
        if key in kept_by_key:
            rejects.append({"source": path, "reason": f"duplicate key {key!r} (kept {kept_by_key[key]})", "key": key})
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            rejects.append({"source": path, "reason": f"unreadable ({exc.strerror or exc})", "key": key})
            continue
        if not stat_module.S_ISREG(stat.st_mode):  # a FIFO would block the read forever
            rejects.append({"source": path, "reason": "not a regular file (a FIFO, socket or device)", "key": key})
            continue
        previous = known.get(path) if known else None
        video = None
        if is_video_name(rel):  # (never reused: its facts are more than a size; the header is read again)
            video = inspect_video(path, max_pixels=max_pixels)
            if isinstance(video, str):
                rejects.append({"source": path, "reason": video, "key": key})
                continue
            width, height = video.width, video.height
        elif PreviousRows.unchanged(previous, stat.st_size, stat.st_mtime_ns, ctime_ns=stat.st_ctime_ns):
            width, height = previous[2], previous[3]
            reused += 1
        else:
            result = inspect_image(path, max_pixels=max_pixels)
            if isinstance(result, str):
                rejects.append({"source": path, "reason": result, "key": key})
                continue
            width, height = result
        paired, problem = find_pairs(pairs, key, (width, height), max_pixels=max_pixels, listings=listings)
        if problem:
            rejects.append({"source": path, "reason": problem, "key": key})
            continue
        caption, problem = read_caption(os.path.join(root, caption_rel) if caption_rel else None)
        if problem:
            rejects.append({"source": path, "reason": problem, "key": key})
            continue
        kept_by_key[key] = path
        identity = {"ctime_ns": stat.st_ctime_ns, "source_size": stat.st_size}
        identity["video"] = video
        rows.append(Row(key, width, height, caption, path, 0, stat.st_size, stat.st_mtime_ns, paired, **identity))
    return rows, rejects, reused


class PreviousRows:
    """Rows of an earlier manifest for ``--update``, kept in Arrow and grouped by folder.

    Only the folder being walked becomes Python objects, so a manifest of 10M files does not turn
    into 10M Python objects at once.
    """

    def __init__(self, table: pa.Table) -> None:
        table = table.filter(pc.and_(pc.is_valid(table.column("source")), pc.is_valid(table.column("mtime_ns"))))
        folder = pc.replace_substring_regex(table.column("source"), pattern="/[^/]*$", replacement="")
        table = table.append_column("_folder", folder).sort_by("_folder")
        for name in ("ctime_ns", "etag"):  # (an older manifest's rows: their identity unknown)
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, IDENTITY.field(name).type))
        self.table = table.select(["source", "length", "mtime_ns", "width", "height", "ctime_ns", "etag"])
        folders = table.column("_folder").combine_chunks()
        if len(folders):
            change = pc.not_equal(folders[1:], folders[:-1]).to_numpy(zero_copy_only=False)
            starts = [0, *(int(i) + 1 for i in change.nonzero()[0])]
            ends = [*starts[1:], len(folders)]
            self.slices = {folders[s].as_py(): (s, e) for s, e in zip(starts, ends)}  # one entry per folder
        else:
            self.slices = {}

    def folder(self, directory: str) -> dict[str, tuple]:
        """``{path: (length, mtime_ns, width, height, ctime_ns, etag)}`` for the files indexed in ``directory``."""
        if directory not in self.slices:
            return {}
        start, end = self.slices[directory]
        part = self.table.slice(start, end - start).to_pydict()
        columns = ("length", "mtime_ns", "width", "height", "ctime_ns", "etag")
        return {src: facts for src, *facts in zip(part["source"], *(part[c] for c in columns))}

    @staticmethod
    def unchanged(
        previous: tuple | None, size: int, mtime_ns: int, *, ctime_ns: int | None = None, etag: str | None = None
    ) -> bool:
        """Whether a file (or object) is the one a :meth:`folder` entry ``previous`` indexed, so that its row may
        be reused: same size and mtime, and same ctime (a local file: an edit that sets the mtime back, as
        ``touch -r`` or ``exiftool -P`` do, cannot set it back) or ETag (an object) where those are known now. A
        row that did not record them (an older manifest) is not reused: its header is read again once."""
        if previous is None or previous[0] != size or previous[1] != mtime_ns:
            return False
        if ctime_ns is not None and previous[4] != ctime_ns:
            return False
        return etag is None or previous[5] == etag


class FolderWalk:
    """Walks the folder sources of one index run: each real folder once (overlapping sources and symlinked
    folders included, which are followed unless they lead back up, into a system folder or to a folder indexed
    itself: :meth:`_follow`), symlinked files into an input folder skipped (the file itself is indexed), and walk
    errors (an unreadable subfolder) turned into rejects instead of being ignored.

    ``rejects`` collects what the walk refused; the driver drains it.
    """

    def __init__(
        self, roots: list[str], max_pixels: int, previous: PreviousRows | None, pairs: list | None = None
    ) -> None:
        self.real_roots = [os.path.realpath(r) for r in roots]
        self.max_pixels = max_pixels
        self.pairs = list(pairs or [])
        self.previous = previous
        self.walked: dict[str, str] = {}  # real folder -> the path it was walked as
        self.linked_targets: set[str] = set()
        self.rejects: list[Reject] = []

    def _inside_inputs(self, real: str) -> bool:
        return any(real == r or real.startswith(r + os.sep) for r in self.real_roots)

    def _follow(self, directory: str, real: str, name: str) -> bool:
        """Whether to walk the symlinked folder ``name`` of ``directory`` (whose real path is ``real``); when not,
        why is added to the rejects. Not followed: a link to a folder that holds it (``..``, ``/``: the walk would
        cover the dataset again and all around it), into ``/proc``, ``/sys`` or ``/dev``, or to a folder the
        inputs index under its own name. Followed: links out to other folders (another disk) and to hidden ones."""
        link = os.path.join(directory, name)
        target = os.path.realpath(link)
        if _holds(target, real):
            reason = f"symlinked folder {display_path(link)} leads to {display_path(target)}, which holds it; not followed (it would walk the dataset again and everything around it)"  # fmt: skip
        elif any(_holds(system, target) for system in SYSTEM_FOLDERS):
            reason = f"symlinked folder {display_path(link)} leads to {display_path(target)}, a system folder; not followed"  # fmt: skip
        elif self._indexed_itself(target):
            reason = f"symlink to {display_path(target)}, which is indexed itself"
        else:
            return True
        self.rejects.append({"source": display_path(link), "reason": reason})
        return False

    def _indexed_itself(self, real: str) -> bool:
        """Whether the folder ``real`` is walked under its own name: inside an input, on no hidden path."""
        for root in self.real_roots:
            if _holds(root, real):
                parts = os.path.relpath(real, root).split(os.sep)
                return not any(part.startswith(".") and part not in (".", "..") for part in parts)
        return False

    def tasks(self, root: str) -> Iterator[tuple]:
        """Groups of image candidates of the tree at ``root``, same-stem files kept in one group."""

        def on_error(exc: OSError) -> None:
            where = display_path(exc.filename or root)
            self.rejects.append({"source": where, "reason": f"unreadable folder ({exc.strerror or exc}); its images were not indexed"})  # fmt: skip

        for directory, dirnames, entries, linked in _walk(root, on_error):
            real = os.path.realpath(directory)
            if real in self.walked:
                dirnames[:] = []
                self.rejects.append({"source": display_path(directory), "reason": f"folder already indexed as {display_path(self.walked[real])} (overlapping sources or a symlinked folder)"})  # fmt: skip
                continue
            self.walked[real] = directory
            known = self.previous.folder(os.path.normpath(directory)) if self.previous else {}
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and (d not in linked or self._follow(directory, real, d))
            )
            sidecars = caption_files([e.name for e in entries])
            names, captions = [], []
            for entry in sorted(entries, key=lambda e: e.name):
                f = entry.name
                if f.startswith(".") or os.path.splitext(f)[1].lower() in NOT_IMAGES:
                    continue
                if entry.is_symlink():  # from the directory listing: no system call for ordinary files
                    target = os.path.realpath(entry.path)
                    if self._inside_inputs(target) or target in self.linked_targets:
                        self.rejects.append({"source": display_path(entry.path), "reason": f"symlink to {display_path(target)}, which is indexed itself"})  # fmt: skip
                        continue
                    self.linked_targets.add(target)
                names.append(f)
                captions.append(sidecars.get(os.path.splitext(f)[0]))
            rel_dir = os.path.relpath(directory, root)
            rels = [n if rel_dir == "." else os.path.join(rel_dir, n) for n in names]
            caption_rels = [
                None if c is None else (c if rel_dir == "." else os.path.join(rel_dir, c)) for c in captions
            ]
            start = 0
            while start < len(rels):
                end = min(start + FILES_PER_TASK, len(rels))
                while end < len(rels) and os.path.splitext(rels[end])[0] == os.path.splitext(rels[end - 1])[0]:
                    end += 1  # never split files with one stem across tasks
                chunk = rels[start:end]
                subset = {p: known[p] for p in (os.path.join(root, r) for r in chunk) if p in known} if known else None
                yield (root, chunk, self.max_pixels, subset, caption_rels[start:end], self.pairs)
                start = end


#: Pseudo-filesystems a symlinked folder is never followed into.
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")


def _holds(folder: str, path: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(root: str, on_error) -> Iterator[tuple[str, list[str], list[os.DirEntry], set[str]]]:
    """``os.walk`` top-down that follows symlinked folders and yields the files' ``DirEntry`` objects
    (their symlink flag comes with the listing): ``(folder, subfolder names to descend, file entries, names of
    the subfolders that are symlinks)``. The caller drops the subfolders it will not walk (``dirnames[:] = ...``):
    loops end there, at folders it has walked."""
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as exc:
            on_error(exc)
            continue
        dirnames, files, linked = [], [], set()
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks, like os.walk(followlinks=True)
            except OSError:
                is_dir = False
            (dirnames if is_dir else files).append(entry.name if is_dir else entry)
            if is_dir and entry.is_symlink():
                linked.add(entry.name)
        yield directory, dirnames, files, linked
        stack.extend(os.path.join(directory, d) for d in reversed(dirnames))
