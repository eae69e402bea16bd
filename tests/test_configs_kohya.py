"""kohya's datasets as they are (issue 23): a dataset TOML with two subsets and a train_data_dir of N_name folders give
the images, repeats per epoch and captions kohya gives, in one call (DALIBucketIterator.from_config) or one command
(dali-arb index --from kohya)."""

from __future__ import annotations

import collections
import json
import logging
import random
import re
import subprocess
import sys

import pytest

from dali_arb import DALIBucketIterator
from dali_arb.configs import kohya, load
from dali_arb.errors import ConfigError, StateError
from dali_arb.loader.options import Dataset

from .images import save_jpeg

CPU = {"device": "cpu", "workers": 0, "dtype": "uint8"}


def kohya_caption(text: str, *, prefix: str = "", suffix: str = "", shuffle: bool = False, keep: int = 0,
                  sep: str = ",", keep_sep: str = "", tag_dropout: float = 0.0, secondary: str = "",
                  rng: random.Random) -> str:  # fmt: skip
    """kohya's ``process_caption`` (library/train_util.py, no dropout, no wildcards, no warm-up), copied as it is."""
    if prefix:
        text = prefix + " " + text
    if suffix:
        text = text + " " + suffix
    text = text.split("\n")[0]
    if shuffle or tag_dropout > 0:
        fixed, flex, fixed_suffix = [], [], []
        if keep_sep and keep_sep in text:
            fixed_part, flex_part = text.split(keep_sep, 1)
            if keep_sep in flex_part:
                flex_part, suffix_part = flex_part.split(keep_sep, 1)
                fixed_suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in text.strip().split(sep)]
            flex = tokens[:]
            if keep > 0:
                fixed, flex = flex[:keep], tokens[keep:]
        if shuffle:
            rng.shuffle(flex)
        flex = [t for t in flex if rng.random() >= tag_dropout]
        text = ", ".join(fixed + flex + fixed_suffix)
    if secondary:
        text = text.replace(secondary, sep)
    return text


def kohya_outcomes(text: str, draws: int = 400, **options) -> set[str]:
    rng = random.Random(0)
    return {kohya_caption(text, rng=rng, **options) for _ in range(draws)}


@pytest.fixture
def kohya_tree(tmp_path):
    """A kohya layout: ``train/10_sks dog`` (captions in .caption files, one image with only a .txt, which kohya does
    not read, one in a subfolder, which kohya does not read) and ``train/3_cat`` (.txt captions, tags), and a
    dataset TOML with one subset per folder."""
    dog, cat = tmp_path / "train" / "10_sks dog", tmp_path / "train" / "3_cat"
    for folder in (dog, cat, dog / "sub"):
        folder.mkdir(parents=True)
    save_jpeg(dog / "d1.jpg", 160, 240, seed=1)
    (dog / "d1.caption").write_text("a dog, on grass\nthe second line kohya never reads")
    save_jpeg(dog / "d2.jpg", 240, 160, seed=2)
    (dog / "d2.txt").write_text("kohya reads .caption here, not this")
    save_jpeg(dog / "d3.JPG", 192, 192, seed=3)
    save_jpeg(dog / "sub" / "deep.jpg", 192, 192, seed=4)
    save_jpeg(cat / "c1.jpg", 240, 160, seed=5)
    (cat / "c1.txt").write_text("cat, sofa, red, window ||| masterpiece")
    save_jpeg(cat / "c2.jpg", 160, 240, seed=6)
    (cat / "c2.txt").write_text("cat, floor, blue")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""
[general]
enable_bucket = true
resolution = 192
min_bucket_reso = 128
max_bucket_reso = 256
bucket_reso_steps = 64
batch_size = 2
color_aug = true

[[datasets]]
  [[datasets.subsets]]
  image_dir = '{dog}'
  num_repeats = 10
  class_tokens = "sks dog"
  caption_prefix = "photo of"

  [[datasets.subsets]]
  image_dir = '{cat}'
  num_repeats = 3
  caption_extension = ".txt"
  shuffle_caption = true
  keep_tokens = 1
  keep_tokens_separator = "|||"
""")
    return tmp_path, toml


def one_epoch(loader) -> tuple[collections.Counter, dict[tuple[int, str], set[str]]]:
    counts: collections.Counter = collections.Counter()
    captions: dict[tuple[int, str], set[str]] = collections.defaultdict(set)
    for batch in loader:
        for d, key, caption in zip(batch["dataset"].tolist(), batch["ids"], batch["captions"]):
            counts[(d, key)] += 1
            captions[(d, key)].add(caption)
    return counts, captions


def test_a_kohya_toml_with_two_subsets_gives_kohyas_images_repeats_and_captions(kohya_tree, caplog):
    _, toml = kohya_tree
    with caplog.at_level(logging.WARNING, logger="dali_arb"):
        loader = DALIBucketIterator.from_config(toml, **CPU)
    counts, captions = one_epoch(loader)
    # kohya: the top level of image_dir only (not sub/deep.jpg), every image num_repeats times per epoch
    assert counts == {(0, "d1"): 10, (0, "d2"): 10, (0, "d3"): 10, (1, "c1"): 3, (1, "c2"): 3}
    # the sidecar's first line (caption_extension .caption: d2's .txt is not read), else the class tokens; prefix
    assert captions[(0, "d1")] == {"photo of a dog, on grass"} == kohya_outcomes("a dog, on grass", prefix="photo of")
    assert captions[(0, "d2")] == captions[(0, "d3")] == {"photo of sks dog"}
    # shuffled after the kept token, and the ||| separator: the tags before it stay first, those after it last
    for key, text in (("c1", "cat, sofa, red, window ||| masterpiece"), ("c2", "cat, floor, blue")):
        possible = kohya_outcomes(text, shuffle=True, keep=1, keep_sep="|||")
        assert captions[(1, key)] <= possible, (captions[(1, key)], possible)
    assert "color_aug ignored" in caplog.text
    assert "sub" in caplog.text or "left out" in caplog.text  # the image in a subfolder is named as left out
    # kohya's buckets, its centre crop (no random_crop), no flip (no flip_aug), partial last batches per bucket
    spec = loader.manifests and loader.state_dict()["buckets"]
    sizes = {tuple(map(int, s.split("x"))) for s in (spec[0] if isinstance(spec, list) else spec)["bucket_sizes"]}
    assert sizes == set(kohya.bucket_resolutions((192, 192), 128, 256, 64))
    assert loader.config.crop == "center" and loader.config.flip == 0.0 and loader.config.leftover == "partial"


def test_from_config_indexes_once_into_the_node_cache_and_reuses_it(kohya_tree, tmp_path, monkeypatch):
    _, toml = kohya_tree
    DALIBucketIterator.from_config(toml, cache_dir=tmp_path / "cache", **CPU)
    import dali_arb.index

    def fail(*a, **k):
        raise AssertionError("indexed again")

    monkeypatch.setattr(dali_arb.index, "build_index", fail)
    loader = DALIBucketIterator.from_config(toml, cache_dir=tmp_path / "cache", **CPU)
    assert len(loader.data) == 5


def test_a_train_data_dir_of_n_name_folders_indexes_with_those_repeats_and_class_tokens(kohya_tree, tmp_path):
    root, _ = kohya_tree
    (root / "train" / "not_repeats").mkdir()  # kohya: "ignore directory without repeats"
    out = tmp_path / "out"
    converted = kohya.from_dreambooth_folder(root / "train", resolution=192, batch_size=2, enable_bucket=True,
                                             min_bucket_reso=128, max_bucket_reso=256)  # fmt: skip
    assert [(e.repeats, e.captions["instance_prompt"]) for e in converted.datasets] == [(10.0, "sks dog"), (3.0, "cat")]
    from dali_arb.configs import materialise

    config = materialise(converted, out)
    datasets, options = config.build(**CPU)
    loader = DALIBucketIterator(datasets, options=options)
    counts, captions = one_epoch(loader)
    assert counts[(0, "d1")] == 10 and counts[(1, "c2")] == 3
    # the default caption_extension is .caption: the cat's .txt files are not read, the class tokens are used
    assert captions[(1, "c1")] == {"cat"} and captions[(0, "d1")] == {"a dog, on grass"}


def test_regularisation_subsets_serve_as_many_images_as_the_training_ones(tmp_path):
    train, reg = tmp_path / "train" / "5_sks", tmp_path / "reg" / "1_dog"
    for folder, n in ((train, 2), (reg, 4)):
        folder.mkdir(parents=True)
        for i in range(n):
            save_jpeg(folder / f"i{i}.jpg", 192, 192, seed=i)
    converted = kohya.from_dreambooth_folder(tmp_path / "train", reg_data_dir=tmp_path / "reg", resolution=192)
    # kohya: 2 x 5 = 10 training images per epoch, so 10 regularisation images (4 images, 2.5 times each)
    assert [e.repeats for e in converted.datasets] == [5.0, 2.5]
    assert any("regularisation" in note for note in converted.notes)


def test_kohya_bucket_resolutions_match_make_bucket_resolutions_for_sdxl():
    sizes = kohya.bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert (1024, 1024) in sizes and (832, 1216) in sizes and (1216, 832) in sizes
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)


def test_bad_kohya_configs_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[general]\nresolution = 512\n")
    with pytest.raises(ConfigError, match=r"no \[\[datasets\]\]"):
        kohya.from_toml(bad)
    bad.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    with pytest.raises(ConfigError, match="has no resolution"):
        kohya.from_toml(bad)
    bad.write_text("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n")
    with pytest.raises(ConfigError, match="fine-tuning subset"):
        kohya.from_toml(bad)
    from dali_arb.configs import index_config

    bad.write_text(f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{tmp_path}'\n")
    with pytest.raises(ConfigError, match="writes a local folder"):
        index_config(bad, "s3://bucket/indexed/")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        index_config(bad, tmp_path / "file")


@pytest.mark.slow  # subprocesses (the CLI, a JAX import)
def test_cli_index_from_kohya_writes_manifests_and_a_config_that_buckets_and_plan_take(kohya_tree, tmp_path):
    _, toml = kohya_tree
    out = tmp_path / "indexed"
    run = subprocess.run([sys.executable, "-m", "dali_arb", "index", "--from", "kohya", str(toml), "-o", str(out), "-q"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "warning: [general]: color_aug ignored" in run.stderr and "Traceback" not in run.stderr
    assert (out / "dali_arb.toml").is_file() and len(list(out.glob("*.parquet"))) == 2
    plan = subprocess.run([sys.executable, "-m", "dali_arb", "plan", str(out / "dali_arb.toml")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    steps = [json.loads(line) for line in plan.stdout.splitlines()]
    served = collections.Counter((d, k) for s in steps for d, k in zip(s["datasets"], s["ids"]))
    assert served[(0, "d1")] == 10 and served[(1, "c1")] == 3 and all(len(s["ids"]) <= 2 for s in steps)
    # the loader reads the written config too, the same images
    loader = DALIBucketIterator.from_config(out / "dali_arb.toml", **CPU)
    assert one_epoch(loader)[0][(0, "d3")] == 10


@pytest.mark.slow  # subprocesses (the CLI, a JAX import)
def test_cli_index_from_a_train_data_dir_takes_kohyas_command_line_options_with_set(kohya_tree, tmp_path):
    root, _ = kohya_tree
    out = tmp_path / "indexed"
    base = [sys.executable, "-m", "dali_arb", "index", "--from", "kohya", str(root / "train"), "-o", str(out), "-q"]
    run = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr and "--set resolution=1024" in run.stderr
    run = subprocess.run([*base, "--set", "resolution=192", "--set", "enable_bucket=true", "--set", "min_bucket_reso=128",
                          "--set", "caption_extension=.txt"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    datasets, _ = load(out / "dali_arb.toml", batch_size=1)
    assert [d.repeats for d in datasets] == [10.0, 3.0]
    assert datasets[1].captions.instance_prompt == "cat" and datasets[0].buckets.sizes.shape[0] > 1
    bad = subprocess.run([*base, "--set", "oops"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr


def test_from_config_on_a_train_data_dir_takes_trainer_options(kohya_tree, tmp_path):
    root, _ = kohya_tree
    with pytest.raises(ConfigError, match="no resolution"):
        DALIBucketIterator.from_config(root / "train", cache_dir=tmp_path / "c", **CPU)
    loader = DALIBucketIterator.from_config(root / "train", trainer_options={"resolution": 192, "batch_size": 3},
                                            cache_dir=tmp_path / "c", **CPU)  # fmt: skip
    counts, captions = one_epoch(loader)
    assert loader.batch_size == 3 and counts[(0, "d2")] == 10 and captions[(0, "d2")] == {"sks dog"}


def test_a_state_with_per_dataset_captions_resumes_and_refuses_other_captions(kohya_tree):
    _, toml = kohya_tree
    loader = DALIBucketIterator.from_config(toml, **CPU)
    batches = iter(loader)
    next(batches)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [b["captions"] for b in batches]
    again = DALIBucketIterator.from_config(toml, **CPU)
    again.load_state_dict(state)
    assert [b["captions"] for b in again] == expected
    # a caption keyword given to from_config changes every dataset's own policy (and so the state)
    other = DALIBucketIterator.from_config(toml, caption_dropout=0.5, **CPU)
    assert [p["dropout"] for p in other.state_dict()["captions"]["datasets"]] == [0.5, 0.5]
    with pytest.raises(StateError, match="captions"):
        other.load_state_dict(state)
    # and a loader over the same manifests without the datasets' own captions is refused the state
    datasets, options = load(toml, **CPU)
    plain = DALIBucketIterator([Dataset(d.manifest, buckets=d.buckets, repeats=d.repeats) for d in datasets],
                               options=options)  # fmt: skip
    with pytest.raises(StateError, match="captions"):
        plain.load_state_dict(state)


@pytest.mark.slow  # subprocesses (the CLI, a JAX import)
def test_cli_preview_takes_the_written_config_where_a_manifest_goes(kohya_tree, tmp_path):
    _, toml = kohya_tree
    out = tmp_path / "indexed"
    from dali_arb.configs import index_config

    index_config(toml, out, progress=False)
    png = tmp_path / "p.png"
    run = subprocess.run([sys.executable, "-m", "dali_arb", "preview", str(out / "dali_arb.toml"), "-o", str(png),
                          "--device", "cpu", "--batches", "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "preview of 2 batches" in run.stdout and png.stat().st_size > 0


#: In a child process: the test process never imports JAX (its threads and later forks could deadlock).
JAX_FROM_CONFIG = """
import sys
from dali_arb import DALIBucketIterator
from dali_arb.jax import DALIBucketIterator as JaxIterator

options = {"device": "cpu", "workers": 0, "dtype": "uint8", "cache_dir": sys.argv[2]}
with DALIBucketIterator.from_config(sys.argv[1], **options) as t, JaxIterator.from_config(sys.argv[1], **options) as j:
    pairs = list(zip(t, j))
    assert pairs and all(a["ids"] == b["ids"] and a["captions"] == b["captions"] for a, b in pairs)
    assert t.state_dict() == j.state_dict()
print("same", sum(len(a["ids"]) for a, _ in pairs))
"""


@pytest.mark.slow  # subprocesses (the CLI, a JAX import)
def test_the_jax_adapter_has_from_config_too(kohya_tree, tmp_path):
    _, toml = kohya_tree
    done = subprocess.run([sys.executable, "-c", JAX_FROM_CONFIG, str(toml), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["same", "36"]


@pytest.mark.parametrize(("line", "named"), [("shuffle_caption = 'yes'", "shuffle_caption = 'yes'"),
                                             ("caption_dropout_rate = 2.0", "caption_dropout_rate = 2.0"),
                                             ("keep_tokens = -1", "keep_tokens = -1")])  # fmt: skip
def test_a_bad_kohya_option_is_named_by_kohyas_name(tmp_path, line, named):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f"[general]\nresolution = 512\n{line}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path}'\n"
    )
    with pytest.raises(ConfigError, match=re.escape(named)):
        kohya.from_toml(bad)


def test_a_controlnet_subset_serves_its_conditioning_images_as_a_pair(tmp_path, caplog):
    images, cond = tmp_path / "img", tmp_path / "cond"
    images.mkdir()
    cond.mkdir()
    for i, (w, h) in enumerate(((192, 128), (128, 192), (192, 192))):
        save_jpeg(images / f"i{i}.jpg", w, h, seed=i)
        (images / f"i{i}.caption").write_text(f"caption {i}")
        if i < 2:  # i2 has no conditioning image: kohya stops; ours rejects it with a reason
            save_jpeg(cond / f"i{i}.png", w, h, seed=10 + i)
    toml = tmp_path / "cn.toml"
    toml.write_text(f"[general]\nresolution = 192\nenable_bucket = true\nmin_bucket_reso = 128\nbatch_size = 1\n"
                    f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{images}'\nconditioning_data_dir = '{cond}'\n")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dali_arb"):
        loader = DALIBucketIterator.from_config(toml, **CPU)
    assert "1 file(s) of" in caplog.text and "rejects.jsonl" in caplog.text
    batches = list(loader)
    assert sorted(b["ids"][0] for b in batches) == ["i0", "i1"]
    for b in batches:
        assert b["conditioning"].shape == b["images"].shape


LOAD_CONFIG = """
import sys, dali_arb.configs as c
calls = []
real = c.materialise
def counted(*a, **k):
    calls.append(1)
    return real(*a, **k)
c.materialise = counted
datasets, options = c.load(sys.argv[1], cache_dir=sys.argv[2], batch_size=1)
print(len(datasets), len(calls))
"""


@pytest.mark.slow  # several processes
def test_ranks_of_a_node_calling_from_config_together_index_once(kohya_tree, tmp_path):
    _, toml = kohya_tree
    cache = tmp_path / "cache"
    runs = [subprocess.Popen([sys.executable, "-c", LOAD_CONFIG, str(toml), str(cache)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    outs = [r.communicate(timeout=300) for r in runs]
    assert all(r.returncode == 0 for r in runs), [err[-2000:] for _, err in outs]
    results = sorted(tuple(map(int, out.split())) for out, _ in outs)
    assert results == [(2, 0), (2, 0), (2, 1)]  # every rank has both datasets; one of them indexed
    (folder,) = (cache / "configs").iterdir()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".partial")]
