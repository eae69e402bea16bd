"""SimpleTuner's multidatabackend.json as it is (issue 23): local image backends become datasets with their repeats
(SimpleTuner's 0 is once), resolution, crop and caption strategy; the rest is named in one line each."""

from __future__ import annotations

import collections
import json
import logging

import pytest

from dali_arb import DALIBucketIterator
from dali_arb.configs import simpletuner
from dali_arb.errors import ConfigError

from .images import save_jpeg

CPU = {"device": "cpu", "workers": 0, "dtype": "uint8", "batch_size": 2}


@pytest.fixture
def backends(tmp_path):
    names, texts = tmp_path / "names", tmp_path / "texts"
    for folder in (names, texts / "deeper"):
        folder.mkdir(parents=True)
    save_jpeg(names / "a_red_car.jpg", 192, 128, seed=1)
    save_jpeg(names / "old_house.jpg", 128, 192, seed=2)
    save_jpeg(texts / "t1.jpg", 192, 192, seed=3)
    (texts / "t1.txt").write_text("first caption\nsecond caption")
    save_jpeg(texts / "deeper" / "t2.jpg", 192, 128, seed=4)
    config = [
        {"id": "by-name", "type": "local", "instance_data_dir": str(names), "caption_strategy": "filename",
         "resolution": 128, "resolution_type": "pixel_area", "crop": True, "crop_style": "center", "repeats": 2,
         "instance_prompt": "sks", "prepend_instance_prompt": True, "cache_dir_vae": "/tmp/vae"},
        {"id": "by-text", "type": "local", "instance_data_dir": str(texts), "caption_strategy": "textfile",
         "resolution": 128, "resolution_type": "pixel_area", "crop": True, "crop_style": "center",
         "crop_aspect": "square"},
        {"id": "off", "type": "local", "instance_data_dir": str(texts), "disabled": True},
        {"id": "embeds", "dataset_type": "text_embeds", "type": "local", "cache_dir": "/tmp/te"},
    ]  # fmt: skip
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(config))
    return path


def test_a_multidatabackend_json_loads_with_simpletuners_repeats_and_captions(backends, caplog):
    with caplog.at_level(logging.WARNING, logger="dali_arb"):
        loader = DALIBucketIterator.from_config(backends, **CPU)
    counts, captions = collections.Counter(), collections.defaultdict(set)
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            for d, key, caption in zip(batch["dataset"].tolist(), batch["ids"], batch["captions"]):
                counts[(d, key)] += 1
                captions[(d, key)].add(caption)
    # repeats 2 in SimpleTuner is three times per epoch; repeats absent (0) once; subfolders are read
    assert counts == {(0, "a_red_car"): 12, (0, "old_house"): 12, (1, "t1"): 4, (1, "deeper/t2"): 4}
    assert captions[(0, "a_red_car")] == {"sks a red car"} and captions[(0, "old_house")] == {"sks old house"}
    assert captions[(1, "t1")] <= {"first caption", "second caption"} and captions[(1, "deeper/t2")] == {""}
    assert "'off' skipped: disabled" in caplog.text and "text_embeds" in caplog.text
    assert "cache_dir_vae ignored" in caplog.text
    assert loader.config.crop == "center"
    # crop_aspect square: one bucket, the resolution's square
    assert loader.state_dict()["buckets"][1]["bucket_sizes"] == ["128x128"]


def test_bad_simpletuner_configs_are_one_line(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        simpletuner.from_json(path)
    path.write_text(json.dumps([{"id": "x", "instance_data_dir": "d", "caption_strategy": "parquet"}]))
    with pytest.raises(ConfigError, match="parquet' is not read yet"):
        simpletuner.from_json(path)
    path.write_text(json.dumps([{"id": "x", "instance_data_dir": "d", "caption_strategy": "instanceprompt"}]))
    with pytest.raises(ConfigError, match="needs an instance_prompt"):
        simpletuner.from_json(path)


def test_instanceprompt_captions_every_image_with_the_prompt(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_jpeg(folder / "x.jpg", 128, 128, seed=1)
    (folder / "x.txt").write_text("not used")
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": "p", "instance_data_dir": str(folder), "caption_strategy": "instanceprompt",
                                 "instance_prompt": "a photo of sks", "resolution": 128, "resolution_type": "pixel_area"}]))  # fmt: skip
    loader = DALIBucketIterator.from_config(path, **{**CPU, "batch_size": 1})
    assert [b["captions"] for b in loader] == [["a photo of sks"]]


@pytest.mark.parametrize(
    ("backend", "buckets"),
    [
        ({"resolution": 1024, "resolution_type": "pixel_area"}, {"resolution": 1024}),
        ({"resolution": 1.05, "resolution_type": "area"}, {"resolution": 1024}),  # sqrt(1.05e6) = 1024.7
        ({"resolution": 0.25, "resolution_type": "area", "minimum_image_size": 0.25}, {"resolution": 512,
                                                                                      "min_area": 250_000}),
        ({"resolution": 768, "resolution_type": "pixel", "minimum_image_size": 512}, {"resolution": 768, "min_size": 512}),
        ({"resolution": 1000, "resolution_type": "pixel_area", "minimum_image_size": 900}, {"resolution": 1024,
                                                                                           "min_area": 810_000}),
        ({"resolution": 512, "resolution_type": "pixel_area", "crop_aspect": "square"}, {"bucket_sizes": ["512x512"]}),
    ],
)  # fmt: skip
def test_resolution_types_become_our_buckets(tmp_path, backend, buckets):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": "b", "instance_data_dir": str(tmp_path), **backend}]))
    (entry,) = simpletuner.from_json(path).datasets
    assert entry.buckets == buckets
    from dali_arb import BucketSpec

    BucketSpec(**entry.buckets)  # a valid spec


def test_options_with_no_loader_meaning_are_named_each_in_one_line(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": "b", "instance_data_dir": str(tmp_path), "probability": 0.5, "crop": False,
                                 "maximum_image_size": 2048, "typo_option": 1, "type": "local"},
                                {"id": "s3", "type": "aws", "instance_data_dir": "x"}]))  # fmt: skip
    notes = simpletuner.from_json(path).notes
    for words in ("probability ignored", "crop false", "maximum_image_size ignored", "typo_option ignored",
                  "type 'aws' is not read yet"):  # fmt: skip
        assert sum(words in note for note in notes) == 1, (words, notes)
