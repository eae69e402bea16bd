"""The loader's seams (issue 19): option objects and the flat keywords build the same loader, the framework-free
session hands out NumPy and DALI outputs, and the JAX adapter serves what the torch adapter serves."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dali_arb import (
    Augment,
    BucketSpec,
    ConfigError,
    DALIBucketIterator,
    Dataset,
    Decode,
    LoaderOptions,
    Remote,
    StateError,
    Workers,
)
from dali_arb.loader.session import Batch, LoaderSession
from dali_arb.loader.state import compose

from .conftest import SMALL

FLAT = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3, "flip": 0.5,
        "rank": 0, "world_size": 1, "leftover": "nearest"}  # fmt: skip


def grouped(**changes) -> LoaderOptions:
    base = {"batch_size": 4, "seed": 3, "rank": 0, "world_size": 1, "leftover": "nearest", "augment": Augment(flip=0.5),
            "decode": Decode(device="cpu", dtype="uint8"), "workers": Workers(count=0)}  # fmt: skip
    return LoaderOptions(**{**base, **changes})


def epoch_of(loader) -> list[tuple]:
    return [(b["ids"], np.asarray(b["images"]).tobytes(), tuple(b["target_size"])) for b in loader]


def test_options_objects_and_flat_keywords_serve_the_same_batches_and_states(dataset):
    _, manifest = dataset
    flat = DALIBucketIterator(str(manifest), **FLAT)
    objects = DALIBucketIterator([Dataset(str(manifest), buckets=SMALL)], options=grouped())
    assert epoch_of(flat) == epoch_of(objects)
    assert flat.state_dict() == objects.state_dict()
    objects.load_state_dict(flat.state_dict())  # either spelling resumes the other's state


def test_datasets_with_their_own_buckets_and_repeats_match_the_parallel_lists(dataset):
    _, manifest = dataset
    other = BucketSpec(max_area=128 * 128, min_dim=64, max_dim=256, step=32, base=(128, 128))
    flat = DALIBucketIterator([str(manifest), str(manifest)], **{**FLAT, "buckets": [SMALL, other]}, repeats=[1, 0.5])
    objects = DALIBucketIterator(
        [Dataset(str(manifest), buckets=SMALL, repeats=1), Dataset(str(manifest), buckets=other, repeats=0.5)],
        options=grouped(),
    )
    assert len(flat) == len(objects) and epoch_of(flat) == epoch_of(objects)
    assert flat.state_dict() == objects.state_dict()


def test_a_state_saved_with_one_spec_per_dataset_loads_where_one_spec_is_shared(dataset):
    """Both spellings of the same buckets describe the same plan: the state comparison reads them alike."""
    _, manifest = dataset
    listed = DALIBucketIterator([str(manifest)] * 2, **{**FLAT, "buckets": [SMALL, SMALL]})
    shared = DALIBucketIterator([str(manifest)] * 2, **FLAT)
    assert listed.state_dict()["buckets"] == shared.state_dict()["buckets"] == SMALL.to_dict()
    state = {**listed.state_dict(), "buckets": [SMALL.to_dict(), SMALL.to_dict()]}
    shared.load_state_dict(state)
    with pytest.raises(StateError, match="buckets"):
        shared.load_state_dict({**state, "buckets": [SMALL.to_dict(), BucketSpec().to_dict()]})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Augment(crop="middle"), "crop must be 'random' or 'center', got 'middle'"),
        (lambda: Decode(dtype="int8"), "dtype must be one of float16, bfloat16, float32, uint8, got 'int8'"),
        (lambda: Decode(decoder="tiff"), "decoder must be 'auto', 'dali', 'pillow' or 'opencv', got 'tiff'"),
        (lambda: Workers(count=-1), "workers must be a non-negative integer, got -1"),
        (lambda: Workers(kind="fiber"), "worker_kind must be 'thread' or 'process', got 'fiber'"),
        (lambda: Remote(sample_cache_gb=0), "sample_cache_gb must be a positive number, got 0"),
        (lambda: Dataset(3), "a dataset's manifest must be a path or a Manifest, got 3"),
        (lambda: Dataset("m.parquet", repeats=-1), r"repeats must be a non-negative number \(3, 0.5\), got -1"),
        (lambda: LoaderOptions(batch_size=4, decode="gpu"), "decode must be a Decode, got 'gpu'"),
        (lambda: LoaderOptions.from_keywords(seed=1), "batch_size is required"),
    ],
)
def test_each_option_object_validates_once_and_echoes_the_bad_value(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_an_unknown_keyword_is_a_type_error_naming_what_the_loader_takes():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'; it takes .*caption_dropout"):
        LoaderOptions.from_keywords(batch_size=4, colour="red")


def test_options_and_keywords_together_are_refused_and_options_print_as_json(dataset):
    _, manifest = dataset
    with pytest.raises(ConfigError, match=r"options= or as keyword arguments, not both \(got options and seed\)"):
        DALIBucketIterator(str(manifest), options=grouped(), seed=1)
    with pytest.raises(ConfigError, match="buckets and repeats inside each Dataset"):
        DALIBucketIterator([Dataset(str(manifest))], buckets=SMALL, options=grouped())
    as_dict = grouped(remote=Remote(sample_cache="/tmp/x")).to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["decode"]["dtype"] == "uint8" and as_dict["leftover"] == "nearest"
    assert as_dict["workers"] == {"count": 0, "kind": "thread", "prefetch": 2}


def test_the_session_hands_out_numpy_and_dali_outputs_without_a_framework(dataset):
    _, manifest = dataset
    session = LoaderSession([Dataset(str(manifest), buckets=SMALL)], grouped())
    torch_loader = DALIBucketIterator(str(manifest), **FLAT)
    for batch, expected in zip(session, torch_loader):
        assert isinstance(batch, Batch) and batch.ids == expected["ids"]
        assert isinstance(batch.original_size, np.ndarray) and batch.original_size.shape == (4, 2)
        images = np.asarray(batch.parts["images"].as_tensor())
        assert np.array_equal(images, expected["images"].numpy())


def test_state_pieces_that_name_one_field_twice_are_a_bug():
    with pytest.raises(RuntimeError, match=r"state pieces both hold \['step'\]"):
        compose({"epoch": 0, "step": 1}, {"step": 2})


#: Run in a child process: JAX starts threads when imported, and the forks other tests make after that could
#: deadlock (JAX warns of it), so the test process never imports JAX.
JAX_VERSUS_TORCH = """
import sys
import jax, jax.numpy as jnp, numpy as np, torch
from dali_arb import DALIBucketIterator
from dali_arb.jax import DALIBucketIterator as JaxIterator
from dali_arb.plan.buckets import BucketSpec

manifest, dtype = sys.argv[1], sys.argv[2]
options = {"batch_size": 4, "buckets": BucketSpec.from_dict(%r), "device": "cpu", "workers": 0, "dtype": dtype,
           "seed": 3, "flip": 0.5, "rank": 0, "world_size": 1}
with DALIBucketIterator(manifest, **options) as by_torch, JaxIterator(manifest, **options) as by_jax:
    assert len(by_torch) == len(by_jax) > 0
    served = 0
    for t, j in zip(by_torch, by_jax):
        assert isinstance(j["images"], jax.Array) and j["ids"] == t["ids"]
        assert j["target_size"] == t["target_size"] and j["images"].shape == tuple(t["images"].shape)
        assert j["images"].dtype == {"uint8": jnp.uint8, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        got = np.asarray(j["images"].astype(jnp.float32)) if dtype == "bfloat16" else np.asarray(j["images"])
        want = t["images"].float().numpy() if dtype == "bfloat16" else t["images"].numpy()
        assert np.array_equal(got, want)
        for key in ("original_size", "crop_top_left", "flipped", "dataset"):
            assert np.array_equal(np.asarray(j[key]), t[key].numpy()), key
        assert j["captions"] == t["captions"] and (j["epoch"], j["step"]) == (t["epoch"], t["step"])
        served += len(j["ids"])
    assert by_jax.state_dict() == by_torch.state_dict()
print("same", served)
"""


@pytest.mark.parametrize("dtype", ["uint8", "float32", "bfloat16"])
def test_the_jax_adapter_serves_the_torch_adapters_ids_sizes_and_pixels(dataset, dtype):
    _, manifest = dataset
    script = JAX_VERSUS_TORCH % (SMALL.to_dict(),)
    done = subprocess.run([sys.executable, "-c", script, str(manifest), dtype], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "same" and int(done.stdout.split()[1]) >= 32
