"""The user-facing commands that run the loader: demo, preview, bench, buckets --plot; and the example."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dali_arb.cli import main

from .conftest import gpu_available

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_runs_the_whole_job_on_the_sample_photos(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--out", tmp_path / "demo", "--device", "cpu")
    assert code == 0
    assert "indexed 13 images" in out and "steps per epoch per rank" in out and "images/s" in out
    for name in ("buckets.png", "preview.png"):
        with Image.open(tmp_path / "demo" / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
    assert str(tmp_path / "demo" / "preview.png") in out


def test_preview_draws_one_row_per_batch(dataset, tmp_path, capsys):
    _, manifest = dataset
    out_png = tmp_path / "p.png"
    code, out, _ = run(capsys, "preview", manifest, "-o", out_png, "--batches", "3", "--device", "cpu",
                       "--max-area", "38400", "--min-dim", "64", "--max-dim", "320", "--step", "32", "--base", "160x160")  # fmt: skip
    assert code == 0 and "preview of 3 batches" in out
    with Image.open(out_png) as img:
        assert img.height == 3 * (160 + 3 * 14 + 8) + 8


def test_buckets_plot_is_a_png(size_manifest, tmp_path, capsys):
    png = tmp_path / "b.png"
    code, out, _ = run(capsys, "buckets", size_manifest, "--plot", png, "--json")
    assert code == 0 and json.loads(out)["plot"] == str(png)
    with Image.open(png) as img:
        assert img.format == "PNG"


def test_bench_json_has_the_contract_keys(dataset, capsys):
    _, manifest = dataset
    code, out, _ = run(capsys, "bench", manifest, "--device", "cpu", "--baseline", "--memory", "--json", "--batch-size",
                       "2", "--batches", "2", "--rounds", "1", "--workers", "1", "--decoder", "pillow", "--threads", "1", "--quality", "--step-ms", "5",
                       "--step-work", "torch", "--jpeg-scaling", "fast",
                       "--max-area", "38400", "--min-dim", "64", "--max-dim", "320", "--step", "32", "--base", "160x160")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    for key in ("loader", "loader_process_workers", "baseline", "baseline_draft", "baseline_opencv",
                "baseline_opencv_quality", "memory"):  # fmt: skip
        assert result[key]["images_per_s"] > 0 and result[key]["megapixels_per_s"] > 0
        assert result[key]["batch_ms_p99"] >= result[key]["batch_ms_p50"] > 0
    assert result["decode_ceiling"]["images_per_s"] > 0 and 0 < result["share_of_decode_ceiling"]
    assert result["step_ms"] == 5 and result["loader"]["batch_ms_p50"] >= 5  # every interval holds a 5 ms step
    assert result["step_work"] == "torch" and result["thread_vs_process_workers"] > 0
    assert result["read_ahead_bytes"] > 0 and result["loader"]["wait_ms_p99"] >= 0
    quality = result["quality"]  # every loader against the same full-resolution reference, over every bucket
    assert quality["buckets"] >= 3 and quality["images"] == 2 * quality["buckets"]
    assert quality["baseline"]["worst_db"] > 40  # plain Pillow is the reference's own method
    assert 25 < quality["loader"]["worst_db"] <= quality["loader"]["median_db"]
    # the settings the loader ran with, as given (the memory-fed pipeline's own decoder does not replace them)
    settings = {"decoder": "pillow", "workers": 1, "worker_kind": "thread", "num_threads": 1, "hw_decoder_load": None,
                "jpeg_scaling": "fast"}  # fmt: skip
    assert result["settings"] == settings
    # fast scaling is compared with the peer that decodes at the same scale
    assert result["same_quality_peer"] == "baseline_opencv"
    assert result["speedup_vs_same_quality"] == result["speedup_vs_baseline_opencv"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["preview", "{m}", "-o", "x.jpg"], "-o must name a .png file, got 'x.jpg'"),
        (["preview", "{missing}", "-o", "x.png"], "manifest not found"),
        (["bench", "{m}", "--batch-size", "5000"], "fewer than one global batch"),
        (["preview", "{m}", "-o", "x.png", "--flip", "1.5"], "expected a probability between 0 and 1, got 1.5"),
        (["preview", "{m}", "-o", "x.png", "--jpeg-scaling", "best"], "invalid choice: 'best'"),
        (
            ["preview", "{m}", "-o", "x.png", "--decoder", "dali", "--jpeg-scaling", "fast"],
            "decoder 'dali' always decodes at full resolution",
        ),
    ],
)
def test_loader_commands_fail_in_one_line(dataset, tmp_path, capsys, argv, message):
    _, manifest = dataset
    argv = [a.format(m=manifest, missing=tmp_path / "none.parquet") for a in argv]
    code, _, err = run(capsys, *argv)
    assert code in (1, 2) and message in err and err.strip().count("\n") == 0


@pytest.mark.skipif(gpu_available(), reason="checks the message shown without a GPU")
def test_gpu_asked_for_without_a_gpu(dataset, capsys):
    _, manifest = dataset
    code, _, err = run(capsys, "preview", manifest, "-o", "x.png", "--device", "gpu")
    assert code == 1 and "DALI sees no CUDA GPU; use device 'cpu'" in err


def _example(*args, torchrun: int = 0, cwd: Path = ROOT):
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        if torchrun
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*cmd, str(ROOT / "examples" / "train.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_example_trains_and_resumes_on_cpu(dataset, tmp_path):
    _, manifest = dataset
    ck = tmp_path / "ck.pt"
    first = _example(manifest, "--small", "--device", "cpu", "--epochs", "2", "--max-steps", "2", "--checkpoint", ck)
    assert [(r["epoch"], r["step"]) for r in first] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    resumed = _example(
        manifest, "--small", "--device", "cpu", "--epochs", "2", "--max-steps", "3", "--checkpoint", ck, "--resume"
    )
    assert [(r["epoch"], r["step"]) for r in resumed] == [(1, 2)]
    straight = _example(manifest, "--small", "--device", "cpu", "--epochs", "2", "--max-steps", "3")
    assert resumed[0]["ids"] == straight[-1]["ids"]


def test_example_under_torchrun_with_two_ranks(dataset):
    _, manifest = dataset
    lines = _example(manifest, "--small", "--device", "cpu", "--max-steps", "3", "--leftover", "nearest", torchrun=2)
    by_rank = {r: [x for x in lines if x["rank"] == r] for r in (0, 1)}
    assert [x["step"] for x in by_rank[0]] == [x["step"] for x in by_rank[1]] == [0, 1, 2]
    assert [x["size"] for x in by_rank[0]] == [x["size"] for x in by_rank[1]]  # ranks train one bucket per step
    ids = [i for x in lines for i in x["ids"]]
    assert len(ids) == len(set(ids)) == 2 * 3 * 4


def test_diffusers_sdxl_example_trains_a_tiny_sdxl_on_the_batches(dataset):
    """diffusers' own UNet2DConditionModel (text_time) and AutoencoderKL on our batches: VAE latents, SDXL
    time_ids from original_size / crop_top_left / target_size, noise, loss; one line per step."""
    import math
    import subprocess
    import sys

    _, manifest = dataset
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "diffusers_sdxl.py"), str(manifest), "--tiny", "--max-steps", "3",
         "--device", "cpu", "--batch-size", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [line.split() for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [s[1] for s in steps] == ["0", "1", "2"]
    losses = [float(s[s.index("loss") + 1]) for s in steps]
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses), losses
    assert "3 steps in" in result.stdout


def test_diffusers_time_ids_come_from_the_batch():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("diffusers_sdxl", ROOT / "examples" / "diffusers_sdxl.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    batch = {"ids": ["a", "b"], "original_size": torch.tensor([[600, 400], [300, 900]]),
             "crop_top_left": torch.tensor([[0, 12], [5, 0]]), "target_size": (512, 768)}  # fmt: skip
    assert example.add_time_ids(batch).tolist() == [[600, 400, 0, 12, 512, 768], [300, 900, 5, 0, 512, 768]]


def test_bench_peers_never_fork_after_dali_started_threads(dataset, monkeypatch):
    """The loader under test runs DALI threads before the peers' DataLoaders start their workers; a forked
    worker can deadlock on a lock one of those threads held (CI hung so once). Every peer must spawn."""
    import torch

    from dali_arb.tools.bench import run_bench

    from .conftest import SMALL

    made = []
    real = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        made.append(kwargs.get("multiprocessing_context"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    _, manifest = dataset
    run_bench(manifest, device="cpu", batch_size=2, batches=1, warmup=1, rounds=1, baseline=True, workers=0,
              buckets=SMALL)  # fmt: skip
    assert len(made) >= 4 and set(made) == {"spawn"}


def test_bench_times_a_pixel_budget_and_counts_the_images_each_batch_holds(dataset, capsys):
    """Under a budget batches differ in size: every loader serves the plan's batches and images/s counts them."""
    from dali_arb import Manifest
    from dali_arb.plan.batching import BatchSizing
    from dali_arb.plan.buckets import BucketSpec
    from dali_arb.plan.planner import make_planner
    from dali_arb.plan.world import World
    from dali_arb.tools.bench import run_bench, step_rows

    _, manifest = dataset
    spec = BucketSpec(max_area=38400, min_dim=64, max_dim=320, step=32, base=(160, 160))
    budget = BatchSizing(batch_pixels=108_000, max_batch=4)  # 3 images of about 36k pixels, 2 of 38k
    result = run_bench(manifest, device="cpu", batch_size=budget, batches=3, warmup=1, rounds=1, baseline=True,
                       workers=0, decoder="pillow", num_threads=1, buckets=spec, quality=True)  # fmt: skip
    m = Manifest.read(manifest)
    plan = make_planner([spec.assign(m.heights, m.widths)], [spec], batch_size=budget, world=World(),
                        leftover="nearest").epoch(0)  # fmt: skip
    sizes = plan.batch_sizes
    assert len(set(sizes.tolist())) > 1  # the budget gives buckets different batch sizes
    served = int(sizes[1:4].sum())  # the three timed steps after one warm-up step
    assert result["loader"]["images_per_round"] == result["baseline"]["images_per_round"] == served
    assert result["batching"] == "a budget of 108,000 pixels per batch, at most 4" and result["batch_size"] == 4
    first_steps = {int(b): i for i, b in reversed(list(enumerate(plan.bucket.tolist())))}.values()
    assert result["quality"]["images"] == sum(len(step_rows(plan)[s]) for s in first_steps)
    code, out, _ = run(capsys, "bench", manifest, "--device", "cpu", "--batch-pixels", "108000", "--max-batch", "4",
                       "--batches", "2", "--rounds", "1", "--workers", "0", "--decoder", "pillow",
                       "--max-area", "38400", "--min-dim", "64", "--max-dim", "320", "--step", "32", "--base", "160x160")  # fmt: skip
    assert code == 0 and "a budget of 108,000 pixels per batch, at most 4" in out
