"""Planning clips (issue 21): the planner over the clips of 1M videos (``chunk`` at 24 fps: several clips each)
beside the same planner over the same rows as images; time to build (clip table + clip index + planner), one
epoch's plan and 1,000 random steps, and the memory each holds (tracemalloc peak; bytes per clip)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from . import case


def _videos(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Sizes and ``(frames, fps, duration)`` of ``n`` videos: 2-20 s at 24/30/60 fps, 16:9 and 9:16 mostly."""
    rng = np.random.default_rng(seed)
    fps = rng.choice([24.0, 30.0, 60.0], n)
    duration = rng.uniform(2, 20, n)
    frames = np.floor(duration * fps).astype(np.int64)
    portrait = rng.random(n) < 0.3
    short = rng.choice([720, 1080, 2160], n)
    long = (short * 16) // 9
    heights = np.where(portrait, long, short).astype(np.int32)
    widths = np.where(portrait, short, long).astype(np.int32)
    return heights, widths, frames, fps, frames / fps


def _measure(build) -> tuple[object, float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    planner = build()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return planner, seconds, peak


def _steps(planner) -> tuple[float, float, int]:
    start = time.perf_counter()
    plan = planner.epoch(0)
    epoch_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    picks = rng.integers(0, len(plan), 1000)
    start = time.perf_counter()
    for step in picks.tolist():
        plan.rows_at(step)
        plan.frames_at(step)
    return epoch_s, (time.perf_counter() - start) / 1000 * 1e6, len(plan)


@case("clipplan")
def clipplan(args) -> dict:
    from dali_arb import BucketSpec
    from dali_arb.plan.batching import BatchSizing
    from dali_arb.plan.frames import FrameSpec
    from dali_arb.plan.planner import make_planner
    from dali_arb.plan.world import World

    n = 100_000 if args.quick else 1_000_000
    heights, widths, frames, fps, duration = _videos(n)
    spec = BucketSpec(max_area=512 * 768)
    assignment = spec.assign(heights, widths)
    sizing = BatchSizing(batch_pixels=4 * 33 * 512 * 768)
    world = World(3, 8)
    frame_spec = FrameSpec(frames=(1, 17, 33, 49, 81), fps=24, clip="chunk")

    images, t_images, mem_images = _measure(lambda: make_planner([assignment], [spec], batch_size=sizing, world=world))
    videos = [(frames, fps, duration)]
    clips, t_clips, mem_clips = _measure(
        lambda: make_planner([assignment], [spec], batch_size=sizing, world=world, frames=frame_spec, videos=videos)
    )
    c = len(clips.clips)
    e_images, step_images, steps_images = _steps(images)
    e_clips, step_clips, steps_clips = _steps(clips)
    print(f"{n} videos -> {c} clips ({c / n:.1f} per video; chunk at 24 fps into 1,17,33,49,81 frames)")
    print(f"{'':>8} {'build s':>8} {'peak MiB':>9} {'B/sample':>9} {'epoch s':>8} {'step us':>8} {'steps':>8}")
    print(f"{'images':>8} {t_images:8.2f} {mem_images / 2**20:9.1f} {mem_images / n:9.1f} {e_images:8.3f} "
          f"{step_images:8.1f} {steps_images:8d}")  # fmt: skip
    print(f"{'clips':>8} {t_clips:8.2f} {mem_clips / 2**20:9.1f} {mem_clips / c:9.1f} {e_clips:8.3f} "
          f"{step_clips:8.1f} {steps_clips:8d}")  # fmt: skip
    print(f"clips / images: build {t_clips / t_images:.1f}x, step {step_clips / step_images:.2f}x "
          f"(the clip plan has {c / n:.1f}x the samples)")  # fmt: skip
    return {
        "videos": n,
        "clips": c,
        "build_s": {"images": round(t_images, 3), "clips": round(t_clips, 3)},
        "peak_mib": {"images": round(mem_images / 2**20, 1), "clips": round(mem_clips / 2**20, 1)},
        "bytes_per_clip": round(mem_clips / c, 1),
        "epoch_s": {"images": round(e_images, 4), "clips": round(e_clips, 4)},
        "step_us": {"images": round(step_images, 1), "clips": round(step_clips, 1)},
    }
