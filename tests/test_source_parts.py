"""The external source's parts (issue 19): one global-row mapping, local files as a backend, deterministic
stand-ins, the batch's columns, and a manifest that maps through the node cache without importing it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dali_arb import BucketSpec, ConfigError, DataError, Manifest, StorageError
from dali_arb.data import manifest as manifest_module
from dali_arb.data.localfiles import UNKNOWN, FileProblem, Identity, read_local
from dali_arb.data.manifest import ManifestSet
from dali_arb.loader.assembly import BatchColumns, place
from dali_arb.loader.contracts import IO_FIELDS, META, Failure, Output
from dali_arb.loader.replacements import MAX_REPLACEMENT_TRIES, replacement_row, serve_or_replace
from dali_arb.loader.samples import Datasets
from dali_arb.plan.buckets import BucketIndex
from dali_arb.plan.mixture import MixedIndex
from dali_arb.plan.rows import GlobalRows

from .conftest import random_sizes


def _manifest(n: int, *, seed: int = 0, source: str = "/data/x.jpg") -> Manifest:
    h, w = random_sizes(n, seed=seed)
    return Manifest(
        pa.table({"key": [f"{seed}-{i}" for i in range(n)], "width": w, "height": h, "source": [source] * n})
    )


# -- one global row -> (dataset, local row) mapping ----------------------------------------------------------------
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.data())
def test_global_rows_split_and_join_back(counts, data):
    rows = GlobalRows(counts)
    assert len(rows) == sum(counts) and rows.num_datasets == len(counts)
    if not len(rows):
        return
    picked = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=30)), np.int64)
    datasets = rows.dataset_of(picked)
    for row, d in zip(picked.tolist(), datasets.tolist()):
        k, local = rows.split(row)
        assert k == d and 0 <= local < counts[d] and int(rows.to_global(d, local)) == row
    seen = np.full(len(picked), -1)
    for d, at, local in rows.by_dataset(picked.reshape(-1, 1)):
        assert np.all(datasets[at] == d) and np.array_equal(rows.to_global(d, local), picked[at])
        seen[at] = d
    assert np.array_equal(seen, datasets)


@pytest.mark.parametrize("counts", [[], [3, -1], [2.5], [True]])
def test_global_rows_refuse_bad_counts_echoing_them(counts):
    with pytest.raises(ConfigError, match=repr(counts).replace("[", r"\[").replace("]", r"\]")):
        GlobalRows(counts)


def test_manifests_mixture_and_source_share_one_mapping():
    manifests = [_manifest(n, seed=s) for s, n in enumerate((7, 0, 12))]
    spec = BucketSpec()
    indexes = [BucketIndex.of(spec.assign(m.heights, m.widths)) for m in manifests]
    mixed = MixedIndex(indexes, (1.0, 1.0, 1.0), [spec] * 3, seed=0)
    data = ManifestSet(manifests)
    arrays = Datasets(manifests, [])
    for owner in (mixed, data, arrays):
        assert isinstance(owner.rows, GlobalRows) and owner.rows.offsets.tolist() == [0, 7, 7, 19]
    rows = np.arange(19)
    assert data.dataset_of(rows).tolist() == mixed.dataset_of(rows).tolist() == [0] * 7 + [2] * 12
    assert [arrays.size(r) for r in rows] == list(
        zip(data.ints_at("heights", rows, 0), data.ints_at("widths", rows, 0))
    )
    assert data.keys_at([8, 0]) == ["2-1", "0-0"]


# -- local files as a backend --------------------------------------------------------------------------------------
def test_failure_codes_name_every_problem_of_a_local_file():
    assert {p.name for p in FileProblem} <= set(Failure.__members__)


def test_read_local_returns_the_bytes_or_the_files_own_problem(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"0123456789")
    info = path.stat()
    same = Identity(10, info.st_mtime_ns, None)
    assert read_local(str(path), 0, -1, same) == b"0123456789"
    assert read_local(str(path), 2, 3, same) == b"234"
    assert read_local(str(path), 2, 3, UNKNOWN) == b"234"
    assert read_local(str(path), 8, 3, same) is FileProblem.SHORT
    assert read_local(str(path), 0, -1, Identity(11, None, None)) is FileProblem.CHANGED
    assert read_local(str(path), 0, -1, Identity(None, info.st_mtime_ns + 1, None)) is FileProblem.CHANGED
    assert read_local(str(path), 0, 9, UNKNOWN) is FileProblem.CHANGED  # no size recorded: a whole file's length
    assert read_local(str(tmp_path / "gone"), 0, -1, UNKNOWN) is FileProblem.MISSING
    assert read_local(str(tmp_path), 0, -1, UNKNOWN) is FileProblem.NOT_REGULAR
    os.mkfifo(tmp_path / "fifo")
    assert read_local(str(tmp_path / "fifo"), 0, -1, UNKNOWN) is FileProblem.NOT_REGULAR  # and did not block
    monkeypatch.setenv("DALI_ARB_MAX_SAMPLE_BYTES", "4")
    assert read_local(str(path), 0, -1, UNKNOWN) is FileProblem.TOO_LARGE


@pytest.mark.parametrize("where", ["open", "pread"])
def test_read_local_raises_when_the_os_fails_not_the_file(tmp_path, monkeypatch, where):
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    code = errno.EMFILE if where == "open" else errno.EIO

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, where, fail)
    with pytest.raises(StorageError, match=f"{path}.*{errno.errorcode[code]}"):
        read_local(str(path), 0, -1, UNKNOWN)


# -- deterministic stand-ins ---------------------------------------------------------------------------------------
def test_replacements_are_deterministic_and_from_the_bucket():
    h, w = random_sizes(400, seed=3)
    index = BucketIndex.of(BucketSpec().assign(h, w))
    bucket = int(np.argmax(index.counts()))
    members = set(index.member_rows(np.arange(index.starts[bucket], index.starts[bucket + 1]), 0).tolist())
    picks = [replacement_row(index, 7, bucket, 0, 3, p, a) for p in range(5) for a in range(3)]
    assert set(picks) <= members and len(set(picks)) > 1
    assert picks == [replacement_row(index, 7, bucket, 0, 3, p, a) for p in range(5) for a in range(3)]
    assert picks != [replacement_row(index, 8, bucket, 0, 3, p, a) for p in range(5) for a in range(3)]


def test_serve_or_replace_skips_known_bad_rows_and_reports_the_planned_failure():
    bad, served, found = {10, 11}, [], []

    def serve(row):
        served.append(row)
        return (None, Failure.TRUNCATED, 1) if row in bad else (f"sample {row}", Failure.NONE, 0)

    common = {"serve": serve, "found_bad": lambda row, failure, part: found.append(row), "bucket_size": (512, 768),
              "epoch": 2, "step": 5}  # fmt: skip
    stand_ins = [11, 12, 13]
    result = serve_or_replace(10, usable=lambda r: r != 12, stand_in=stand_ins.__getitem__, **common)
    assert result == (13, Failure.TRUNCATED, 1, "sample 13")
    assert served == [10, 11, 13] and found == [10, 11]  # 12 was known bad: never read
    assert serve_or_replace(20, usable=lambda r: True, stand_in=stand_ins.__getitem__, **common)[:3] == (20, 0, 0)
    with pytest.raises(DataError, match=f"768x512 after {MAX_REPLACEMENT_TRIES} tries .epoch 2, step 5"):
        serve_or_replace(10, usable=lambda r: True, stand_in=lambda a: 11, **common)


def test_a_planned_row_found_bad_earlier_still_reports_its_failure():
    """A row this source found bad as a stand-in (or through another clip of its video) and planned later is skipped
    unread, and its failure is still reported, so the loader lists it (it was silently skipped before)."""
    known = {10: (Failure.CHANGED, 0)}
    result = serve_or_replace(10, serve=lambda row: (f"sample {row}", Failure.NONE, 0), usable=lambda r: r not in known,
                              found_bad=lambda *a: None, known_bad=known.get, stand_in=lambda a: 14,
                              bucket_size=(64, 64), epoch=0, step=0)  # fmt: skip
    assert result == (14, Failure.CHANGED, 0, "sample 14")


# -- the batch's columns -------------------------------------------------------------------------------------------
def test_batch_columns_pack_the_meta_and_mirror_the_crop():
    g = place(300, 500, bucket_h=256, bucket_w=384, u_y=0.5, u_x=0.25, center=False)
    assert (g.resized_h, g.bucket_h, g.bucket_w) == (256, 256, 384) and g.resized_w >= 384
    columns = BatchColumns(
        (Output("images", "UINT8", "HWC"), Output("mirror", "INT32", None), Output("meta", "INT64", None))
    )
    for mirror in (False, True):
        columns.add({"images": np.zeros(1)}, row=4, planned=9, failure=Failure.CHANGED, failed_part=0, geometry=g,
                    mirror=mirror, epoch=1, step=2)  # fmt: skip
    columns.count_reads(dict.fromkeys(IO_FIELDS, 3))
    images, mirrors, meta = columns.outputs()
    assert len(images) == 2 and [int(m) for m in mirrors] == [0, 1]
    first, second = (dict(zip(META.fields, m.tolist())) for m in meta)
    assert first["row"] == 4 and first["planned_row"] == 9 and first["failure"] == Failure.CHANGED
    assert first["crop_left"] == g.left and second["crop_left"] == g.resized_w - g.left - g.bucket_w
    assert all(first[c] == 3 for c in IO_FIELDS.values()) and all(second[c] == 0 for c in IO_FIELDS.values())


# -- no manifest <-> cache circle ----------------------------------------------------------------------------------
def test_manifest_open_maps_through_what_the_cache_registered(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(manifest_module, "_mapper", lambda path, cache_dir: opened.append((path, cache_dir)) or "m")
    assert Manifest.open("x.parquet", cache_dir=tmp_path) == "m" and opened == [("x.parquet", tmp_path)]


def test_importing_the_manifest_alone_registers_the_node_cache(tmp_path):
    path = tmp_path / "m.parquet"
    _manifest(5).write(path)
    code = (
        "import sys\nfrom dali_arb.data.manifest import Manifest\n"
        "m = Manifest.open(sys.argv[1], cache_dir=sys.argv[2])\n"
        "print(type(m.cache).__module__, len(m))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "c")], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.split() == ["dali_arb.data.cache", "5"]
