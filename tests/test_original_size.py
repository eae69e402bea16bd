"""img2dataset's ``original_width``/``original_height`` (issue 22): metadata and the Parquet beside shards -> the
manifest's ``ORIGINAL`` columns -> the node cache -> ``batch["original_size"]`` and SDXL's ``time_ids``; rows without
a usable original size keep their indexed size; a manifest whose sources give none has no such columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import Manifest
from dali_arb.data.manifest import ORIGINAL
from dali_arb.errors import ManifestError
from dali_arb.index import build_index
from dali_arb.index.records import index_schema

from .conftest import SMALL, small_loader
from .images import save_jpeg
from .test_shards_meta import img2dataset_shard, write_shard

#: (width, height) of the stored (resized) images: every one fits a SMALL bucket.
STORED = [(300, 200), (200, 300), (240, 240), (320, 180), (180, 320), (260, 200), (210, 280), (330, 250)]


def photos(folder: Path, sizes: list[tuple[int, int]] = STORED, prefix: str = "img") -> list[str]:
    """Real JPEGs ``folder/<prefix>N.jpg`` of ``sizes``; their keys."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        save_jpeg(folder / f"{prefix}{i}.jpg", w, h, seed=i)
    return [f"{prefix}{i}" for i in range(len(sizes))]


def metadata(path: Path, keys: list[str], originals: list, *, sizes=STORED, fmt: str = "parquet") -> Path:
    """img2dataset-style metadata for the images ``keys`` beside ``path`` (``key``, ``path``, sizes, caption, status)
    with ``original_width``/``original_height`` from ``originals`` (``(w, h)`` each, as written: any value)."""
    columns = {
        "key": keys,
        "path": [f"{k}.jpg" for k in keys],
        "width": [w for w, _ in sizes[: len(keys)]],
        "height": [h for _, h in sizes[: len(keys)]],
        "caption": [f"caption {k}" for k in keys],
        "status": ["success"] * len(keys),
        "original_width": [o[0] for o in originals],
        "original_height": [o[1] for o in originals],
    }
    if fmt == "csv":
        lines = [",".join(columns)]
        for i in range(len(keys)):
            lines.append(",".join("" if columns[c][i] is None else str(columns[c][i]) for c in columns))
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.table(columns), path)
    return path


def served_original_sizes(manifest, **options) -> dict[str, tuple[int, int]]:
    """``{key: (height, width)}`` of ``batch["original_size"]`` over one epoch of the torch loader (CPU)."""
    seen: dict[str, tuple[int, int]] = {}
    with small_loader(manifest, **options) as loader:
        for batch in loader:
            for i, key in enumerate(batch["ids"]):
                seen[key] = tuple(batch["original_size"][i].tolist())
    return seen


# -- metadata -> manifest -> batch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opened", ["node cache", "in memory"])
def test_metadata_original_sizes_are_the_batchs_original_size(tmp_path: Path, opened: str) -> None:
    folder = tmp_path / "images"
    keys = photos(folder)
    originals = [(w * 4, h * 4) for w, h in STORED]  # 4000x3000-class photos stored at about 1024
    meta = metadata(folder / "meta.parquet", keys, originals)
    out = tmp_path / "m.parquet"
    build_index([str(meta)], out, workers=1, progress=False)
    table = pq.read_table(out)
    assert table.schema.field("original_width").type == pa.int32()
    assert table.column("original_width").to_pylist() == [w for w, _ in originals]
    assert table.column("original_height").to_pylist() == [h for _, h in originals]
    manifest = str(out) if opened == "node cache" else Manifest.read(out)
    seen = served_original_sizes(manifest, leftover="partial")
    assert seen == {k: (h, w) for k, (w, h) in zip(keys, originals)}


def test_add_time_ids_conditions_on_the_original_size(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from dali_arb.sdxl import add_time_ids

    folder = tmp_path / "images"
    keys = photos(folder)
    originals = {k: (w * 3, h * 3) for k, (w, h) in zip(keys, STORED)}
    meta = metadata(folder / "meta.parquet", keys, list(originals.values()))
    build_index([str(meta)], tmp_path / "m.parquet", workers=1, progress=False)
    with small_loader(str(tmp_path / "m.parquet"), leftover="partial") as loader:
        batch = next(iter(loader))
    ids = add_time_ids(batch)
    for i, key in enumerate(batch["ids"]):
        w, h = originals[key]
        assert ids[i, :2].tolist() == [h, w]
        assert ids[i, :2].dtype == torch.float32


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_missing_or_bad_original_sizes_fall_back_per_row(tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "images"
    keys = photos(folder)
    originals = [(1200, 800), (None, None), (0, 900), (-4, -4), (1000, None), (2**40, 600), (840, 1120), (1.5, 2)]
    if fmt == "csv":
        originals[7] = ("abc", "12x")  # text that is not a number
    meta = metadata(folder / f"meta.{fmt}", keys, originals, fmt=fmt)
    out = tmp_path / "m.parquet"
    summary = build_index([str(meta)], out, workers=1, progress=False)
    assert summary.rows == len(keys) and summary.rejected == 0  # a bad original size never rejects its image
    table = pq.read_table(out)
    kept = {0: (1200, 800), 6: (840, 1120)}
    assert table.column("original_width").to_pylist() == [kept.get(i, (None,))[0] for i in range(len(keys))]
    assert table.column("original_height").to_pylist() == [kept.get(i, (None, None))[1] for i in range(len(keys))]
    seen = served_original_sizes(str(out), leftover="partial")
    for i, (key, (w, h)) in enumerate(zip(keys, STORED)):
        ow, oh = kept.get(i, (w, h))
        assert seen[key] == (oh, ow), key


def test_a_manifest_whose_sources_give_no_original_size_has_no_such_columns(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    keys = photos(folder)
    plain = tmp_path / "plain.parquet"
    build_index([str(folder)], plain, workers=1, progress=False)
    # the schema as before original sizes existed: these columns and types, in this order, and the format version
    before = [("key", "string"), ("width", "int32"), ("height", "int32"), ("caption", "string"), ("source", "string"),
              ("offset", "int64"), ("length", "int64"), ("mtime_ns", "int64"), ("ctime_ns", "int64"),
              ("source_size", "int64"), ("etag", "string")]  # fmt: skip
    schema = pq.read_schema(plain)
    assert [(f.name, str(f.type)) for f in schema] == before and schema == index_schema([])
    assert schema.metadata[b"dali_arb.format"] == b"1"
    assert Manifest.read(plain).original_sizes() is None
    # metadata with the columns but no usable value in them: nothing to write either
    meta = metadata(folder / "meta.parquet", keys, [(None, 0)] * len(keys))
    build_index([str(meta)], tmp_path / "none.parquet", workers=1, progress=False)
    assert not set(ORIGINAL.names) & set(pq.read_schema(tmp_path / "none.parquet").names)
    seen = served_original_sizes(str(plain), leftover="partial")
    assert seen == {k: (h, w) for k, (w, h) in zip(keys, STORED)}


def test_rows_before_the_first_original_size_are_joined_in_front(tmp_path: Path) -> None:
    """A folder of images (none) indexed before metadata (some): the rows written without the columns are joined
    in front of the rest, in order, null there; nothing is left beside the manifest."""
    plain = tmp_path / "plain"
    plain_keys = photos(plain, STORED[:3], prefix="p")
    folder = tmp_path / "images"
    keys = photos(folder)
    meta = metadata(folder / "meta.parquet", keys, [(w * 2, h * 2) for w, h in STORED])
    out = tmp_path / "m.parquet"
    build_index([str(plain), str(meta)], out, workers=1, progress=False)
    table = pq.read_table(out)
    assert table.column("key").to_pylist() == plain_keys + keys
    assert table.column("original_width").to_pylist() == [None] * 3 + [w * 2 for w, _ in STORED]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "m.parquet", "m.parquet.rejects.jsonl", "plain"]
    # the VIDEO columns still come after them (the order both engines write)
    assert table.schema.names[-2:] == ORIGINAL.names


def test_a_manifest_in_parts_carries_them(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    keys = photos(folder)
    originals = [(w * 4, h * 4) for w, h in STORED]
    meta = metadata(folder / "meta.parquet", keys, originals)
    build_index([str(meta)], f"{tmp_path / 'parts'}/", workers=1, progress=False)
    heights, widths = Manifest.read(tmp_path / "parts").original_sizes()
    assert widths.tolist() == [w for w, _ in originals] and heights.tolist() == [h for _, h in originals]
    seen = served_original_sizes(str(tmp_path / "parts"), leftover="partial")
    assert seen == {k: (h, w) for k, (w, h) in zip(keys, originals)}


# -- the node cache ---------------------------------------------------------------------------------------------------


def test_the_node_cache_maps_them_with_0_where_a_row_has_none(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    keys = photos(folder)
    originals = [(1600, 1200), (None, None)] * 4
    meta = metadata(folder / "meta.parquet", keys, originals)
    build_index([str(meta)], tmp_path / "m.parquet", workers=1, progress=False)
    mapped = Manifest.open(tmp_path / "m.parquet", cache_dir=tmp_path / "cache")
    assert mapped.cache is not None and set(ORIGINAL.names) <= set(mapped.cache.meta["columns"])
    heights, widths = mapped.original_sizes()
    # the mapped column files themselves (int32, read-only, no private copy per process)
    assert heights.dtype == np.int32 and widths.dtype == np.int32
    assert not heights.flags.owndata and not heights.flags.writeable
    assert widths.tolist() == [1600, 0] * 4 and heights.tolist() == [1200, 0] * 4
    # a manifest without them: the cache holds none either
    build_index([str(folder)], tmp_path / "plain.parquet", workers=1, progress=False)
    plain = Manifest.open(tmp_path / "plain.parquet", cache_dir=tmp_path / "cache")
    assert not set(ORIGINAL.names) & set(plain.cache.meta["columns"]) and plain.original_sizes() is None


def test_a_manifest_with_original_sizes_that_are_not_numbers_is_refused(tmp_path: Path) -> None:
    table = pa.table({"key": ["a"], "width": [10], "height": [10], "original_width": ["big"], "original_height": [1]})
    with pytest.raises(ManifestError, match=r"original_width.*must hold integers"):
        Manifest(table, path=tmp_path / "m.parquet")


# -- shards with img2dataset's Parquet ---------------------------------------------------------------------------------


def test_shards_take_original_sizes_from_the_parquet_beside_them(tmp_path: Path) -> None:
    shard, meta = img2dataset_shard(tmp_path / "shards")
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    given = pq.read_table(meta).to_pydict()
    expected = {k: (ow, oh) for k, s, ow, oh in zip(given["key"], given["status"], given["original_width"],
                                                     given["original_height"]) if s == "success"}  # fmt: skip
    table = pq.read_table(out)
    got = dict(zip(table.column("key").to_pylist(),
                   zip(table.column("original_width").to_pylist(), table.column("original_height").to_pylist())))  # fmt: skip
    assert got == expected
    seen = served_original_sizes(str(out), leftover="partial")
    assert seen == {k: (oh, ow) for k, (ow, oh) in expected.items()}


def test_samples_the_parquet_does_not_size_have_their_own_size(tmp_path: Path) -> None:
    from .images import jpeg_bytes

    folder = tmp_path / "shards"
    folder.mkdir()
    shard = write_shard(folder / "00000.tar", [("a", jpeg_bytes(200, 300, seed=1), None),
                                               ("b", jpeg_bytes(300, 200, seed=2), None),
                                               ("c", jpeg_bytes(240, 240, seed=3), None)])  # fmt: skip
    pq.write_table(pa.table({"key": ["a", "b"], "width": [200, 300], "height": [300, 200],
                             "original_width": [800.0, float("nan")], "original_height": [1200.0, 800.0]}),
                   folder / "00000.parquet")  # fmt: skip
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    table = pq.read_table(out)
    assert table.column("original_width").to_pylist() == [800, None, None]  # b: NaN; c: not in the Parquet
    assert served_original_sizes(str(out), leftover="partial") == {"a": (1200, 800), "b": (200, 300), "c": (240, 240)}


def test_update_keeps_them_and_reads_them_for_a_shard_indexed_before(tmp_path: Path) -> None:
    shard, _ = img2dataset_shard(tmp_path / "shards")
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    first = pq.read_table(out)
    again = build_index([str(shard)], out, workers=1, progress=False, update=True)
    assert again.reused == first.num_rows
    assert pq.read_table(out).select(["key", *ORIGINAL.names]) == first.select(["key", *ORIGINAL.names])
    # a manifest written before original sizes were read (the same rows without the columns): read again
    pq.write_table(first.drop_columns(ORIGINAL.names), out)
    fresh = build_index([str(shard)], out, workers=1, progress=False, update=True)
    assert fresh.reused == 0
    assert pq.read_table(out).select(["key", *ORIGINAL.names]) == first.select(["key", *ORIGINAL.names])


# -- the Ray engine ----------------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[tuple]:
    table = Manifest.read(path).table
    names = ["key", "width", "height", "caption", "source", "offset", "length", *ORIGINAL.names]
    return sorted(zip(*(table.column(c).to_pylist() for c in names)), key=lambda r: r[0])


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_original_sizes(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    plain = tmp_path / "plain"
    photos(plain, STORED[:3], prefix="p")
    shard, _ = img2dataset_shard(tmp_path / "shards")
    folder = tmp_path / "images"
    keys = photos(folder)
    meta = metadata(folder / "meta.parquet", keys, [(w * 2, None if i == 2 else h * 2) for i, (w, h) in
                                                    enumerate(STORED)])  # fmt: skip
    sources = [str(plain), str(shard), str(meta)]
    build_index(sources, tmp_path / "local.parquet", workers=1, progress=False)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        build_index(sources, tmp_path / "ray.parquet", engine="ray", progress=False)
        build_index(sources, f"{tmp_path / 'ray-parts'}/", engine="ray", progress=False)
    finally:
        if started:
            ray.shutdown()
    local = pq.read_table(tmp_path / "local.parquet")
    assert pq.read_schema(tmp_path / "ray.parquet").names == local.schema.names
    assert local.column("original_width").null_count == 3 + 1  # the folder's images, and key img2
    assert _rows(tmp_path / "ray.parquet") == _rows(tmp_path / "local.parquet") == _rows(tmp_path / "ray-parts")
    # in parts, only the parts whose rows have them hold the columns; the cache fills the others with 0
    index = json.loads((tmp_path / "ray-parts" / "_manifest.json").read_text())
    with_columns = [p for p in index["parts"] if "original_width" in pq.read_schema(tmp_path / "ray-parts" / p["path"]).names]  # fmt: skip
    assert 0 < len(with_columns) < len(index["parts"])
    heights, widths = Manifest.open(tmp_path / "ray-parts", cache_dir=tmp_path / "cache").original_sizes()
    mapped = Manifest.open(tmp_path / "ray-parts", cache_dir=tmp_path / "cache").keys.to_pylist()
    by_key = {k: (int(w), int(h)) for k, w, h in zip(mapped, widths, heights)}
    assert by_key["p0"] == (0, 0) and by_key["img0"] == (STORED[0][0] * 2, STORED[0][1] * 2)


# -- JAX ---------------------------------------------------------------------------------------------------------------

#: Run in a child process (JAX starts threads when imported: see tests/test_adapters.py).
JAX_ORIGINAL = """
import json, sys
import numpy as np
from dali_arb.jax import DALIBucketIterator
from dali_arb.plan.buckets import BucketSpec

options = {"batch_size": 4, "buckets": BucketSpec.from_dict(json.loads(sys.argv[2])), "device": "cpu", "workers": 0,
           "dtype": "uint8", "seed": 3, "leftover": "partial"}
seen = {}
with DALIBucketIterator(sys.argv[1], **options) as loader:
    for batch in loader:
        for key, size in zip(batch["ids"], np.asarray(batch["original_size"]).tolist()):
            seen[key] = size
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_the_jax_adapter_serves_the_original_sizes(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    folder = tmp_path / "images"
    keys = photos(folder)
    originals = [(w * 4, h * 4) for w, h in STORED]
    meta = metadata(folder / "meta.parquet", keys, originals)
    build_index([str(meta)], tmp_path / "m.parquet", workers=1, progress=False)
    done = subprocess.run([sys.executable, "-c", JAX_ORIGINAL, str(tmp_path / "m.parquet"), json.dumps(SMALL.to_dict())],
                          capture_output=True, text=True, timeout=300, env={**os.environ})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {k: [h, w] for k, (w, h) in zip(keys, originals)}
