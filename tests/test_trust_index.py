"""Issue 18, indexing findings: what the indexer must never get wrong silently (URL rows of metadata, tars
appended to, captions with unusual line breaks, keys object storage cannot address, unreadable sidecars,
mistakes that ended in "internal error", symlinked folders that leave the dataset)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import DALIBucketIterator, Manifest
from dali_arb.captions import CaptionPolicy
from dali_arb.cli import main
from dali_arb.errors import IndexingError, StorageError
from dali_arb.index import build_index

from .conftest import SMALL
from .images import jpeg_bytes, save_jpeg


def rejects_of(manifest) -> list[dict]:
    path = f"{manifest}.rejects.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def rows_of(manifest) -> dict[str, dict]:
    return {r["key"]: r for r in Manifest.read(manifest).table.to_pylist()}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def loader(manifest, **kw):
    options = {"batch_size": 2, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3}
    return DALIBucketIterator(manifest, **{**options, **kw})


# -- f11: only \n, \r\n and \r end a caption's line ----------------------------------------------------------
ODD_BREAKS = "a cat\u2028on a mat\x85in the sun\x0cat noon"


def test_f11_the_caption_policy_splits_lines_at_newlines_only():
    policy = CaptionPolicy()
    draws = {policy.apply(ODD_BREAKS, np.random.default_rng(i)) for i in range(50)}
    assert draws == {ODD_BREAKS}
    draws = {policy.apply(f"{ODD_BREAKS}\r\nsecond\rthird\n", np.random.default_rng(i)) for i in range(200)}
    assert draws == {ODD_BREAKS, "second", "third"}


def test_f11_an_indexed_caption_with_odd_breaks_is_served_whole(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        save_jpeg(folder / f"p{i}.jpg", 120, 120, seed=i)
        (folder / f"p{i}.txt").write_text(ODD_BREAKS + "\n", encoding="utf-8")
    build_index([str(folder)], tmp_path / "m.parquet", progress=False, workers=1)
    assert {r["caption"] for r in rows_of(tmp_path / "m.parquet").values()} == {ODD_BREAKS}
    served = [c for batch in loader(str(tmp_path / "m.parquet")) for c in batch["captions"]]
    assert served == [ODD_BREAKS, ODD_BREAKS]
