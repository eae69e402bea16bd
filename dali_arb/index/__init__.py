"""Build a manifest from image folders, webdataset tar shards, or Parquet/CSV metadata.

Sizes come from file headers (Pillow's lazy open decodes no pixels) and are EXIF-upright
(``imagefacts.py``). Files that cannot be trained on are refused with a reason
(``MANIFEST.rejects.jsonl``); files that are not images at all (captions, JSON, hidden files) are
neither samples nor rejects. Work is spread over processes; rows stream to Parquet in row groups.

Modules: ``records`` (the row), ``folders``, ``shards``, ``metadata``, ``remote`` (the kinds of source),
``pairing``, ``readers`` (the table of kinds: ``READERS``), ``run`` (what a reader writes into), ``driver``
(``build_index``). Imports pyarrow, Pillow, obstore (object storage, lazily) and ``data``; never DALI or torch.
"""

from __future__ import annotations

from ..data.imagefacts import DEFAULT_MAX_PIXELS, inspect_image
from .captions import CaptionSource
from .driver import IndexSummary, build_index
from .readers import READERS, Reader
from .run import IndexRun

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "READERS",
    "CaptionSource",
    "IndexRun",
    "IndexSummary",
    "Reader",
    "build_index",
    "inspect_image",
]
