"""Issue 20: the bucket report tells the truth (crop loss as served, rejected images named, trimmed images drawn),
and the batch-sizing flags of `dali-arb buckets` / `dali-arb plan`."""

import csv
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dali_arb.cli import main
from dali_arb.cli.batching import batch_from_args, parse_pixels, read_batch_sizes
from dali_arb.errors import ConfigError
from dali_arb.plan.batching import BatchSizing
from dali_arb.plan.buckets import BucketSpec
from dali_arb.plan.geometry import cover_crop
from dali_arb.plan.planner import Planner, make_planner
from dali_arb.plan.world import World
from dali_arb.tools.plots import MIN_VISIBLE, bucket_bars, plot_buckets
from dali_arb.tools.report import bucket_report, format_report, plan_steps

from .conftest import random_sizes, write_size_manifest


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *fragments: str) -> None:
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def small_photo_set() -> tuple[np.ndarray, np.ndarray]:
    """A small dataset where most images are leftovers: 7 landscapes (3:2), 3 portraits (2:3), 2 squares."""
    heights = np.array([1024] * 7 + [1536] * 3 + [900] * 2)
    widths = np.array([1536] * 7 + [1024] * 3 + [900] * 2)
    return heights, widths


def served_directly(heights, widths, spec, *, batch, world, epoch, leftover, sync=True, seed=0):
    """Every sample the planners of all ranks serve in ``epoch``, and its crop share computed as the loader cuts it
    (cover resize, then a centre crop: plan/geometry.py): ``(rows, bucket served at, crop share)``."""
    assignment = spec.assign(heights, widths)
    rows, at, loss = [], [], []
    for rank in range(world):
        planner = make_planner([assignment], [spec], seed=seed, batch_size=batch, world=World(rank, world),
                               leftover=leftover, sync_ranks=sync)  # fmt: skip
        plan = planner.epoch(epoch)
        for step in range(len(plan)):
            k = plan.bucket_at(step)
            bh, bw = (int(v) for v in plan.sizes[k])
            for row in plan.rows_at(step).tolist():
                rh, rw, _, _ = cover_crop(int(heights[row]), int(widths[row]), bh, bw, 0.0, 0.0, center=True)
                rows.append(row)
                at.append(k)
                loss.append(1.0 - bh * bw / (rh * rw))
    return np.array(rows), np.array(at), np.array(loss)


# -- 1. crop loss as served ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "epoch", "leftover"), [(1, 0, "nearest"), (2, 3, "nearest"), (2, 1, "duplicate"),
                                                          (1, 2, "drop")])  # fmt: skip
def test_served_crop_loss_is_what_the_plan_cuts(world, epoch, leftover):
    heights, widths = small_photo_set()
    spec = BucketSpec()
    report = bucket_report(heights, widths, spec, batch_size=2, world_size=world, leftover=leftover, epoch=epoch)
    rows, at, loss = served_directly(heights, widths, spec, batch=2, world=world, epoch=epoch, leftover=leftover)
    totals = report["totals"]
    assert totals["epoch"] == report["options"]["epoch"] == epoch
    assert totals["samples_served"] == len(rows)
    assert totals["served_crop_loss"] == pytest.approx(loss.mean(), abs=0.003)
    by_bucket = {f"{w}x{h}": b for b, (h, w) in enumerate(spec.sizes.tolist())}
    for entry in report["buckets"]:
        mine = at == by_bucket[entry["resolution"]]
        assert entry["served"] == int(mine.sum())
        assert entry["served_crop_loss"] == pytest.approx(loss[mine].mean() if mine.any() else 0.0, abs=0.003)
    own = spec.assign(heights, widths).bucket[rows]
    assert totals["moved_per_epoch"] == int(np.count_nonzero(own != at))


def test_a_small_dataset_is_cropped_more_as_served_than_at_its_own_buckets():
    """The measured case in small: leftovers pooled across aspects are cut far more than at their own bucket."""
    heights, widths = small_photo_set()
    report = bucket_report(heights, widths, BucketSpec(), batch_size=4, leftover="nearest")
    totals = report["totals"]
    assert totals["mean_crop_loss"] < 0.01  # every image has an exact bucket
    assert totals["served_crop_loss"] > totals["mean_crop_loss"] + 0.03 and totals["moved_per_epoch"] > 0
    text = format_report(report)
    assert "as served in epoch 0" in text and "at each image's own bucket" in text
    served = next(b for b in report["buckets"] if b["served"] and not b["images"])  # a bucket only pooled images use
    assert served["served_crop_loss"] > 0.1


def test_plan_steps_reads_variable_batches_step_by_step():
    """A plan whose batches differ in size (``batch_size_at``) is read with rows_at/bucket_at; same samples."""
    heights, widths = random_sizes(400, seed=3)
    plan = Planner(
        BucketSpec().assign(heights, widths), batch_size=4, world=World(1, 3), seed=2, leftover="nearest"
    ).epoch(1)

    class Stepwise:  # what a planner with per-bucket batch sizes offers
        def __len__(self):
            return len(plan)

        def rows_at(self, step):
            return plan.rows_at(step)[: 1 + step % 4]

        def bucket_at(self, step):
            return plan.bucket_at(step)

        def batch_size_at(self, step):
            return 1 + step % 4

    rows, bounds, bucket = plan_steps(plan)
    assert rows.shape == (len(plan) * 4,) and np.array_equal(bounds, np.arange(len(plan) + 1) * 4)
    assert np.array_equal(rows.reshape(-1, 4), plan.rows) and np.array_equal(bucket, plan.bucket)
    rows, bounds, bucket = plan_steps(Stepwise())
    sizes = 1 + np.arange(len(plan)) % 4
    assert np.array_equal(np.diff(bounds), sizes) and np.array_equal(bucket, plan.bucket)
    assert np.array_equal(rows, np.concatenate([r[:n] for r, n in zip(plan.rows, sizes)]))


# -- per-bucket accounting --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(8, 160),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 5),
    world=st.integers(1, 4),
    leftover=st.sampled_from(["nearest", "drop", "duplicate"]),
    sync=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_per_bucket_counts_add_up_to_the_totals(n, seed, batch, world, leftover, sync, epoch):
    if leftover == "duplicate" and not sync:
        sync = True
    if n < batch * world:
        n = batch * world
    heights, widths = random_sizes(n, seed=seed)
    report = bucket_report(heights, widths, BucketSpec(max_aspect_error=10.0), batch_size=batch, world_size=world,
                           seed=seed, leftover=leftover, sync_ranks=sync, epoch=epoch)  # fmt: skip
    t, rows = report["totals"], report["buckets"]
    assert sum(b["trimmed"] for b in rows) == t["trimmed_per_epoch"]
    assert sum(b["dropped"] for b in rows) == t["dropped_per_epoch"]
    assert sum(b["duplicated"] for b in rows) == t["duplicated_per_epoch"]
    assert sum(b["served"] for b in rows) == t["samples_served"] == t["steps_per_epoch"] * batch * world
    for b in rows:
        assert b["in_full_batches"] + b["leftovers"] + b["trimmed"] == b["images"]
        assert b["images_per_step"] == batch and b["pixels_per_step"] == batch * b["width"] * b["height"]
    assert t["pixels_per_step_max"] == max(b["pixels_per_step"] for b in rows if b["served"])


# -- 2. rejected images are named -----------------------------------------------------------------------------


def rejecting_manifest(tmp_path) -> tuple[str, list[str], list[tuple[int, int]]]:
    """A manifest with three images far from every bucket's aspect (one key holds a comma, quotes and a newline):
    its path, and the keys and ``(width, height)`` of every image BucketSpec() rejects, in row order."""
    heights, widths = random_sizes(60, seed=5)
    heights[[3, 17]], widths[[3, 17]] = 100, 2000  # far wider than any bucket
    heights[40], widths[40] = 3000, 90
    keys = [f"photo {i}.jpg" for i in range(60)]
    keys[17] = 'odd, "quoted"\nkey.jpg'
    rejected = np.flatnonzero(BucketSpec().assign(heights, widths).reject_code).tolist()
    assert {3, 17, 40} <= set(rejected)
    path = write_size_manifest(tmp_path / "m.parquet", heights, widths, keys=keys)
    return path, [keys[r] for r in rejected], [(int(widths[r]), int(heights[r])) for r in rejected]


def test_rejected_images_are_listed_by_key_in_json_and_csv(tmp_path, capsys):
    manifest, expected, sides = rejecting_manifest(tmp_path)
    out_csv = tmp_path / "rejected.csv"
    code, out, _ = run(capsys, "buckets", manifest, "-b", "4", "--json", "--rejected", out_csv)
    assert code == 0
    report = json.loads(out)
    assert [e["key"] for e in report["rejected"]] == expected
    assert [(e["width"], e["height"]) for e in report["rejected"]] == sides
    assert {e["reason"] for e in report["rejected"]} == {"aspect"} and report["rejected_file"] == str(out_csv)
    assert report["totals"]["rejected"] == {"aspect": len(expected)} == {"aspect": report["totals"]["rejected_aspect"]}
    with open(out_csv, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == expected and {r["manifest"] for r in table} == {manifest}
    assert [(int(r["width"]), int(r["height"])) for r in table] == sides
    text = run(capsys, "buckets", manifest, "-b", "4")[1]
    first = expected[0]
    assert f"rejected: {first} (aspect, " in text and "more (--json or --rejected FILE lists them)" in text
    code, out, _ = run(capsys, "buckets", manifest, "-b", "4", "--rejected", out_csv)
    assert code == 0 and f"rejected images written to {out_csv}" in out


def test_rejected_csv_never_holds_a_formula(tmp_path, capsys):
    """A key a spreadsheet would run (``=HYPERLINK(...)``, ``@SUM``, ``+1``, ``-2``) is written with a leading ``'``."""
    heights, widths = random_sizes(40, seed=3)
    heights[:4], widths[:4] = 80, 4000  # four rejected by their aspect
    keys = ['=HYPERLINK("http://x","y")', "@SUM(A1)", "+1", "-2", *[f"k{i}" for i in range(4, 40)]]
    manifest = write_size_manifest(tmp_path / "m.parquet", heights, widths, keys=keys)
    out_csv = tmp_path / "rejected.csv"
    assert run(capsys, "buckets", manifest, "-b", "4", "--rejected", out_csv)[0] == 0
    with open(out_csv, newline="", encoding="utf-8") as f:
        listed = [r["key"] for r in csv.DictReader(f)]
    assert listed[:4] == ["'" + k for k in keys[:4]]
    assert all(not k.startswith(("=", "+", "-", "@")) for k in listed)


def test_every_reject_reason_is_named(tmp_path):
    heights = np.array([1024, 1024, 40, 400, 100] + [1024] * 8)
    widths = np.array([1024, 1536, 40, 8000, 100] + [1536] * 8)
    spec = BucketSpec(no_upscale=True, max_aspect_error=0.5)
    report = bucket_report(heights, widths, spec, batch_size=2, keys=lambda rows: [f"k{r}" for r in rows.tolist()])
    reasons = {e["key"]: e["reason"] for e in report["rejected"]}
    assignment = spec.assign(heights, widths)
    assert set(reasons) == {f"k{r}" for r in np.flatnonzero(assignment.reject_code).tolist()}
    assert "aspect" in reasons.values() and "too_small" in reasons.values()
    assert sum(report["totals"]["rejected"].values()) == assignment.rejected() == len(reasons)
    limited = bucket_report(heights, widths, spec, batch_size=2, rejected_limit=1)
    assert len(limited["rejected"]) == 1 and "key" not in limited["rejected"][0]


def test_rejected_of_several_manifests_name_their_manifest(tmp_path, capsys):
    a, expected, _ = rejecting_manifest(tmp_path)
    heights, widths = random_sizes(30, seed=8)
    heights[0], widths[0] = 80, 4000
    b = write_size_manifest(tmp_path / "b.parquet", heights, widths)
    second = [f"img{r:06d}" for r in np.flatnonzero(BucketSpec().assign(heights, widths).reject_code).tolist()]
    assert "img000000" in second
    out_csv = tmp_path / "r.csv"
    code, out, _ = run(capsys, "buckets", a, b, "-b", "4", "--json", "--rejected", out_csv)
    assert code == 0
    listed = json.loads(out)["rejected"]
    assert [(e["dataset"], e["key"]) for e in listed] == [(0, k) for k in expected] + [(1, k) for k in second]
    with open(out_csv, newline="", encoding="utf-8") as f:
        assert [(r["manifest"], r["key"]) for r in csv.DictReader(f)][-len(second) :] == [(b, k) for k in second]


# -- 3. the histogram shows what is trimmed ---------------------------------------------------------------------


def test_the_histogram_draws_a_one_image_bucket_and_the_trimmed_images(tmp_path):
    heights = np.array([1024] * 2000 + [1536] * 3 + [1024] + [600] * 40)
    widths = np.array([1536] * 2000 + [1024] * 3 + [1024] + [1200] * 40)
    report = bucket_report(heights, widths, BucketSpec(), batch_size=16, world_size=2)
    bars = bucket_bars(report)
    tallest = bars["images"].max()
    one = bars["labels"].index("512x512")
    assert bars["images"][one] == 1 and bars["top"][one] >= MIN_VISIBLE * tallest
    segments = ("full", "leftovers", "dropped", "trimmed")
    assert np.array_equal(sum(bars[s] for s in segments), bars["images"])
    trimmed = np.array([b["trimmed"] for b in report["buckets"]])
    assert np.array_equal(bars["trimmed"], trimmed) and trimmed.sum() == report["totals"]["trimmed_per_epoch"] > 0
    assert np.all((bars["height_trimmed"] >= MIN_VISIBLE * tallest) == (trimmed > 0))
    assert np.array_equal(bars["served"], [b["served"] for b in report["buckets"]])
    png = tmp_path / "h.png"
    drawn = plot_buckets(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(np.array_equal(drawn[k], bars[k]) for k in segments)


# -- 4. batch sizing flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "pixels"), [("4194304", 4194304), ("16*512*512", 4194304), ("2048x2048", 4194304),
                                              ("2048X1024", 2097152), (" 1024 * 1024 ", 1048576)])  # fmt: skip
def test_batch_pixels_accepts_products(text, pixels):
    assert parse_pixels(text) == pixels


@pytest.mark.parametrize("text", ["", "lots", "16*", "0", "2048x0", "1e6", "-5"])
def test_batch_pixels_refuses_other_text_in_one_line(text, capsys):
    with pytest.raises(ConfigError, match="pixel count"):
        parse_pixels(text)
    code, _, err = run(capsys, "buckets", "--batch-pixels", text)
    assert code == 2
    one_line(err, "--batch-pixels", "pixel count")


def test_batch_sizes_file(tmp_path):
    path = tmp_path / "b.txt"
    path.write_text("# SDXL-ish\n1024x1024 = 4\n\n832x1216=3  # portrait\n")
    assert read_batch_sizes(path) == {(1024, 1024): 4, (832, 1216): 3}
    for text, fragment in [("1024x1024=4\nnonsense\n", ":2: expected WIDTHxHEIGHT=IMAGES"),
                           ("1024x1024=0\n", ":1: expected"), ("1x1=1\n1x1=2\n", "given twice"),
                           ("# nothing\n", "names no bucket")]:  # fmt: skip
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            read_batch_sizes(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_batch_sizes(tmp_path / "absent.txt")


def test_batch_from_args_and_its_errors(tmp_path, capsys):
    from argparse import Namespace

    assert batch_from_args(Namespace()) == 16 and batch_from_args(Namespace(batch_size=3)) == 3
    assert batch_from_args(Namespace(batch_pixels=1000, max_batch=8, batch_multiple=2)) == BatchSizing(
        batch_pixels=1000, max_batch=8, batch_multiple=2
    )
    assert batch_from_args(Namespace(batch_sizes={(64, 64): 2})) == BatchSizing(batch_sizes={(64, 64): 2})
    with pytest.raises(ConfigError, match="give --batch-size B, --batch-pixels N or --batch-sizes FILE"):
        batch_from_args(Namespace(), default=None)
    with pytest.raises(ConfigError, match="--max-batch 8 shapes a pixel budget"):
        batch_from_args(Namespace(batch_size=4, max_batch=8))
    with pytest.raises(ConfigError, match="got --batch-size and --batch-pixels"):
        batch_from_args(Namespace(batch_size=4, batch_pixels=99))
    code, _, err = run(capsys, "buckets", "--batch-size", "4", "--batch-pixels", "4096")
    assert code == 2
    one_line(err, "not allowed with")
    code, _, err = run(capsys, "buckets", "--batch-multiple", "2")
    assert code == 1
    one_line(err, "--batch-multiple 2 shapes a pixel budget", "--batch-pixels")
    code, _, err = run(capsys, "plan", tmp_path / "m.parquet")  # (batch 16 by default: the missing file is named)
    assert code == 1
    one_line(err, "m.parquet")
    code, _, err = run(capsys, "buckets", "--batch-sizes", tmp_path / "absent.txt")
    assert code == 2
    one_line(err, "--batch-sizes", "cannot read")


def test_buckets_without_manifest_prints_images_per_step_of_a_budget(capsys):
    code, out, _ = run(capsys, "buckets", "--batch-pixels", "16*512*512", "--max-batch", "20", "--json")
    assert code == 0
    listed = json.loads(out)["buckets"]
    spec = BucketSpec()
    assert len(listed) == len(spec.sizes)
    for b in listed:
        expected = min(20, max(1, 16 * 512 * 512 // (b["width"] * b["height"])))
        assert b["images_per_step"] == expected and b["pixels_per_step"] == expected * b["width"] * b["height"]
    text = run(capsys, "buckets", "--batch-pixels", "2048x2048")[1]
    assert "512x512:16" in text.split() and "256x1024:16" in text.split()
    assert "images_per_step" not in run(capsys, "buckets", "--json")[1]  # the plain list stays as it was


def test_buckets_report_with_one_batch_size_states_images_and_pixels_per_step(capsys, size_manifest):
    report = json.loads(run(capsys, "buckets", size_manifest, "-b", "6", "--world-size", "2", "--json")[1])
    assert report["options"]["batch"] == BatchSizing(batch_size=6).to_dict() and report["options"]["batch_size"] == 6
    for b in report["buckets"]:
        assert b["images_per_step"] == 6 and b["pixels_per_step"] == 6 * b["width"] * b["height"]
    assert report["totals"]["images_per_step_min"] == report["totals"]["images_per_step_max"] == 6
    assert report["totals"]["pixels_per_step_mean"] <= report["totals"]["pixels_per_step_max"]


def test_budget_report_states_each_buckets_batch(capsys, tmp_path):
    heights, widths = random_sizes(600, seed=11)
    manifest = write_size_manifest(tmp_path / "m.parquet", heights, widths)
    code, out, err = run(capsys, "buckets", manifest, "--batch-pixels", "8*512*512", "--world-size", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    per = BatchSizing(batch_pixels=8 * 512 * 512)
    for b in report["buckets"]:
        expected = int(per.per_bucket(np.array([[b["height"], b["width"]]]))[0])
        assert b["images_per_step"] == expected and b["pixels_per_step"] <= 8 * 512 * 512
    t = report["totals"]
    assert t["pixels_per_step_max"] <= 8 * 512 * 512 and t["images_per_step_min"] < t["images_per_step_max"]
    assert sum(b["served"] for b in report["buckets"]) == t["samples_served"]


def test_budget_served_crop_loss_is_what_the_plan_cuts():
    heights, widths = small_photo_set()
    sizing = BatchSizing(batch_pixels=3 * 512 * 768)
    report = bucket_report(heights, widths, BucketSpec(), batch_size=sizing, world_size=2, leftover="nearest")
    _, _, loss = served_directly(heights, widths, BucketSpec(), batch=sizing, world=2, epoch=0, leftover="nearest")
    assert report["totals"]["served_crop_loss"] == pytest.approx(loss.mean(), abs=0.003)


def test_plan_command_serves_budget_batches(capsys, tmp_path):
    heights, widths = random_sizes(300, seed=4)
    manifest = write_size_manifest(tmp_path / "m.parquet", heights, widths)
    code, out, err = run(capsys, "plan", manifest, "--batch-pixels", "4*512*512")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    sizes = {len(line["ids"]) for line in lines}
    assert len(sizes) > 1
    for line in lines:
        assert len(line["ids"]) * line["width"] * line["height"] <= max(4 * 512 * 512, line["width"] * line["height"])


def test_the_report_says_what_auto_became():
    """``leftover="auto"`` resolves from the data: the report names the policy the plan used, in text and JSON."""
    heights, widths = small_photo_set()
    report = bucket_report(heights, widths, BucketSpec(), batch_size=4)
    assert report["options"]["leftover"] == "auto"
    resolved = report["options"]["leftover_resolved"]
    assert resolved == Planner(BucketSpec().assign(heights, widths), batch_size=4).leftover.value
    assert f"leftover policy auto ({resolved})" in format_report(report)
    fixed = bucket_report(heights, widths, BucketSpec(), batch_size=4, leftover="nearest")
    assert "leftover policy nearest:" in format_report(fixed)


def test_the_contact_sheet_names_each_image_its_original_size_and_caption(tmp_path):
    """Preview labels (issue 23): key, original size and caption under every tile; a narrow bucket's column is
    widened so the labels are not cut to nothing."""
    import torch
    from PIL import Image

    from dali_arb.tools.plots import contact_sheet, tile_labels

    batch = {"images": torch.zeros(2, 3, 64, 16, dtype=torch.uint8), "ids": ["a/long_key_name", "b"],
             "captions": ["a dog on grass", ""], "original_size": torch.tensor([[640, 480], [100, 50]]),
             "flipped": torch.tensor([True, False]), "target_size": (64, 16), "step": 3}  # fmt: skip
    assert tile_labels(batch, 0) == ["a/long_key_name (flipped)", "480x640 original", "a dog on grass"]
    assert tile_labels(batch, 1) == ["b", "50x100 original", "(no caption)"]
    assert contact_sheet([batch], tmp_path / "p.png", row_height=64) == 1
    width, height = Image.open(tmp_path / "p.png").size
    assert width >= 150 + 2 * (120 + 8) and height >= 64 + 3 * 14  # two widened columns, three label lines
