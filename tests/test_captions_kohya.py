"""kohya's caption options (issue 23): prefix/suffix, an instance prompt for uncaptioned images, per-tag dropout and
keep_tokens_separator; seeded like every caption draw, and states of earlier versions still match."""

from __future__ import annotations

import numpy as np
import pytest

from dali_arb import CaptionPolicy, ConfigError, DALIBucketIterator

from .conftest import SMALL


def draw(policy: CaptionPolicy, text: str | None, seed: int = 0) -> str:
    return policy.apply(text, np.random.default_rng([seed, 7]))


def test_prefix_and_suffix_frame_every_caption_but_a_dropped_one_and_are_never_shuffled():
    policy = CaptionPolicy(prefix="sks photo", suffix="high quality", shuffle_tags=True, keep_tags=1)
    for seed in range(20):
        caption = draw(policy, "dog, grass, ball, sky", seed)
        assert caption.startswith("sks photo dog, ") and caption.endswith(" high quality"), caption
        middle = caption.removeprefix("sks photo ").removesuffix(" high quality")
        assert sorted(middle.split(", ")) == ["ball", "dog", "grass", "sky"]
    assert draw(CaptionPolicy(prefix="sks", dropout=1.0), "dog") == ""


def test_an_uncaptioned_image_gets_the_instance_prompt():
    policy = CaptionPolicy(instance_prompt="sks dog")
    assert draw(policy, None) == "sks dog" and draw(policy, "  \n") == "sks dog" and draw(policy, "a cat") == "a cat"


def test_tag_dropout_leaves_out_each_free_tag_at_its_rate_and_never_a_kept_one():
    policy = CaptionPolicy(tag_dropout=0.25, keep_tags=2)
    tags = [f"t{i}" for i in range(10)]
    kept = 0
    for seed in range(400):
        out = draw(policy, ", ".join(tags), seed).split(", ")
        assert out[:2] == ["t0", "t1"] and out == [t for t in tags if t in out]  # order kept without shuffle
        kept += len(out) - 2
    assert abs(kept / (400 * 8) - 0.75) < 0.03
    assert draw(policy, ", ".join(tags), 3) == draw(policy, ", ".join(tags), 3)  # seeded: a resume draws the same


def test_keep_tokens_separator_fixes_the_front_and_the_end():
    policy = CaptionPolicy(shuffle_tags=True, keep_separator="|||", keep_tags=5)
    seen = set()
    for seed in range(30):
        out = draw(policy, "sks, dog ||| grass, ball, sky, tree ||| masterpiece", seed).split(", ")
        assert out[:2] == ["sks", "dog"] and out[-1] == "masterpiece" and sorted(out[2:-1]) == [
            "ball", "grass", "sky", "tree"]  # fmt: skip
        seen.add(tuple(out))
    assert len(seen) > 5  # the middle is shuffled
    assert draw(CaptionPolicy(keep_separator="|||"), "a ||| b, c") == "a, b, c"  # the separator never shows


def test_earlier_options_draw_and_save_as_before():
    """Existing states hold four caption fields: the new ones appear only where set, and with them unset the draws
    are the earlier ones."""
    assert CaptionPolicy(dropout=0.1, shuffle_tags=True).to_dict().keys() == {"dropout", "shuffle_tags", "keep_tags",
                                                                              "separator"}  # fmt: skip
    assert CaptionPolicy(tag_dropout=0.5).to_dict()["tag_dropout"] == 0.5
    old = CaptionPolicy(shuffle_tags=True, keep_tags=1)
    rng = np.random.default_rng([1, 7])
    rng.random()  # the earlier apply's draws for a one-line caption: the dropout, then the order of the free tags
    order = rng.permutation(3)
    rest = ["b", "c", "d"]
    assert draw(old, "a, b, c, d", 1) == ", ".join(["a"] + [rest[i] for i in order])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tag_dropout": 1.5}, r"tag_dropout must be a probability in \[0, 1\], got 1.5"),
        ({"caption_prefix": 3}, "caption_prefix must be a string, got 3"),
        ({"keep_tags_separator": None}, "keep_tags_separator must be a string, got None"),
    ],
)
def test_bad_caption_options_are_one_line(dataset, options, message):
    _, manifest = dataset
    with pytest.raises(ConfigError, match=message):
        DALIBucketIterator(str(manifest), batch_size=4, buckets=SMALL, device="cpu", workers=0, **options)


def test_the_loader_takes_the_kohya_caption_keywords(dataset):
    _, manifest = dataset
    loader = DALIBucketIterator(str(manifest), batch_size=4, buckets=SMALL, device="cpu", workers=0, dtype="uint8",
                                leftover="nearest", caption_prefix="sks", caption_suffix="hq")  # fmt: skip
    batch = next(iter(loader))
    assert batch["captions"] == [f"sks caption {int(k[3:])} hq" for k in batch["ids"]]
    assert loader.state_dict()["captions"]["prefix"] == "sks"


# -- kohya_order: kohya's process_caption, exactly -------------------------------------------------------------------


def test_kohya_order_matches_kohyas_process_caption_in_every_deterministic_case():
    from .test_configs_kohya import kohya_caption

    cases = [
        ({"prefix": "sks,", "keep_tags": 1, "shuffle_tags": True}, "dog, grass, ball"),  # prefix counts as a tag
        ({"keep_separator": "|||"}, "a, b ||| c, d"),  # no shuffle, no drop: kohya leaves the separator in
        ({"prefix": "p", "suffix": "s"}, "x, y"),
        ({"tag_dropout": 1.0, "keep_tags": 1}, "keep, gone, gone too"),
        ({"shuffle_tags": True, "separator": ";"}, "one"),
        ({"shuffle_tags": True, "secondary_separator": ";;;"}, "a;;;b, c, d"),  # a;;;b moves whole, then is a,b
        ({"secondary_separator": ";;;"}, "a;;;b, c"),
    ]
    import random

    for options, text in cases:
        policy = CaptionPolicy(kohya_order=True, **options)
        ours = {draw(policy, text, seed) for seed in range(60)}
        kohya_options = {"prefix": options.get("prefix", ""), "suffix": options.get("suffix", ""),
                         "shuffle": options.get("shuffle_tags", False), "keep": options.get("keep_tags", 0),
                         "sep": options.get("separator", ","), "keep_sep": options.get("keep_separator", ""),
                         "tag_dropout": options.get("tag_dropout", 0.0),
                         "secondary": options.get("secondary_separator", "")}  # fmt: skip
        rng = random.Random(1)
        theirs = {kohya_caption(text, rng=rng, **kohya_options) for _ in range(300)}
        assert ours == theirs, (options, text, ours, theirs)


def test_kohya_order_keeps_earlier_states_and_defaults_unchanged():
    assert "kohya_order" not in CaptionPolicy().to_dict()
    assert CaptionPolicy(kohya_order=True).to_dict()["kohya_order"] is True
    with pytest.raises(ConfigError, match="kohya_order"):
        CaptionPolicy(kohya_order="yes")


def test_dropout_every_n_epochs_empties_every_caption_of_kohyas_nth_epochs():
    policy = CaptionPolicy(dropout_every_epochs=3, instance_prompt="sks")
    by_epoch = [policy.batch(["a", None], seed=0, epoch=e, step=0, offset=0) for e in range(7)]
    # kohya counts epochs from 1: its epochs 3 and 6 are our 2 and 5
    assert [e for e, captions in enumerate(by_epoch) if captions == ["", ""]] == [2, 5]
    assert by_epoch[0] == ["a", "sks"]
    with pytest.raises(ConfigError, match="dropout_every_epochs"):
        CaptionPolicy(dropout_every_epochs=-1)
