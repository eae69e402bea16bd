"""What the external source reads of each served row: where its bytes are, its size, and what its source was at
indexing, from every dataset's arrays (Arrow and NumPy, mapped and shared: no Python object per row), addressed by
global row (:class:`~dali_arb.plan.rows.GlobalRows`).

Imports NumPy and, below the loader, ``data.manifest``, ``data.pairs``, ``data.localfiles``, ``data.storage`` and
``plan.rows`` (no DALI).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.localfiles import UNKNOWN, Identity
from ..data.manifest import NO_IDENTITY, Manifest
from ..data.pairs import pair_columns
from ..data.storage import Request, is_url
from ..plan.rows import GlobalRows

__all__ = ["DatasetArrays", "Datasets", "remote_request"]


def remote_request(url: str, offset: int, length: int, version: str | None = None) -> Request:
    """The request for ``length`` bytes at ``offset`` of ``url`` (``length`` -1: the whole object), of the
    object's ``version`` (its ETag at indexing; None: not checked)."""
    return Request(url, offset, offset + length if length >= 0 else -1, whole=offset == 0, version=version)


@dataclass
class DatasetArrays:
    """One dataset's arrays a worker reads (``N`` rows): ``locations[part]`` is ``(sources, offsets, lengths)``
    (Arrow strings, ``int64 (N,)``, ``int64 (N,)``) of its images (part 0) and of each pair; ``heights`` and
    ``widths`` ``(N,)``; ``pair_sizes[i]`` is ``(heights, widths)`` ``int64 (N,)`` of pair ``i``; ``identity`` is
    ``(sizes, mtimes, etags)`` of the images' sources at indexing (:data:`~dali_arb.data.manifest.IDENTITY`;
    ``NO_IDENTITY`` or null where unknown, ``etags`` None when the manifest has none); ``video`` is ``(frames,
    fps, frame_times)`` of a manifest with videos (``int64 (N,)``, -1 for an image; ``float64 (N,)``; the Arrow
    ``list<float32>`` column or None), None for an image-only manifest; ``original`` is ``(heights, widths)``
    ``(N,)`` of a manifest with original sizes (:data:`~dali_arb.data.manifest.ORIGINAL`; below 1 where a row has
    none), None for one without."""

    locations: list[tuple]
    heights: np.ndarray
    widths: np.ndarray
    pair_sizes: list[tuple[np.ndarray, np.ndarray]]
    identity: tuple
    video: tuple | None = None
    original: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, manifest: Manifest, pairs: list[tuple[str, str]]) -> DatasetArrays:
        """``manifest``'s arrays, with those of ``pairs`` (``(name, kind)`` each, in the decoder's order)."""
        locations = [(manifest.table.column("source"), manifest.int_column("offset", 0),
                      manifest.int_column("length", -1))]  # fmt: skip
        pair_sizes = []
        for name, _ in pairs:
            source, offset, length, width, height = pair_columns(name)
            locations.append(
                (manifest.table.column(source), manifest.int_column(offset, 0), manifest.int_column(length, -1))
            )
            pair_sizes.append((manifest.int_column(height, 1), manifest.int_column(width, 1)))
        identity = (manifest.int_column("source_size", NO_IDENTITY), manifest.int_column("mtime_ns", NO_IDENTITY),
                    manifest.table.column("etag") if "etag" in manifest.table.column_names else None)  # fmt: skip
        return cls(locations, manifest.heights, manifest.widths, pair_sizes, identity, _video_columns(manifest),
                   manifest.original_sizes())  # fmt: skip


def _video_columns(manifest: Manifest) -> tuple | None:
    """``(frames, fps, frame_times)`` of a manifest with a ``frames`` column (see :class:`DatasetArrays`)."""
    names = manifest.table.column_names
    if "frames" not in names:
        return None
    frames = manifest.int_column("frames", -1)
    fps = (
        np.asarray(manifest.table.column("fps").fill_null(0.0).to_numpy(), np.float64)
        if "fps" in names
        else np.zeros(len(frames), np.float64)
    )
    return frames, fps, manifest.table.column("frame_times") if "frame_times" in names else None


class Datasets:
    """Every dataset's :class:`DatasetArrays`, read by global row; part 0 of a row is its image, part ``i + 1`` its
    ``i``-th pair."""

    def __init__(self, manifests: list[Manifest], pairs: list[tuple[str, str]]) -> None:
        self.rows = GlobalRows([len(m) for m in manifests])
        self.arrays = [DatasetArrays.of(m, pairs) for m in manifests]
        self.num_parts = 1 + len(pairs)

    def _split(self, row: int) -> tuple[DatasetArrays, int]:
        d, local = self.rows.split(row)
        return self.arrays[d], local

    def where(self, row: int, part: int) -> tuple[str | None, int, int]:
        """``(path or URL, offset, length)`` of global ``row``'s ``part`` (``length`` -1: the whole file)."""
        arrays, local = self._split(row)
        sources, offsets, lengths = arrays.locations[part]
        return sources[local].as_py(), int(offsets[local]), int(lengths[local])

    def identity(self, row: int, part: int, path: str | None) -> Identity:
        """What the source ``path`` of global ``row``'s ``part`` was at indexing: the row's identity for its image,
        and for a pair in the image's own source (a tar shard's member); unknown for other pairs."""
        arrays, local = self._split(row)
        if part and path != self.where(row, 0)[0]:
            return UNKNOWN
        sizes, mtimes, etags = arrays.identity
        size, mtime = int(sizes[local]), int(mtimes[local])
        return Identity(
            None if size == NO_IDENTITY else size,
            None if mtime == NO_IDENTITY else mtime,
            etags[local].as_py() if etags is not None else None,
        )

    def size(self, row: int) -> tuple[int, int]:
        """``(height, width)`` of global ``row``'s image (displayed)."""
        arrays, local = self._split(row)
        return int(arrays.heights[local]), int(arrays.widths[local])

    def original_size(self, row: int) -> tuple[int, int]:
        """``(height, width)`` of global ``row``'s image before its source resized it (img2dataset's
        ``original_height``/``original_width``) where the manifest has them for the row, else its displayed size:
        SDXL's ``original_size``."""
        arrays, local = self._split(row)
        if arrays.original is not None:
            height, width = int(arrays.original[0][local]), int(arrays.original[1][local])
            if height > 0 and width > 0:
                return height, width
        return int(arrays.heights[local]), int(arrays.widths[local])

    def clip_facts(self, row: int) -> tuple[int, float, np.ndarray | None]:
        """``(frames, fps, frame_times)`` of global ``row``: its frame count (-1 for an image), average frame rate
        and, for a variable-rate video, each frame's time from the first (``float32 [frames]``, else None)."""
        arrays, local = self._split(row)
        if arrays.video is None:
            return -1, 0.0, None
        frames, fps, times = arrays.video
        stamps = times[local].as_py() if times is not None else None
        return int(frames[local]), float(fps[local]), None if stamps is None else np.asarray(stamps, np.float32)

    def is_video(self, rows: np.ndarray) -> np.ndarray:
        """``bool (B,)``: whether each of global ``rows`` (``int64 (B,)``) is a video (a frame count in the manifest)."""
        out = np.zeros(len(rows), bool)
        for i, row in enumerate(np.asarray(rows).tolist()):
            arrays, local = self._split(row)
            out[i] = arrays.video is not None and int(arrays.video[0][local]) >= 0
        return out

    def pair_sizes(self, row: int) -> list[tuple[int, int]]:
        """``(height, width)`` of each of global ``row``'s pairs, in order."""
        arrays, local = self._split(row)
        return [(int(heights[local]), int(widths[local])) for heights, widths in arrays.pair_sizes]

    def request(self, row: int, part: int) -> Request | None:
        """The object-storage request for ``row``'s ``part``, or None when its bytes are in a local file."""
        path, offset, length = self.where(row, part)
        if path is None or not is_url(path):
            return None
        return remote_request(path, offset, length, self.identity(row, part, path).etag)

    def requests(self, rows: np.ndarray) -> list[Request]:
        """Requests for every part of ``rows`` (``int64 (B,)``) that lies in object storage."""
        parts = range(self.num_parts)
        return [r for row in rows.tolist() for part in parts if (r := self.request(row, part)) is not None]
