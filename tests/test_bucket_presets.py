"""Issue 20: bucket presets (``resolution``), explicit bucket lists (``from_sizes`` / ``--bucket-sizes``), areas written
``1024*1024``, a minimum image size, and every bad BucketSpec argument a one-line ConfigError."""

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_arb import BucketSpec, ConfigError, Manifest, StateError
from dali_arb.cli import main
from dali_arb.cli.options import read_bucket_sizes
from dali_arb.data.cache import bucket_index
from dali_arb.plan.buckets import (
    REJECT_ASPECT,
    REJECT_MIN_SIZE,
    REJECT_NONE,
    REJECT_REASONS,
    REJECT_TOO_SMALL,
    BucketIndex,
    parse_area,
)
from dali_arb.plan.planner import make_planner
from dali_arb.plan.world import World

from .conftest import SIZES, random_sizes, write_size_manifest
from .resume import check_save_load_state, run_epochs

# SDXL's published multi-aspect training buckets (SDXL report, appendix), width x height: reference input data.
SDXL_LANDSCAPE = [(2048, 512), (1984, 512), (1920, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576),
                  (1600, 640), (1536, 640), (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768),
                  (1216, 832), (1152, 832), (1152, 896), (1088, 896), (1088, 960), (1024, 960)]  # fmt: skip
SDXL = sorted({(1024, 1024), *SDXL_LANDSCAPE, *((h, w) for w, h in SDXL_LANDSCAPE)})


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def wh(spec: BucketSpec) -> set[tuple[int, int]]:
    """The spec's buckets as ``(width, height)``."""
    return {(int(w), int(h)) for h, w in spec.sizes}


# -- the resolution preset -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 48), st.sampled_from([16, 32, 64]))
def test_preset_rule(multiple, step):
    r = multiple * step
    spec = BucketSpec(resolution=r, step=step)
    sizes = spec.sizes
    assert (sizes % step == 0).all()
    assert (sizes[:, 0] * sizes[:, 1] <= r * r).all()
    assert sizes.min() >= max(step, r // 2 // step * step) and sizes.max() <= 2 * r
    assert (r, r) in spec.resolutions() and spec.base == (r, r)
    assert wh(spec) == {(h, w) for w, h in wh(spec)}  # both orientations
    # the preset is NovelAI's rule with the options it states
    same = BucketSpec(max_area=r * r, min_dim=max(step, r // 2 // step * step), max_dim=2 * r, step=step, base=(r, r))
    assert spec == same and spec.to_dict() == same.to_dict()

    # every bucket is the largest for one of its sides: one step more on the other breaks the area or max_dim
    def largest(side: int, other: int) -> bool:
        return (other + step) * side > r * r or other + step > 2 * r

    assert all(largest(w, h) or largest(h, w) for w, h in wh(spec))


@pytest.mark.parametrize("r", [512, 768, 1024])
def test_presets_make_sense_and_1024_is_inside_sdxl_published_list(r):
    spec = BucketSpec(resolution=r)
    aspects = [w / h for w, h in wh(spec)]
    assert max(aspects) == 4.0 and min(aspects) == 0.25  # 2r x r/2, as SDXL's 2048x512
    assert all(w * h > r * r - 2 * r * 64 for w, h in wh(spec))  # under r*r by less than a step of the long side
    if r == 1024:
        assert wh(spec) <= set(SDXL)
        assert len(set(SDXL) - wh(spec)) == len(SDXL) - len(spec.sizes) > 0


def test_preset_through_the_cli(capsys):
    code, out, _ = run(capsys, "buckets", "--json", "--resolution", "1024")
    assert code == 0
    listed = {(b["width"], b["height"]) for b in json.loads(out)["buckets"]}
    assert listed == wh(BucketSpec(resolution=1024))
    code, _, err = run(capsys, "buckets", "--resolution", "1024", "--base", "512x512")
    assert code == 1 and "resolution=1024" in err and "base" in err and len(err.strip().splitlines()) == 1


def test_dataclasses_replace_keeps_the_preset():
    spec = BucketSpec(resolution=1024)
    assert dataclasses.replace(spec, no_upscale=True) == BucketSpec(resolution=1024, no_upscale=True)


# -- explicit bucket lists ------------------------------------------------------------------------------------

sides = st.integers(4, 40).map(lambda v: v * 32)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(sides, sides), min_size=1, max_size=12, unique=True),
    st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=1, max_size=40),
)
def test_from_sizes_assigns_each_image_to_the_nearest_aspect_of_the_list(listed, images):
    spec = BucketSpec.from_sizes(listed, max_aspect_error=math.inf)
    assert wh(spec) == set(listed)
    w = np.array([i[0] for i in images])
    h = np.array([i[1] for i in images])
    a = spec.assign(h, w)
    assert (a.bucket >= 0).all()
    chosen = a.sizes[a.bucket]  # (N, 2) (height, width)
    assert all((int(x), int(y)) in set(listed) for y, x in chosen)
    list_log = np.log(np.array([x for x, _ in listed]) / np.array([y for _, y in listed]))
    nearest = np.abs(np.log(w / h)[:, None] - list_log[None, :]).min(axis=1)
    assert np.allclose(np.abs(np.log(w / h) - np.log(chosen[:, 1] / chosen[:, 0])), nearest)
    # the spec round-trips through JSON (state_dict stores to_dict)
    again = BucketSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.to_dict() == spec.to_dict()
    assert np.array_equal(again.sizes, spec.sizes)


def test_from_sizes_derives_its_geometry_and_keeps_no_upscale_on_its_grid():
    spec = BucketSpec.from_sizes(SDXL, no_upscale=True)
    assert wh(spec) == set(SDXL) and len(spec.sizes) == len(SDXL)
    assert spec.step == 64 and spec.min_dim == 512 and spec.max_dim == 2048 and spec.base == (1024, 1024)
    assert spec.max_area == max(w * h for w, h in SDXL)
    heights, widths = random_sizes(3000, seed=11)
    a = spec.assign(heights, widths)
    kept = a.bucket >= 0
    served = a.sizes[a.bucket[kept]]
    assert (served[:, 0] <= heights[kept]).all() and (served[:, 1] <= widths[kept]).all()
    assert (a.sizes % 64 == 0).all()
    # an explicit list with sides of multiples of 8 rounds its copies to 8
    assert BucketSpec.from_sizes(["1000x1000", "1200x800"]).step == 8
    # strings, dicts and pairs say the same
    assert BucketSpec.from_sizes("1024x1024, 1152x896") == BucketSpec.from_sizes(
        [{"width": 1152, "height": 896}, (1024, 1024)]
    )


def test_explicit_list_plans_every_image_once():
    heights, widths = random_sizes(2000, seed=5)
    spec = BucketSpec.from_sizes(SDXL)
    a = spec.assign(heights, widths)
    plan = make_planner([a], [spec], batch_size=4, world=World(0, 1)).epoch(0)
    steps = [plan.rows_at(i) for i in range(len(plan))]
    served = np.concatenate(steps)
    assert len(np.unique(served)) == len(served) == int((a.bucket >= 0).sum()) - plan.trimmed
    assert {plan.size(i)[::-1] for i in range(len(plan))} <= set(SDXL)


@pytest.mark.parametrize("form", ["txt", "json", "inline"])
def test_bucket_sizes_file_forms(capsys, tmp_path, form):
    if form == "txt":
        path = tmp_path / "sdxl.txt"
        body = "\n".join(f"{w}x{h}" for w, h in SDXL)
        path.write_text(f"# SDXL's published buckets\n{body}\n\n", encoding="utf-8")
        arg = str(path)
    elif form == "json":
        path = tmp_path / "sdxl.json"
        entries = [f"{w}x{h}" if i % 3 == 0 else ([w, h] if i % 3 == 1 else {"width": w, "height": h})
                   for i, (w, h) in enumerate(SDXL)]  # fmt: skip
        path.write_text(json.dumps(entries), encoding="utf-8")
        arg = str(path)
    else:
        arg = ",".join(f"{w}x{h}" for w, h in SDXL)
    assert sorted(read_bucket_sizes(arg)) == SDXL
    code, out, _ = run(capsys, "buckets", "--json", "--bucket-sizes", arg)
    assert code == 0
    assert {(b["width"], b["height"]) for b in json.loads(out)["buckets"]} == set(SDXL)


@pytest.mark.parametrize(
    ("content", "message"),
    [("1024x1024\n1024x512x\n", "'1024x512x'"), ("[1, 2]", "1"), ("# nothing\n", "names no size"),
     ('{"a": 1}', "must be a list"), ("1024x1024\n1024x1024\n", "1024x1024 twice")],
)  # fmt: skip
def test_bad_bucket_sizes_files_are_one_line_usage_errors(capsys, tmp_path, content, message):
    path = tmp_path / ("bad.json" if content.startswith(("[", "{")) else "bad.txt")
    path.write_text(content, encoding="utf-8")
    code, _, err = run(capsys, "buckets", "--bucket-sizes", str(path))
    assert code == 2 and message in err and str(path) in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "buckets", "--bucket-sizes", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt: no such file" in err


# -- areas ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1048576", "1024*1024", "1024x1024", " 1024 * 1024 ", "1024X1024", 1048576])
def test_areas_are_written_three_ways(capsys, text):
    assert parse_area(text) == 1024 * 1024
    assert BucketSpec(max_area=text, min_dim=512, max_dim=2048, base="1024x1024") == BucketSpec(resolution=1024)
    code, out, _ = run(capsys, "buckets", "--json", "--max-area", str(text))
    assert code == 0
    assert {(b["width"], b["height"]) for b in json.loads(out)["buckets"]} == wh(BucketSpec(max_area=1024 * 1024))


def test_the_readme_default_is_accepted(capsys):
    code, out, _ = run(capsys, "buckets", "--json", "--max-area", "512*768")
    assert code == 0 and {(b["width"], b["height"]) for b in json.loads(out)["buckets"]} == wh(BucketSpec())


# -- minimum size -------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=60),
    st.one_of(st.none(), st.integers(1, 1500)),
    st.one_of(st.none(), st.integers(1, 2000 * 2000)),
    st.booleans(),
)
def test_min_size_and_min_area_reject_exactly_the_small_images(images, min_size, min_area, no_upscale):
    h = np.array([i[0] for i in images])
    w = np.array([i[1] for i in images])
    spec = BucketSpec(min_size=min_size, min_area=min_area, no_upscale=no_upscale)
    a = spec.assign(h, w)
    small = np.zeros(len(h), bool)
    if min_size is not None:
        small |= np.minimum(h, w) < min_size
    if min_area is not None:
        small |= h * w < min_area
    assert ((a.reject_code == REJECT_MIN_SIZE) == small).all()
    assert (a.bucket[small] == -1).all()
    # the other images are assigned exactly as without the filter
    plain = BucketSpec(no_upscale=no_upscale).assign(h[~small], w[~small])
    assert np.array_equal(a.reject_code[~small], plain.reject_code)
    kept = a.bucket[~small] >= 0
    assert np.array_equal(a.sizes[a.bucket[~small][kept]], plain.sizes[plain.bucket[kept]])
    index = BucketIndex.of(a)
    assert index.rejected_min_size == int(small.sum())
    assert index.num_usable == int((a.bucket >= 0).sum())


def test_min_size_reason_is_its_own():
    assert len({REJECT_NONE, REJECT_ASPECT, REJECT_TOO_SMALL, REJECT_MIN_SIZE}) == 4
    assert "min_size" in REJECT_REASONS[REJECT_MIN_SIZE] and "aspect" in REJECT_REASONS[REJECT_ASPECT]
    # a 320x427 phone photo and a 64x64 icon: with min_size=400 the icon... and the photo (short side 320) go
    a = BucketSpec(min_size=400, max_aspect_error=0.2).assign(
        np.array([427, 64, 1200, 100]), np.array([320, 64, 900, 2000])
    )
    assert a.reject_code.tolist() == [REJECT_MIN_SIZE, REJECT_MIN_SIZE, REJECT_NONE, REJECT_MIN_SIZE]
    assert a.rejected(REJECT_MIN_SIZE) == 3 and a.rejected(REJECT_ASPECT) == 0


def test_min_size_in_the_report_and_the_node_cache(capsys, tmp_path):
    heights, widths = random_sizes(3000, seed=7)
    path = write_size_manifest(tmp_path / "m.parquet", heights, widths)
    small = int((np.minimum(heights, widths) < 700).sum())
    assert 0 < small < 3000
    _, out, _ = run(capsys, "buckets", str(path), "--json")
    before = json.loads(out)["totals"]["usable"]
    code, out, _ = run(capsys, "buckets", str(path), "--json", "--min-size", "700")
    assert code == 0
    spec = BucketSpec(min_size=700)
    expected = int((spec.assign(heights, widths).bucket >= 0).sum())
    assert json.loads(out)["totals"]["usable"] == expected < before
    cached = bucket_index(Manifest.open(path, cache_dir=tmp_path / "cache"), spec)
    assert cached.rejected_min_size == small
    again = bucket_index(Manifest.open(path, cache_dir=tmp_path / "cache"), spec)  # read back from the cache
    assert again.rejected_min_size == small and np.array_equal(again.members, cached.members)


# -- every bad argument is a one-line ConfigError that echoes the value ----------------------------------------


@pytest.mark.parametrize(
    ("options", "echo"),
    [
        ({"base": 1024}, "1024"),
        ({"base": (512, 512.5)}, "512.5"),
        ({"base": "1024"}, "'1024'"),
        ({"max_area": "big"}, "'big'"),
        ({"max_area": 1.5e6}, "1500000.0"),
        ({"max_area": True}, "True"),
        ({"min_dim": "256"}, "'256'"),
        ({"max_dim": 0}, "got 0"),
        ({"step": -64}, "-64"),
        ({"step": 48}, "min_dim (256) must be a multiple of step (48)"),
        ({"step": 1, "min_dim": 1, "max_dim": 10**9, "max_area": 10**9}, "too small"),
        ({"no_upscale": "yes"}, "'yes'"),
        ({"max_aspect_error": "0.5"}, "'0.5'"),
        ({"max_aspect_error": float("nan")}, "nan"),
        ({"max_aspect_error": -1}, "-1"),
        ({"min_size": 0}, "min_size must be a positive integer, got 0"),
        ({"min_size": 12.5}, "12.5"),
        ({"min_area": "1024y1024"}, "'1024y1024'"),
        ({"resolution": 0}, "resolution must be a positive integer, got 0"),
        ({"resolution": "1024"}, "'1024'"),
        ({"resolution": 1000}, "resolution (1000) must be a multiple of step (64)"),
        ({"resolution": 1024, "max_area": 5}, "max_area=5"),
        ({"resolution": 1024, "min_dim": 256}, "min_dim=256"),
        ({"resolution": 1024, "bucket_sizes": ["1024x1024"]}, "resolution=1024"),
        ({"bucket_sizes": []}, "empty"),
        ({"bucket_sizes": 1024}, "1024"),
        ({"bucket_sizes": [(1024, 0)]}, "(1024, 0)"),
        ({"bucket_sizes": ["1024x"]}, "'1024x'"),
        ({"bucket_sizes": [(1024, 1024), (1024, 1024)]}, "1024x1024 twice"),
        ({"bucket_sizes": ["1024x1024"], "step": 32}, "step=32"),
        ({"bucket_sizes": ["1024x1024"], "max_area": 2048 * 2048}, "max_area=4194304"),
    ],
)
def test_every_bad_argument_is_a_config_error_naming_the_value(options, echo):
    with pytest.raises(ConfigError) as info:
        BucketSpec(**options)
    message = str(info.value)
    assert echo in message and "\n" not in message


@pytest.mark.parametrize(
    ("data", "echo"),
    [({"resolutoin": 1024}, "resolutoin"), ({"base": {"width": 5}}, "None"), ({"bucket_sizes": "1024*1024"}, "'1024*1024'")],
)  # fmt: skip
def test_from_dict_errors_name_the_value(data, echo):
    with pytest.raises(ConfigError) as info:
        BucketSpec.from_dict(data)
    assert echo in str(info.value)


def test_a_list_that_agrees_with_given_geometry_is_accepted():
    spec = BucketSpec.from_sizes(["1024x1024", "1152x896"], step=64, base="1024x1024")
    assert spec == BucketSpec.from_sizes(["1152x896", "1024x1024"])


# -- through the loader: an explicit list and a minimum size, served and resumed (DALI on the CPU) ---------------

SMALL_LIST = ["160x160", "192x128", "128x192", "256x96", "96x256", "224x128", "128x224"]


def _loader(manifest, spec, **kw):
    from dali_arb import DALIBucketIterator

    options = {"batch_size": 4, "buckets": spec, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3}
    return DALIBucketIterator(str(manifest), **{**options, **kw})


@pytest.mark.slow
def test_loader_serves_the_list_skips_small_images_and_resumes(dataset):
    _, manifest = dataset
    spec = BucketSpec.from_sizes(SMALL_LIST, min_size=100)
    too_small = {f"img{i:03d}" for i, (w, h) in enumerate(SIZES * 2) if min(w, h) < 100}
    assert too_small
    batches, states = run_epochs(_loader(manifest, spec), 1)
    served = [key for b in batches for key in b["ids"]]
    assert not too_small & set(served) and len(served) == len(set(served))
    assert {tuple(b["target_size"])[::-1] for b in batches} <= {tuple(map(int, s.split("x"))) for s in SMALL_LIST}
    assert BucketSpec.from_dict(states[-1]["buckets"]) == spec
    check_save_load_state(lambda: _loader(manifest, spec), [0, len(batches) // 2])
    # a state of this list does not load into a loader of another list
    other = BucketSpec.from_sizes(SMALL_LIST[:-1], min_size=100)
    with pytest.raises(StateError):
        _loader(manifest, other).load_state_dict(states[0])
