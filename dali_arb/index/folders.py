"""Image folders: walking them (in groups of files for the worker processes), reading headers and
sidecar captions, and reusing the rows of unchanged files for ``--update``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ..imagefacts import inspect_image
from .records import Reject, Row

__all__ = ["CAPTION_EXTS", "NOT_IMAGES", "PreviousRows", "folder_task", "folder_tasks", "read_caption"]

#: Files next to images that are not samples: never indexed, never rejected.
NOT_IMAGES = frozenset(
    ".txt .caption .json .jsonl .csv .tsv .parquet .md .yaml .yml .npy .npz .pt .pth .safetensors "
    ".db .tags .xmp .log .cls .rejects".split()
)
CAPTION_EXTS = (".txt", ".caption")
FILES_PER_TASK = 256


def read_caption(stem_path: str) -> str | None:
    for ext in CAPTION_EXTS:
        try:
            with open(stem_path + ext, encoding="utf-8", errors="replace") as fh:
                return fh.read().strip()
        except OSError:
            continue
    return None


def folder_task(args: tuple) -> tuple[list[Row], list[Reject], int]:
    """Inspect a group of files of one folder: ``(root, [relative paths], max_pixels, known)``.

    Returns rows, rejects, and how many rows were reused from ``known`` (unchanged size and mtime).
    """
    root, relpaths, max_pixels, known = args
    reused = 0
    rows: list[Row] = []
    rejects: list[dict] = []
    kept_by_key: dict[str, str] = {}
    for rel in relpaths:
        path = os.path.join(root, rel)
        key = os.path.splitext(rel)[0].replace(os.sep, "/")
        if key in kept_by_key:
            rejects.append({"source": path, "reason": f"duplicate key {key!r} (kept {kept_by_key[key]})", "key": key})
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            rejects.append({"source": path, "reason": f"unreadable ({exc.strerror or exc})", "key": key})
            continue
        previous = known.get(path) if known else None
        if previous is not None and previous[0] == stat.st_size and previous[1] == stat.st_mtime_ns:
            width, height = previous[2], previous[3]
            reused += 1
        else:
            result = inspect_image(path, max_pixels=max_pixels)
            if isinstance(result, str):
                rejects.append({"source": path, "reason": result, "key": key})
                continue
            width, height = result
        kept_by_key[key] = path
        caption = read_caption(os.path.splitext(path)[0])
        rows.append(Row(key, width, height, caption, path, 0, stat.st_size, stat.st_mtime_ns))
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
        self.table = table.select(["source", "length", "mtime_ns", "width", "height"])
        folders = table.column("_folder").combine_chunks()
        if len(folders):
            change = pc.not_equal(folders[1:], folders[:-1]).to_numpy(zero_copy_only=False)
            starts = [0, *(int(i) + 1 for i in change.nonzero()[0])]
            ends = [*starts[1:], len(folders)]
            self.slices = {folders[s].as_py(): (s, e) for s, e in zip(starts, ends)}  # one entry per folder
        else:
            self.slices = {}

    def folder(self, directory: str) -> dict[str, tuple]:
        """``{path: (length, mtime_ns, width, height)}`` for the files indexed in ``directory``."""
        if directory not in self.slices:
            return {}
        start, end = self.slices[directory]
        part = self.table.slice(start, end - start).to_pydict()
        return {
            src: (length, mtime, w, h)
            for src, length, mtime, w, h in zip(
                part["source"], part["length"], part["mtime_ns"], part["width"], part["height"]
            )
        }


def folder_tasks(root: str, max_pixels: int, previous: PreviousRows | None) -> Iterator[tuple]:
    """Groups of image candidates of one folder tree, same-stem files kept in one group."""
    for directory, dirnames, filenames in os.walk(root, onerror=None):
        known = previous.folder(os.path.normpath(directory)) if previous else {}
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(
            f for f in filenames if not f.startswith(".") and os.path.splitext(f)[1].lower() not in NOT_IMAGES
        )
        rel_dir = os.path.relpath(directory, root)
        rels = [n if rel_dir == "." else os.path.join(rel_dir, n) for n in names]
        start = 0
        while start < len(rels):
            end = min(start + FILES_PER_TASK, len(rels))
            while end < len(rels) and os.path.splitext(rels[end])[0] == os.path.splitext(rels[end - 1])[0]:
                end += 1  # never split files with one stem across tasks
            chunk = rels[start:end]
            subset = {p: known[p] for p in (os.path.join(root, r) for r in chunk) if p in known} if known else None
            yield (root, chunk, max_pixels, subset)
            start = end
