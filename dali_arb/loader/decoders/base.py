"""What every decoder is (:class:`Decoder`) and the helpers they share (JPEG DCT reduction, the cores to use).

A decoder is chosen once per loader and holds its external-source outputs, its part of the DALI graph and
its defaults. Decoder objects are small and picklable: they travel to the worker processes inside the source.
The decoders themselves are one module each (``dali.py``, ``pillow.py``, ``opencv.py``), found by name in
``registry.py``. Imports NumPy, ``plan.geometry`` and ``loader.contracts``; DALI only inside a decoder's
:meth:`Decoder.graph`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...errors import ConfigError
from ...plan.geometry import Geometry
from ..contracts import Failure, Output

__all__ = [
    "JPEG_SCALINGS",
    "QUALITY_MARGIN",
    "Decoder",
    "cpu_count",
    "jpeg_reduction",
    "reduction_margin",
]

_MIRROR = Output("mirror", "INT32")
#: ``jpeg_scaling="quality"`` decodes a JPEG at a reduced DCT scale only while the decoded image stays at least
#: this many times the resize on both sides. libjpeg-turbo's reduced decode truncates each 8x8 block's DCT on its
#: own; on detailed photos it lands 29-31 dB from any full-resolution antialiased resize, and a further shrink
#: of 3x or more filters that difference away (worst 36.7 dB against 28.6 at a margin of 1 on 4-12 MP photos;
#: `python -m benchmarks jpeg_scaling`, RESULTS.md).
QUALITY_MARGIN = 3.0
#: the values of ``jpeg_scaling``: ``"quality"`` (the default) or ``"fast"`` (the largest reduction that covers
#: the resize, as the fastest peers decode: about 2.7x less decoding on large photos, 28-30 dB worst).
JPEG_SCALINGS = ("quality", "fast")


def reduction_margin(jpeg_scaling: str) -> float:
    """How many times the resize a reduced JPEG decode must keep on both sides under ``jpeg_scaling``
    (validated: a ConfigError echoing any other value)."""
    if jpeg_scaling not in JPEG_SCALINGS:
        raise ConfigError(f"jpeg_scaling must be 'quality' or 'fast', got {jpeg_scaling!r}")
    return QUALITY_MARGIN if jpeg_scaling == "quality" else 1.0


_META = Output("meta", "INT64")


@dataclass(frozen=True)
class Decoder:
    """What turns a planned sample into pixels at its bucket size (``uint8 HWC``) inside the pipeline.

    A sample has parts: its image, then each of its paired images (``pairs``: ``(name, kind)``, kind
    ``"pair"`` for 3 channels or ``"mask"`` for 1, in the manifest's order). Each part has the outputs
    :attr:`part_outputs` (a pair's named ``NAME.<output>``); :attr:`shared_outputs` are given once per
    sample (the bucket size), ``mirror`` and ``meta`` come last.

    Attributes:
        name: the value of ``decoder=`` that picks it.
        part_outputs: the external-source outputs of one part, unprefixed.
        shared_outputs: outputs given once per sample.
        pairs: ``((name, kind), ...)`` of the manifest the loader serves.
        summary: who decodes, and how, in a few words (``--help``).
        settings: the keyword settings of ``choose_decoder`` it takes (fields of its own).
        ignored_under_auto: settings of other decoders it drops quietly when ``decoder="auto"`` chose it (it has
            nothing to do with them); any other setting it does not take is refused.
        refusals: ``((setting, message), ...)``: the whole error message when this decoder is given a setting it
            refuses (``{name}``, ``{value}`` and ``{owners}``, the decoders that take it, are filled in); others get a message built from the table.
    """

    name: ClassVar[str]
    part_outputs: ClassVar[tuple[Output, ...]]
    shared_outputs: ClassVar[tuple[Output, ...]] = ()
    summary: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()
    ignored_under_auto: ClassVar[tuple[str, ...]] = ()
    refusals: ClassVar[tuple[tuple[str, str], ...]] = ()
    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def outputs(self) -> tuple[Output, ...]:
        """The external source's outputs, in order: the image's, the shared ones, each pair's, mirror, meta."""
        paired = tuple(o._replace(name=f"{name}.{o.name}") for name, _ in self.pairs for o in self.part_outputs)
        return (*self.part_outputs, *self.shared_outputs, *paired, _MIRROR, _META)

    @property
    def parts(self) -> tuple[tuple[str, str, int], ...]:
        """``(output key, output prefix, channels)`` of the image and of each pair."""
        return (("images", "", 3), *((name, f"{name}.", 1 if kind == "mask" else 3) for name, kind in self.pairs))

    def with_pairs(self, pairs: tuple[tuple[str, str], ...]) -> Decoder:
        """This decoder serving a manifest with ``pairs`` (a copy; decoders are values)."""
        import copy

        chosen = copy.copy(self)
        object.__setattr__(chosen, "pairs", tuple((str(n), str(k)) for n, k in pairs))
        return chosen

    def prepare(
        self, data: np.ndarray, geometry: Geometry, *, channels: int = 3
    ) -> tuple[dict[str, np.ndarray] | None, Failure]:
        """One part's outputs (:attr:`part_outputs`, plus :attr:`shared_outputs` for the image), from its
        encoded bytes ``uint8 (n,)`` and its geometry (a pair's: its own size, the image's crop), or
        ``(None, failure)`` when it cannot be served. Runs in the worker processes."""
        raise NotImplementedError

    def graph(self, feeds: dict[str, Any], *, gpu: bool) -> dict[str, Any]:
        """DALI nodes from the external source's ``feeds`` (by output name) to ``uint8 HWC`` images at
        the bucket size, on the GPU when ``gpu``: ``{"images": node, pair name: node, ...}``."""
        raise NotImplementedError

    def default_workers(self, cores: int) -> int:
        """Worker processes when the user gives none."""
        raise NotImplementedError

    def default_threads(self, cores: int, *, gpu: bool) -> int:
        """DALI threads when the user gives none."""
        raise NotImplementedError

    def bytes_per_sample(self, encoded_bytes: int, bucket_pixels: int) -> int:
        """Shared-memory bytes one sample takes between a worker and the pipeline."""
        raise NotImplementedError

    def enter_worker(self) -> None:
        """Called once in each worker process, and for each worker thread, before it serves a batch."""

    def options(self) -> dict[str, Any]:
        """The decoder's settings, for logs and benchmark records."""
        return {"decoder": self.name}


def jpeg_reduction(height: int, width: int, cover_h: int, cover_w: int, *, margin: float = 1.0) -> int:
    """The largest JPEG DCT reduction (8, 4, 2; else 1) whose output keeps at least ``margin`` times
    ``(cover_h, cover_w)`` on both sides."""
    return next((f for f in (8, 4, 2) if height // f >= margin * cover_h and width // f >= margin * cover_w), 1)


def cpu_count() -> int:
    """Cores this process may use (the affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
