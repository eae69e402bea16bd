"""Registries (issue 19): a decoder is found by name in one table, and that table drives choose_decoder, the CLI's
choices and help, and the "unknown decoder" message; the planner is made one way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from dali_arb.errors import ConfigError
from dali_arb.loader.decoders import (
    AUTO,
    DECODERS,
    DaliDecoder,
    OpenCVDecoder,
    PillowDecoder,
    choose_decoder,
    decoder_help,
    register_decoder,
)


@dataclass(frozen=True)
class InvertingDecoder(PillowDecoder):
    """A decoder as a user adds one: Pillow's pixels, inverted (module level: it travels to worker processes)."""

    name: ClassVar[str] = "inverting"
    summary: ClassVar[str] = "the workers decode with Pillow and invert"

    def prepare(self, data, geometry, *, channels=3):
        outputs, failure = super().prepare(data, geometry, channels=channels)
        return (None if outputs is None else {"image": 255 - outputs["image"]}), failure


@pytest.fixture
def inverting():
    register_decoder(InvertingDecoder)
    yield InvertingDecoder
    DECODERS.pop("inverting")


def test_every_decoder_is_found_by_its_name():
    assert list(DECODERS) == ["dali", "pillow", "opencv"]
    for name, cls in DECODERS.items():
        chosen = choose_decoder(name, "cpu")
        assert type(chosen) is cls and chosen.name == name
        assert name in decoder_help() and cls.summary in decoder_help()
    assert set(AUTO.values()) <= set(DECODERS)
    assert type(choose_decoder("auto", "gpu")) is DECODERS[AUTO["gpu"]]
    assert type(choose_decoder("auto", "cpu")) is DECODERS[AUTO["cpu"]]


def test_a_registered_decoder_is_found_by_name(inverting):
    chosen = choose_decoder("inverting", "cpu", jpeg_scaling="fast", pairs=(("depth", "mask"),))
    assert chosen == InvertingDecoder(pairs=(("depth", "mask"),), jpeg_scaling="fast")
    assert "inverting: the workers decode with Pillow and invert" in decoder_help()
    with pytest.raises(ConfigError, match="decoder must be 'auto', 'dali', 'pillow', 'opencv' or 'inverting', got 'x'"):
        choose_decoder("x", "cpu")
    with pytest.raises(
        ConfigError, match="hw_decoder_load applies to decoder='dali' on the GPU, not to decoder='inverting'"
    ):
        choose_decoder("inverting", "gpu", hw_decoder_load=0.5)
    with pytest.raises(
        ConfigError,
        match=r"jpeg_scaling applies where the workers decode \(decoder 'inverting', 'opencv' or 'pillow'\)",
    ):
        choose_decoder("dali", "gpu", jpeg_scaling="fast")


def test_the_cli_offers_a_registered_decoder(inverting):
    from dali_arb.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "preview" in a.choices).choices["preview"]
    option = next(a for a in sub._actions if "--decoder" in a.option_strings)
    assert list(option.choices) == ["auto", "dali", "pillow", "opencv", "inverting"]


def test_a_registered_decoder_serves_the_loader(inverting, dataset):
    from dali_arb.data.manifest import Manifest
    from dali_arb.loader.planning import LoaderConfig, build_planner
    from dali_arb.loader.source import BatchSource

    from .conftest import SMALL

    _, manifest = dataset
    m = Manifest.read(manifest, columns=["caption", "source", "offset", "length"])
    config = LoaderConfig(batch_size=4, spec=SMALL, seed=3, rank=0, world_size=1, leftover="nearest",
                          sync_ranks=True, crop="center", flip=0.0)  # fmt: skip
    planner = build_planner(config, m)
    images = {}
    for name in ("pillow", "inverting"):
        decoder = choose_decoder(name, "cpu")
        outputs = BatchSource(m, config, decoder, planner=planner).batch(0, 0)
        images[name] = np.stack(outputs[[o.name for o in decoder.outputs].index("image")])
    assert np.array_equal(images["inverting"], 255 - images["pillow"])


def test_registering_refuses_what_would_be_ambiguous():
    @dataclass(frozen=True)
    class Clash(PillowDecoder):
        name: ClassVar[str] = "dali"

    @dataclass(frozen=True)
    class Auto(PillowDecoder):
        name: ClassVar[str] = "auto"

    with pytest.raises(ConfigError, match="decoder 'dali' is already DaliDecoder; give Clash another name"):
        register_decoder(Clash)
    with pytest.raises(ConfigError, match="a decoder needs a name of its own \\(not 'auto'\\), got 'auto' for Auto"):
        register_decoder(Auto)
    with pytest.raises(ConfigError, match="a decoder must be a subclass of Decoder, got <class 'int'>"):
        register_decoder(int)
    assert register_decoder(OpenCVDecoder) is OpenCVDecoder  # the same class again: nothing changes
    assert list(DECODERS) == ["dali", "pillow", "opencv"]


def test_settings_go_to_the_decoder_that_takes_them():
    assert choose_decoder("dali", "gpu", preallocate=(8, 6)).preallocate == (8, 6)
    assert choose_decoder("pillow", "gpu", preallocate=(8, 6)) == PillowDecoder()  # a loader hint, dropped
    assert choose_decoder(OpenCVDecoder(), "cpu", preallocate=(8, 6)) == OpenCVDecoder()
    assert choose_decoder("auto", "gpu", jpeg_scaling="fast") == DaliDecoder()  # auto: DALI ignores it
    with pytest.raises(ConfigError, match=r"unknown decoder setting colour='red'; decoders take hw_decoder_load, "):
        choose_decoder("pillow", "cpu", colour="red")
    with pytest.raises(
        ConfigError, match="hw_decoder_load applies to decoder='dali' on the GPU, not to decoder='opencv'"
    ):
        choose_decoder("auto", "cpu", hw_decoder_load=0.5)  # auto does not drop a setting the user aimed at dali


# -- the one planner factory ---------------------------------------------------------------------------


def _manifests(tmp_path):
    from dali_arb.data.manifest import Manifest

    from .conftest import random_sizes, write_size_manifest

    sizes = [random_sizes(400, seed=1), random_sizes(250, seed=2)]
    paths = [write_size_manifest(tmp_path / f"m{d}.parquet", h, w) for d, (h, w) in enumerate(sizes)]
    return [Manifest.read(p) for p in paths], sizes


@pytest.mark.parametrize("repeats", [None, (1.0,), (2.5,), (1.0, 0.5)])
def test_the_loader_the_report_and_the_factory_make_the_same_plan(tmp_path, repeats):
    from dali_arb.loader.planning import LoaderConfig, build_planner
    from dali_arb.plan.buckets import BucketIndex, BucketSpec
    from dali_arb.plan.mixture import MixedIndex
    from dali_arb.plan.planner import make_planner
    from dali_arb.plan.world import World
    from dali_arb.tools.report import bucket_report

    manifests, sizes = _manifests(tmp_path)
    count = 1 if repeats is None else len(repeats)
    specs = [BucketSpec(), BucketSpec(max_area=512 * 512, min_dim=256, max_dim=1024, base=(512, 512))][:count]
    config = LoaderConfig(batch_size=4, spec=tuple(specs), seed=5, rank=1, world_size=2, leftover="nearest",
                          sync_ranks=True, crop="center", flip=0.0, repeats=repeats)  # fmt: skip
    loader = build_planner(config, manifests[:count])
    made = make_planner([s.assign(h, w) for s, (h, w) in zip(specs, sizes)], specs, repeats=repeats, seed=5,
                        batch_size=4, world=World(1, 2), leftover="nearest")  # fmt: skip
    assert isinstance(made.index, MixedIndex if repeats not in (None, (1.0,)) else BucketIndex)
    assert type(loader.index) is type(made.index)
    for epoch in (0, 3):
        assert np.array_equal(loader.epoch(epoch).rows, made.epoch(epoch).rows)
        assert np.array_equal(loader.epoch(epoch).bucket, made.epoch(epoch).bucket)
    heights, widths = [h for h, _ in sizes[:count]], [w for _, w in sizes[:count]]
    report = bucket_report(heights, widths, specs, batch_size=4, world_size=2, seed=5, leftover="nearest",
                           repeats=list(repeats) if repeats else None)  # fmt: skip
    assert report["totals"]["steps_per_epoch"] == len(made.epoch(0))


def test_the_factory_wants_one_index_and_spec_per_dataset():
    from dali_arb.plan.buckets import BucketSpec
    from dali_arb.plan.planner import make_planner

    spec = BucketSpec()
    assignment = spec.assign(np.full(8, 512), np.full(8, 512))
    with pytest.raises(ConfigError, match="one bucket index and one bucket spec per dataset, got 2 and 1"):
        make_planner([assignment, assignment], [spec], batch_size=2)
    with pytest.raises(ConfigError, match=r"repeats must give one number per dataset \(1\), got \[1, 2\]"):
        make_planner([assignment], [spec], repeats=[1, 2], batch_size=2)
    assert len(make_planner([assignment], [spec], batch_size=2).epoch(0)) == 4
