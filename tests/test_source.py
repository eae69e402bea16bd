"""BatchSource on its own, without DALI: outputs by name, meta columns, failures, replacement, pinning."""

import os
import pickle

import numpy as np
import pytest

from dali_arb import BucketSpec, DataError, Manifest, ManifestError
from dali_arb.errors import ConfigError
from dali_arb.loader.contracts import META, Failure
from dali_arb.loader.decoders import DaliDecoder, OpenCVDecoder, PillowDecoder, choose_decoder
from dali_arb.loader.planning import LoaderConfig, build_planner
from dali_arb.loader.source import BatchSource

from .conftest import SMALL


def config(**kw) -> LoaderConfig:
    options = {"batch_size": 4, "spec": SMALL, "seed": 3, "rank": 0, "world_size": 1, "leftover": "nearest",
               "sync_ranks": True, "crop": "random", "flip": 0.5}  # fmt: skip
    options.update(kw)
    return LoaderConfig(**options)


def source_for(manifest_path, decoder=None, **kw) -> BatchSource:
    m = Manifest.read(manifest_path, columns=["caption", "source", "offset", "length"])
    c = config(**kw)
    return BatchSource(m, c, decoder or DaliDecoder(), planner=build_planner(c, m))


@pytest.mark.parametrize("decoder", [DaliDecoder(), PillowDecoder()])
def test_outputs_follow_the_decoders_names_and_meta_is_packed_by_name(dataset, decoder):
    _, manifest = dataset
    source = source_for(manifest, decoder)
    outputs = source.batch(0, 1)
    assert len(outputs) == len(decoder.outputs)
    named = {o.name: values for o, values in zip(decoder.outputs, outputs)}
    assert all(len(values) == 4 for values in named.values())
    meta = META.unpack(np.stack(named["meta"]))
    plan = source.planner.epoch(0)
    assert meta.row.tolist() == plan.rows[1].tolist() == meta.planned_row.tolist()
    assert (meta.failure == Failure.NONE).all() and (meta.epoch == 0).all() and (meta.step == 1).all()
    bucket_h, bucket_w = plan.size(1)
    assert (meta.crop_top >= 0).all() and (meta.crop_left >= 0).all()
    assert [int(m) for m in named["mirror"]] == meta.flipped.tolist()
    if isinstance(decoder, PillowDecoder):
        assert all(image.shape == (bucket_h, bucket_w, 3) and image.dtype == np.uint8 for image in named["image"])
    else:
        assert all(s.tolist() == [bucket_h, bucket_w] for s in named["size"])
        assert all((end > start).all() for start, end in zip(named["roi_start"], named["roi_end"]))
        assert all(e.dtype == np.uint8 and e[:2].tolist() == [0xFF, 0xD8] for e in named["encoded"])


def test_the_same_step_is_the_same_batch_in_any_process(dataset):
    _, manifest = dataset
    source = source_for(manifest)
    travelled = pickle.loads(pickle.dumps(source.starting_at(0, 2, frozenset())))  # what a worker receives
    for a, b in zip(source.batch(1, 3), travelled(_Info(len(source.planner.epoch(0)) - 2 + 3))):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


class _Info:
    def __init__(self, iteration):
        self.iteration = iteration


def test_a_bad_file_is_replaced_from_its_bucket_and_its_failure_travels_in_the_meta(fresh_dataset):
    work, manifest = fresh_dataset
    source = source_for(manifest)
    plan = source.planner.epoch(0)
    keys = Manifest.read(manifest).keys.to_pylist()
    victims = {int(plan.rows[0][0]): Failure.MISSING, int(plan.rows[0][1]): Failure.CHANGED}
    os.remove(work / f"{keys[int(plan.rows[0][0])]}.jpg")
    with open(work / f"{keys[int(plan.rows[0][1])]}.jpg", "ab") as fh:
        fh.write(b"more bytes than indexed")
    fresh = source_for(manifest)
    meta = META.unpack(np.stack(fresh.batch(0, 0)[-1]))
    assignment = fresh.planner.assignment
    for i, (row, failure) in enumerate(victims.items()):
        assert meta.planned_row[i] == row and meta.row[i] != row and meta.failure[i] == failure
        assert assignment.bucket[meta.row[i]] == assignment.bucket[row]  # a stand-in of the same bucket
    again = META.unpack(np.stack(source_for(manifest).batch(0, 0)[-1]))
    assert again.row.tolist() == meta.row.tolist()  # deterministic
    # rows the loader already blocklisted are replaced without being read (and without a failure code)
    blocked = source_for(manifest).starting_at(0, 0, frozenset(victims))
    known = META.unpack(np.stack(blocked.batch(0, 0)[-1]))
    assert (known.failure == Failure.NONE).all() and known.row.tolist() == meta.row.tolist()
    assert "changed since indexing" in Failure.CHANGED.describe("x.jpg")


def test_a_bucket_with_nothing_readable_left_is_a_data_error(fresh_dataset):
    work, manifest = fresh_dataset
    for f in work.glob("*.jpg"):
        f.write_bytes(b"")
    with pytest.raises(DataError, match=r"no readable image left in bucket \d+x\d+ .*re-index"):
        source_for(manifest).batch(0, 0)


def test_workers_refuse_a_manifest_rewritten_under_them(tmp_path, dataset):
    """A manifest replaced by another of the same row count (index --update during training) is refused,
    never served with another row's key."""
    _, manifest = dataset
    copy = tmp_path / "m.parquet"
    copy.write_bytes(manifest.read_bytes())
    source = source_for(copy)
    travelled = pickle.loads(pickle.dumps(source))
    m = Manifest.read(copy)
    reordered = m.table.take(np.roll(np.arange(len(m)), 1))  # same rows, shifted by one
    Manifest(reordered).write(copy)
    with pytest.raises(ManifestError, match="changed on disk after the loader was built"):
        travelled.batch(0, 0)


def test_decoder_choice_is_validated_once():
    assert isinstance(choose_decoder("auto", "cpu"), OpenCVDecoder)
    assert isinstance(choose_decoder("auto", "gpu"), DaliDecoder)
    assert (
        choose_decoder("dali", "gpu", hw_decoder_load=0.9, preallocate=(800, 600)).options()["hw_decoder_load"] == 0.9
    )
    with pytest.raises(ConfigError, match="decoder must be 'auto', 'dali', 'pillow' or 'opencv', got 'tiff'"):
        choose_decoder("tiff", "cpu")
    with pytest.raises(ConfigError, match=r"hw_decoder_load must be a share in \[0, 1\], got 2"):
        choose_decoder("dali", "gpu", hw_decoder_load=2)
    with pytest.raises(ConfigError, match="hw_decoder_load applies to decoder='dali'"):
        choose_decoder("pillow", "gpu", hw_decoder_load=0.5)


def test_meta_layout_names_every_field():
    packed = META.pack(**{name: i for i, name in enumerate(META.fields)})
    columns = META.unpack(packed[None, :])
    assert [int(getattr(columns, name)[0]) for name in META.fields] == list(range(len(META.fields)))
    with pytest.raises(TypeError, match="missing"):
        META.pack(row=1)
    with pytest.raises(AttributeError, match="meta has no column 'nope'"):
        _ = columns.nope


def test_bucket_spec_round_trips_through_its_dict():
    spec = BucketSpec(max_area=300 * 200, min_dim=64, max_dim=512, step=32, base=(256, 192), no_upscale=True)
    assert BucketSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["base"] == {"width": 192, "height": 256}
    assert BucketSpec.from_dict({**spec.to_dict(), "base": [256, 192]}) == spec
    with pytest.raises(ConfigError, match="unknown bucket option"):
        BucketSpec.from_dict({"max_areas": 5})
