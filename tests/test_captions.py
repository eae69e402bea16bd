"""Caption tricks: several lines, dropout, tag shuffling with kept tags; reproducible across world sizes
and resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dali_arb import ConfigError, DALIBucketIterator, Manifest
from dali_arb.plan.captions import CaptionPolicy

from .conftest import SMALL
from .resume import check_save_load_state


def draws(policy: CaptionPolicy, text: str, n: int = 2000) -> list[str]:
    return [policy.apply(text, np.random.default_rng([5, i])) for i in range(n)]


def test_a_caption_of_several_lines_is_several_captions():
    got = draws(CaptionPolicy(), "a photo of a cat\n\n  a cat on a mat  \r\nfeline\n")
    assert set(got) == {"a photo of a cat", "a cat on a mat", "feline"}  # blank lines are no captions
    counts = np.array([got.count(c) for c in sorted(set(got))])
    assert counts.min() > 2000 / 3 * 0.85  # each line about a third of the time
    assert draws(CaptionPolicy(), "one line only", 5) == ["one line only"] * 5
    assert draws(CaptionPolicy(), "", 3) == [""] * 3 and CaptionPolicy().apply(None, np.random.default_rng()) == ""


def test_dropout_empties_captions_at_its_rate():
    got = draws(CaptionPolicy(dropout=0.2), "tag a, tag b")
    assert 0.17 < got.count("") / len(got) < 0.23
    assert set(got) == {"", "tag a, tag b"}
    assert set(draws(CaptionPolicy(dropout=1.0), "x", 50)) == {""}
    assert "" not in draws(CaptionPolicy(dropout=0.0), "x", 50)


def test_tag_shuffling_keeps_the_first_tags_in_front():
    text = "1girl, solo,  red hair ,smile,, outdoors, sky"
    got = draws(CaptionPolicy(shuffle_tags=True, keep_tags=2), text, 500)
    rest = ["red hair", "smile", "outdoors", "sky"]
    for caption in got:
        tags = caption.split(", ")
        assert tags[:2] == ["1girl", "solo"] and sorted(tags[2:]) == sorted(rest)
    assert len(set(got)) == 24  # every order of the four free tags appears
    semicolons = CaptionPolicy(shuffle_tags=True, separator=";").apply("a;b;c", np.random.default_rng(0))
    assert sorted(semicolons.split("; ")) == ["a", "b", "c"]
    assert CaptionPolicy(keep_tags=1).apply("b, a", np.random.default_rng(0)) == "b, a"  # no shuffle: unchanged


def test_turning_one_option_on_does_not_change_what_another_draws():
    lines = "first, x, y\nsecond, x, y\nthird, x, y"
    plain = draws(CaptionPolicy(), lines, 300)
    shuffled = draws(CaptionPolicy(shuffle_tags=True, keep_tags=1), lines, 300)
    assert [p.split(",")[0] for p in plain] == [s.split(",")[0] for s in shuffled]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dropout": 1.5}, r"caption_dropout must be a probability in \[0, 1\], got 1.5"),
        ({"dropout": True}, r"caption_dropout must be a probability in \[0, 1\], got True"),
        ({"keep_tags": -1}, "keep_tags must be a non-negative integer, got -1"),
        ({"separator": " "}, "tag_separator must be a non-empty string, got ' '"),
        ({"shuffle_tags": "yes"}, "shuffle_tags must be True or False, got 'yes'"),
    ],
)
def test_bad_options_name_the_value(options, message):
    with pytest.raises(ConfigError, match=message):
        CaptionPolicy(**options)


def tagged(manifest) -> Manifest:
    """The dataset's manifest in memory, every caption two lines of five tags."""
    m = Manifest.read(manifest)
    keys = m.keys.to_pylist()
    captions = [f"{k}, alpha, beta, gamma, delta\n{k}, one, two, three, four" for k in keys]
    return Manifest(m.table.set_column(m.table.column_names.index("caption"), "caption", pa.array(captions)))


TRICKS = {"caption_dropout": 0.25, "shuffle_tags": True, "keep_tags": 1}


def loader(manifest, **kw):
    options = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3}
    return DALIBucketIterator(manifest, **{**options, **kw})


def test_captions_in_batches_follow_the_policy_and_change_with_the_epoch(dataset):
    m = tagged(dataset[1])
    it = loader(m, **TRICKS)
    seen = {}
    for epoch in range(3):
        it.set_epoch(epoch)
        for batch in it:
            for key, caption in zip(batch["ids"], batch["captions"]):
                seen.setdefault(key, []).append(caption)
                assert caption == "" or caption.startswith(f"{key}, ")  # the key tag stays in front
    every = [c for cs in seen.values() for c in cs]
    assert 0.1 < every.count("") / len(every) < 0.4
    assert any(len(set(cs)) > 1 for cs in seen.values())  # drawn again each epoch
    assert loader(m).state_dict()["captions"] != it.state_dict()["captions"]


def test_captions_do_not_depend_on_the_world_size(dataset):
    m = tagged(dataset[1])
    one = [(k, c) for b in loader(m, **TRICKS) for k, c in zip(b["ids"], b["captions"])]
    ranks = [loader(m, rank=r, world_size=2, batch_size=2, **TRICKS) for r in range(2)]
    two = [(k, c) for pair in zip(*ranks) for b in pair for k, c in zip(b["ids"], b["captions"])]
    assert two == one


def test_resume_reproduces_captions_exactly(dataset):
    m = tagged(dataset[1])
    steps = len(loader(m))
    check_save_load_state(lambda: loader(m, **TRICKS), [1, steps - 1])  # compares "captions" batch by batch
    with pytest.raises(Exception, match="captions"):
        loader(m).load_state_dict(loader(m, **TRICKS).state_dict())
