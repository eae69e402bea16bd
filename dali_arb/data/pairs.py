"""Paired images: conditioning images (ControlNet: depth, canny, pose) and masks (inpainting, masked loss)
that travel with a sample and are resized, cropped and flipped exactly as its image.

A pair named ``NAME`` is five manifest columns beside the sample's own: ``NAME.source``, ``NAME.offset``,
``NAME.length`` (where its bytes are, as ``source``/``offset``/``length``) and ``NAME.width``,
``NAME.height`` (its displayed, EXIF-upright size). Which names are pairs (3 channels, the images' dtype)
and which are masks (1 channel, [0, 1]) is recorded in the Parquet schema's metadata
(``dali_arb.data.pairs``). A pair of another size must have the image's aspect (within
:data:`ASPECT_TOLERANCE`): the loader cuts the same window, scaled, from it.

Imports only the standard library, pyarrow and ``errors``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow as pa

from ..errors import ConfigError

__all__ = [
    "ASPECT_TOLERANCE",
    "KINDS",
    "PAIRS_KEY",
    "PairSpec",
    "pair_columns",
    "pair_schema",
    "pairs_of",
    "same_aspect",
]

#: How far a pair's aspect ratio may differ from its image's (relative).
ASPECT_TOLERANCE = 0.01
KINDS = ("pair", "mask")
#: Schema metadata key: JSON ``{name: kind}`` of a manifest's pairs, in column order.
PAIRS_KEY = b"dali_arb.data.pairs"
#: Names that are batch keys or manifest columns already.
RESERVED = frozenset(
    "images ids captions original_size crop_top_left target_size flipped epoch step dataset key width height "
    "caption source offset length mtime_ns".split()
)
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_FIELDS = (("source", pa.string()), ("offset", pa.int64()), ("length", pa.int64()), ("width", pa.int32()),
           ("height", pa.int32()))  # fmt: skip


@dataclass(frozen=True)
class PairSpec:
    """One ``--pair NAME=DIR`` / ``--mask NAME`` option: ``kind`` is ``"pair"`` or ``"mask"``; ``folder``
    holds ``K.<ext>`` for the image of key ``K`` (``None``: tar shard members ``K.NAME.<ext>``)."""

    name: str
    kind: str = "pair"
    folder: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"a pair's kind must be 'pair' or 'mask', got {self.kind!r}")
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"pair name must be lower-case letters, digits and _ (starting with a letter, at most 32), "
                f"got {self.name!r}"
            )
        if self.name in RESERVED:
            raise ConfigError(f"pair name {self.name!r} is taken by a batch key or manifest column; choose another")

    @classmethod
    def parse(cls, text: str, kind: str) -> PairSpec:
        """``"NAME=DIR"`` or ``"NAME"`` (the CLI's form)."""
        name, sep, folder = text.partition("=")
        if sep and not folder:
            raise ConfigError(f"--{kind} {text!r} names no folder after '='; give NAME=DIR, or NAME for tar shards")
        return cls(name, kind, folder or None)


def pair_columns(name: str) -> tuple[str, str, str, str, str]:
    """``(source, offset, length, width, height)`` column names of pair ``name``."""
    return tuple(f"{name}.{field}" for field, _ in _FIELDS)  # type: ignore[return-value]


def pair_schema(schema: pa.Schema, pairs: list[PairSpec] | dict[str, str]) -> pa.Schema:
    """``schema`` with the columns of ``pairs`` appended and recorded in its metadata."""
    kinds = pairs if isinstance(pairs, dict) else {p.name: p.kind for p in pairs}
    if not kinds:
        return schema
    for name in kinds:
        for (_, arrow_type), column in zip(_FIELDS, pair_columns(name)):
            schema = schema.append(pa.field(column, arrow_type))
    return schema.with_metadata({**(schema.metadata or {}), PAIRS_KEY: json.dumps(kinds).encode()})


def pairs_of(schema: pa.Schema) -> dict[str, str]:
    """``{name: kind}`` of the pairs a manifest's schema records (``{}`` for none); a ConfigError when the
    record and the columns disagree."""
    raw = (schema.metadata or {}).get(PAIRS_KEY)
    if raw is None:
        return {}
    try:
        kinds = json.loads(raw)
    except ValueError:
        kinds = None
    if not isinstance(kinds, dict) or not all(k in KINDS for k in kinds.values()):
        raise ConfigError(f"the manifest's pair record is damaged ({raw[:80]!r}); rebuild it with `dali-arb index`")
    missing = [c for name in kinds for c in pair_columns(name) if c not in schema.names]
    if missing:
        raise ConfigError(f"the manifest records pairs but lacks column(s) {', '.join(missing)}; rebuild it")
    return kinds


def same_aspect(width: int, height: int, pair_width: int, pair_height: int) -> bool:
    """Whether a pair of ``pair_width x pair_height`` has the aspect of an image of ``width x height``."""
    return abs((pair_width / pair_height) / (width / height) - 1) <= ASPECT_TOLERANCE
