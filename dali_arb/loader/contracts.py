"""What crosses DALI's runtime between the external source and the iterator, named once.

- :class:`Output`: one output of the external source (name, DALI dtype, layout). Each decoder
  (``decoders/``) holds the tuple of outputs its source produces; the pipeline declares them to
  ``fn.external_source`` from that tuple and the source packs them in that order.
- :data:`META`: the per-sample ``meta`` columns (``int64 (F,)`` per sample, ``(B, F)`` per batch):
  packed by the source with :meth:`MetaLayout.pack`, unpacked by the iterator with
  :meth:`MetaLayout.unpack`, as DALI's own iterators name their outputs with ``output_map``.
- :class:`Failure`: why a planned sample was replaced, carried in the meta as a code, so the main
  process never reads or decodes the file again to explain it.

Imports only the standard library and NumPy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["IO_FIELDS", "META", "Failure", "MetaColumns", "MetaLayout", "Output"]


class Output(NamedTuple):
    """One external-source output: ``name``, DALI type name (``nvidia.dali.types``), layout or ``None``."""

    name: str
    dtype: str
    layout: str | None = None


class Failure(enum.IntEnum):
    """Why a planned sample could not be served (``NONE``: it was served). Stored in ``meta["failure"]``."""

    NONE = 0
    NO_SOURCE = 1
    MISSING = 2
    NOT_REGULAR = 3
    CHANGED = 4
    SHORT = 5
    READ_ERROR = 6
    EMPTY = 7
    TRUNCATED = 8
    NOT_IMAGE = 9
    RESIZED = 10
    UNDECODABLE = 11
    DALI_UNDECODABLE = 12
    TOO_LARGE = 13

    def describe(self, where: str) -> str:
        """One line for the user: ``where`` is the file (or ``shard:offset``) the sample came from."""
        return _DESCRIPTIONS[self].format(where=where)

    @classmethod
    def of_bytes_problem(cls, problem: str) -> Failure:
        """The code for a reason given by :func:`dali_arb.data.imagefacts.check_encoded`."""
        if problem.startswith("empty"):
            return cls.EMPTY
        if problem.startswith("truncated"):
            return cls.TRUNCATED
        return cls.NOT_IMAGE


_UPDATE = "; run `dali-arb index --update` (or re-index) to refresh the manifest"
_DESCRIPTIONS = {
    Failure.NONE: "{where}: served",
    Failure.NO_SOURCE: "manifest row has no source file ({where})",
    Failure.MISSING: "cannot open {where}: missing or unreadable" + _UPDATE,
    Failure.NOT_REGULAR: "{where} is not a regular file (a FIFO, device or folder); only regular files are read",
    Failure.CHANGED: "{where} changed since indexing (rewritten or replaced: its size, its modification time or "
    "its ETag in object storage is not the indexed one)" + _UPDATE,
    Failure.SHORT: "{where} is shorter than indexed (the sample's bytes run past its end)" + _UPDATE,
    Failure.READ_ERROR: "cannot read {where} (I/O error)",
    Failure.EMPTY: "{where} is empty",
    Failure.TRUNCATED: "{where} is truncated (no end-of-image marker)",
    Failure.NOT_IMAGE: "{where} is not an image any more (unknown format)",
    Failure.RESIZED: "{where} changed since indexing (its pixel size differs)" + _UPDATE,
    Failure.UNDECODABLE: "{where} cannot be decoded (damaged image data)",
    Failure.DALI_UNDECODABLE: "{where} cannot be decoded by DALI",
    Failure.TOO_LARGE: "{where} is too large for one sample (over DALI_ARB_MAX_SAMPLE_BYTES, 256 MiB unless set); "
    "it was not read: remove it, or raise the limit",
}


class MetaColumns:
    """Named, read-only columns of a batch's meta, ``int64 (B,)`` each: ``columns.row``, ``columns["step"]``."""

    def __init__(self, layout: MetaLayout, info: np.ndarray) -> None:
        self._layout = layout
        self._info = info  # (B, F)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self._info[:, self._layout.fields.index(name)]
        except ValueError:
            raise AttributeError(f"meta has no column {name!r} (it has {', '.join(self._layout.fields)})") from None

    __getitem__ = __getattr__

    def pairs(self, first: str, second: str) -> np.ndarray:
        """``int64 (B, 2)`` of two columns side by side (e.g. ``("orig_height", "orig_width")``)."""
        i, j = self._layout.fields.index(first), self._layout.fields.index(second)
        return np.ascontiguousarray(self._info[:, [i, j]])


@dataclass(frozen=True)
class MetaLayout:
    """The names of the ``meta`` columns, in order. ``pack`` in the source, ``unpack`` in the iterator."""

    fields: tuple[str, ...]

    def pack(self, **values: int) -> np.ndarray:
        """One sample's meta, ``int64 (F,)``; every field must be given, by name."""
        if values.keys() != set(self.fields):
            missing = sorted(set(self.fields) - values.keys())
            extra = sorted(values.keys() - set(self.fields))
            raise TypeError(f"meta fields missing {missing} / unknown {extra}")
        return np.array([int(values[name]) for name in self.fields], np.int64)

    def unpack(self, info: np.ndarray) -> MetaColumns:
        """Columns of a batch's meta; ``info`` is ``int64 (B, F)``."""
        info = np.asarray(info, dtype=np.int64)
        if info.ndim != 2 or info.shape[1] != len(self.fields):
            raise ValueError(f"meta must be (B, {len(self.fields)}), got {info.shape}")
        return MetaColumns(self, info)


#: Per-sample metadata that travels with every sample through the pipeline.
#: ``row``: manifest row served; ``planned_row``: the row the plan asked for (differs when replaced);
#: ``failure``: a :class:`Failure` code for ``planned_row``; ``failed_part``: 0 when its image failed, ``i + 1`` when
#: its ``i``-th paired image did; ``crop_top``/``crop_left``: the crop corner in
#: resized-image pixels, after the flip; ``orig_height``/``orig_width``: the image's size before its source resized
#: it where the manifest has it (``original_height``/``original_width``: img2dataset's), else its EXIF-upright size.
META = MetaLayout(
    (
        "row",
        "planned_row",
        "failure",
        "failed_part",
        "crop_top",
        "crop_left",
        "orig_height",
        "orig_width",
        "epoch",
        "step",
        "flipped",
        # reads from object storage since the source's last batch (on the batch's first sample, 0 elsewhere)
        "io_requests",
        "io_retries",
        "io_bytes_read",
        "io_bytes_served",
        "io_hits",
        "io_misses",
    )
)
#: The ``io_*`` meta columns, by the name :class:`~dali_arb.data.storage.IOStats` gives them.
IO_FIELDS = {"requests": "io_requests", "retries": "io_retries", "bytes_read": "io_bytes_read",
             "bytes_served": "io_bytes_served", "hits": "io_hits", "misses": "io_misses"}  # fmt: skip


def io_stats(io: dict[str, int]) -> dict[str, int | float]:
    """A loader's ``stats`` from its summed :data:`IO_FIELDS`: ``requests``, ``retries``, ``bytes_read``,
    ``bytes_served``, read-ahead ``hits`` and ``misses`` (zeros for local files), and ``requests_per_sample`` and
    ``bytes_read_per_byte_served``."""
    out: dict[str, int | float] = dict(io)
    samples = io["hits"] + io["misses"]
    out["requests_per_sample"] = round(io["requests"] / samples, 3) if samples else 0.0
    served = io["bytes_served"]
    out["bytes_read_per_byte_served"] = round(io["bytes_read"] / served, 3) if served else 0.0
    return out
