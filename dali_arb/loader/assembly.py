"""A batch's outputs put together: each sample's place in its bucket (cover resize and crop) and its meta
(``contracts.META``), collected into the lists DALI's external source returns.

Imports NumPy and, below the loader, ``plan.geometry`` and ``contracts`` (no DALI).
"""

from __future__ import annotations

import numpy as np

from ..plan.geometry import Geometry, cover_crop
from .contracts import IO_FIELDS, META, Failure, Output

__all__ = ["BatchColumns", "place"]


def place(height: int, width: int, *, bucket_h: int, bucket_w: int, u_y: float, u_x: float, center: bool) -> Geometry:
    """Where an image of ``(height, width)`` goes in a batch of bucket ``(bucket_h, bucket_w)``, given its crop
    draws ``u_y``, ``u_x`` in ``[0, 1)`` (``center``: the crop is centred, the draws unused)."""
    rh, rw, top, left = cover_crop(height, width, bucket_h, bucket_w, u_y, u_x, center=center)
    return Geometry(height, width, rh, rw, top, left, bucket_h, bucket_w)


class BatchColumns:
    """One list of per-sample arrays per output name (``outputs``, in order), filled sample by sample."""

    def __init__(self, outputs: tuple[Output, ...]) -> None:
        self._names = [output.name for output in outputs]
        self._columns: dict[str, list] = {name: [] for name in self._names}

    def add(
        self,
        sample: dict[str, np.ndarray],
        *,
        row: int,
        planned: int,
        failure: Failure,
        failed_part: int,
        geometry: Geometry,
        mirror: bool,
        epoch: int,
        step: int,
        original: tuple[int, int] | None = None,
    ) -> None:
        """Append ``sample`` (the decoder's outputs), its ``mirror`` (``int32 ()``) and its ``meta`` (``int64
        (F,)``): ``row`` served for ``planned``, whose ``failure`` (and ``failed_part``) made it a stand-in. The crop's
        left edge is given in the flipped image when ``mirror``. ``original``: ``(height, width)`` of the image
        before its source resized it (the manifest's original size); None: the size it is served from."""
        g = geometry
        for name, value in sample.items():
            self._columns[name].append(value)
        self._columns["mirror"].append(np.array(mirror, np.int32))
        self._columns["meta"].append(
            META.pack(
                row=row,
                planned_row=planned,
                failure=failure,
                failed_part=failed_part,
                crop_top=g.top,
                crop_left=g.resized_w - g.left - g.bucket_w if mirror else g.left,
                orig_height=g.height if original is None else original[0],
                orig_width=g.width if original is None else original[1],
                epoch=epoch,
                step=step,
                flipped=mirror,
                **dict.fromkeys(IO_FIELDS.values(), 0),
            )
        )

    def count_reads(self, counts: dict[str, int]) -> None:
        """Put ``counts`` (what was read from object storage since the last batch, by :data:`IO_FIELDS` key) on
        the first sample's meta."""
        first = self._columns["meta"][0]
        for name, column in IO_FIELDS.items():
            first[META.fields.index(column)] = counts[name]

    def outputs(self) -> tuple[list, ...]:
        """The lists, in the order of the outputs."""
        return tuple(self._columns[name] for name in self._names)
