"""The loader serving clips (``frames=``): batch keys and shapes, frames against the reference decode, images as
1-frame clips, bad videos replaced and listed, resume bit-exact mid-epoch, the frame spec in the state.

Until ``dali_arb.plan.frames`` and the clip planner (video-plan's half of issue 21) are in the package, these tests
stand them in with :class:`StandInPlanner` and a ``plan.frames`` stand-in that follow the interface's words
(``/work/briefs/video-interface.md`` sections 3-4): ``chunk`` clips, one spatial bucket, full batches only.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("nvidia.dali")
torch = pytest.importorskip("torch")

import pyarrow as pa  # noqa: E402

from dali_arb.data.manifest import Manifest  # noqa: E402
from dali_arb.tools.clips import make_clip, reference_frames, truncate_clip  # noqa: E402
from dali_arb.tools.photos import psnr  # noqa: E402

SIZE = (160, 96)  # every clip's and image's displayed (W, H)
BUCKET = (64, 96)  # (H, W) the stand-in planner serves
PSNR_BOUND = 38.0  # as tests/test_video_decode.py


# -- stand-ins for video-plan's half (used only while the package lacks it) ----------------------------------------
@dataclass(frozen=True)
class StandInSpec:
    frames: tuple[int, ...]
    fps: float | None = None
    clip: str = "head"
    stride: int = 1
    count: int = 1
    images: bool = True

    def fingerprint(self) -> str:
        return json.dumps([list(self.frames), self.fps, self.clip, self.stride, self.count, self.images])


@dataclass(frozen=True)
class StandInClips:
    row: np.ndarray
    length: np.ndarray
    start: np.ndarray


def stand_in_frame_indices(spec, *, start, length, n_frames, fps, frame_times=None) -> np.ndarray:
    target = spec.fps or fps
    times = (start + np.arange(length)) / target
    if frame_times is not None:
        index = np.searchsorted(np.asarray(frame_times, np.float64), times + 1e-6, side="right") - 1
    else:
        index = np.floor(times * fps + 1e-6).astype(np.int64)
    return np.clip(index, 0, n_frames - 1).astype(np.int64)


def _module(name: str, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class StandInIndex:
    def __init__(self, clip_buckets: np.ndarray, sizes: np.ndarray) -> None:
        order = np.argsort(clip_buckets, kind="stable")
        self.members = order.astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(clip_buckets, minlength=len(sizes)))]).astype(np.int64)
        self.sizes = sizes

    def member_rows(self, positions, epoch):
        return self.members[np.asarray(positions)]


class StandInPlan:
    def __init__(self, steps: list[tuple[int, np.ndarray]], frames: list[int], sizes: np.ndarray) -> None:
        self.steps, self.frames, self.sizes = steps, frames, sizes

    def __len__(self) -> int:
        return len(self.steps)

    def rows_at(self, step: int) -> np.ndarray:
        return self.steps[step][1]

    def bucket_at(self, step: int) -> int:
        return self.steps[step][0]

    def frames_at(self, step: int) -> int:
        return self.frames[self.steps[step][0]]

    def offset_at(self, step: int) -> int:
        return 0


class StandInPlanner:
    """Clips by ``chunk`` of each video (images: 1-frame clips), one bucket per frame count, full batches of
    ``batch`` clips in a keyed order per epoch."""

    def __init__(self, manifest: Manifest, spec: StandInSpec, *, batch: int, seed: int) -> None:
        n = manifest.int_column("frames", -1)
        rates = np.asarray(manifest.table.column("fps").fill_null(1.0).to_numpy(), np.float64)
        rows, lengths, starts = [], [], []
        for r, count in enumerate(n.tolist()):
            if count >= 0 and spec.fps:  # the usable length on the target-rate timeline
                count = int(count * spec.fps / rates[r])
            if count < 0:
                if spec.images:
                    rows.append(r), lengths.append(1), starts.append(0)
                continue
            fit = [f for f in spec.frames if f <= count]
            if not fit:
                continue
            f = max(fit)
            for s in range(0, count - f + 1, f):
                rows.append(r), lengths.append(f), starts.append(s)
        self.clips = StandInClips(np.array(rows, np.int64), np.array(lengths, np.int32), np.array(starts, np.int32))
        self.frame_buckets = sorted(set(lengths))
        clip_buckets = np.array([self.frame_buckets.index(f) for f in lengths], np.int64)
        sizes = np.array([BUCKET] * len(self.frame_buckets), np.int64)
        self.index = StandInIndex(clip_buckets, sizes)
        self.batch = np.full(len(sizes), batch, np.int64)
        self.max_batch = batch
        self._seed, self._clip_buckets, self._sizes = seed, clip_buckets, sizes

    def epoch(self, epoch: int) -> StandInPlan:
        rng = np.random.default_rng([self._seed, epoch])
        steps = []
        for k in range(len(self.frame_buckets)):
            members = rng.permutation(np.flatnonzero(self._clip_buckets == k))
            steps += [(k, members[i : i + self.max_batch]) for i in range(0, len(members) - self.max_batch + 1,
                                                                          self.max_batch)]  # fmt: skip
        order = rng.permutation(len(steps))
        return StandInPlan([steps[i] for i in order], self.frame_buckets, self._sizes)

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.epoch(epoch))


@pytest.fixture
def planning(monkeypatch: pytest.MonkeyPatch):
    """The package's clip planning, or the stand-ins where the package lacks it."""
    try:
        importlib.import_module("dali_arb.plan.frames")
        return "package"
    except ImportError:
        pass
    frames = _module("dali_arb.plan.frames", FrameSpec=StandInSpec, frame_indices=stand_in_frame_indices)
    monkeypatch.setitem(sys.modules, "dali_arb.plan.frames", frames)
    from dali_arb.loader import session, source

    def build(config, manifests):
        manifests = [manifests] if isinstance(manifests, Manifest) else manifests
        return StandInPlanner(manifests[0], config.frames, batch=int(config.batch_size), seed=config.seed)

    monkeypatch.setattr(session, "build_planner", build)
    monkeypatch.setattr(source, "build_planner", build)
    return "stand-in"


# -- a manifest of videos and images -------------------------------------------------------------------------------
def video_manifest(folder: Path, clips: list[dict], images: int = 0) -> Manifest:
    """A manifest of the clips ``make_clip(**clip)`` writes (with the columns the indexer writes: frames, fps,
    duration, codec, vfr, frame_times) and ``images`` JPEGs, all ``SIZE``."""
    from PIL import Image

    from dali_arb.tools.clips import expected_frame

    rows = []
    for i, clip in enumerate(clips):
        ext = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}[clip.get("codec", "h264")]
        path = make_clip(folder / f"v{i}{ext}", size=SIZE, **clip)
        _, times = reference_frames(path)
        fps = float(clip.get("fps", 24.0))
        vfr = bool(clip.get("vfr", False))
        rows.append({"key": f"v{i}", "source": str(path), "width": SIZE[0], "height": SIZE[1], "frames": len(times),
                     "fps": fps, "duration": float(times[-1] + 1 / fps), "codec": clip.get("codec", "h264"),
                     "vfr": vfr, "frame_times": times.astype(np.float32).tolist() if vfr else None})  # fmt: skip
    for j in range(images):
        path = folder / f"i{j}.jpg"
        Image.fromarray(expected_frame(j, size=SIZE)).save(path, quality=95)
        rows.append({"key": f"i{j}", "source": str(path), "width": SIZE[0], "height": SIZE[1], "frames": None,
                     "fps": None, "duration": None, "codec": None, "vfr": None, "frame_times": None})  # fmt: skip
    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("frames", pa.int32()), ("fps", pa.float64()), ("duration", pa.float64()),
                        ("codec", pa.string()), ("vfr", pa.bool_()), ("frame_times", pa.list_(pa.float32()))])  # fmt: skip
    return Manifest(pa.Table.from_pylist(rows, schema=schema))


def loader(manifest: Manifest, **options):
    from dali_arb import DALIBucketIterator

    defaults = {"batch_size": 2, "frames": [1, 9], "device": "cpu", "workers": 0, "seed": 3, "dtype": "uint8",
                "crop": "center"}  # fmt: skip
    return DALIBucketIterator(manifest, **{**defaults, **options})


def reference_clip(path: str, indices: np.ndarray) -> np.ndarray:
    """The reference: every frame decoded, the wanted ones resized to cover the bucket (Pillow) and centre-cropped:
    ``uint8 [F, 3, H, W]``."""
    from PIL import Image

    from dali_arb.plan.geometry import cover_crop

    frames, _ = reference_frames(path)
    bh, bw = BUCKET
    rh, rw, top, left = cover_crop(SIZE[1], SIZE[0], bh, bw, 0.0, 0.0, center=True)
    out = [np.asarray(Image.fromarray(frames[i]).resize((rw, rh), Image.BILINEAR, reducing_gap=None)
                      .crop((left, top, left + bw, top + bh))) for i in indices.tolist()]  # fmt: skip
    return np.stack(out).transpose(0, 3, 1, 2)


# -- the tests -----------------------------------------------------------------------------------------------------
def test_batches_hold_clips_that_match_the_reference(tmp_path: Path, planning: str) -> None:
    m = video_manifest(tmp_path, [{"codec": "h264", "fps": 24.0, "frames": 20},
                                  {"codec": "vp9", "fps": 30.0, "frames": 19},
                                  {"codec": "mjpeg", "fps": 60.0, "frames": 27}], images=2)  # fmt: skip
    with loader(m) as it:
        seen_clips = 0
        for batch in it:
            video, index = batch["video"], batch["frame_index"]
            f = index.shape[1]
            assert video.shape == (2, f, 3, *BUCKET) and video.dtype == torch.uint8
            assert index.dtype == torch.int64 and batch["fps"].dtype == torch.float32
            assert batch["target_size"] == BUCKET
            assert "images" not in batch
            for b, key in enumerate(batch["ids"]):
                source = m.table.column("source")[int(key[1:]) + (3 if key[0] == "i" else 0)].as_py()
                if key.startswith("i"):  # an image: a 1-frame clip, frame 0, no rate
                    assert f == 1 and index[b].tolist() == [0] and float(batch["fps"][b]) == 0.0
                    continue
                seen_clips += 1
                reference = reference_clip(source, index[b].numpy())
                assert min(psnr(video[b, k].numpy(), reference[k]) for k in range(f)) >= PSNR_BOUND
                rate = {"v0": 24.0, "v1": 30.0, "v2": 60.0}[key]
                assert float(batch["fps"][b]) == rate
                if f == 9:  # chunk clips: consecutive source frames
                    assert np.all(np.diff(index[b].numpy()) == 1)
        assert seen_clips >= 4
        assert it.failed == []


def test_layout_bcfhw_and_float_scaling(tmp_path: Path, planning: str) -> None:
    m = video_manifest(tmp_path, [{"frames": 18}, {"frames": 18, "fps": 30.0}])
    first = next(iter(loader(m, layout="BCFHW", dtype="float32", frames=[9])))
    raw = next(iter(loader(m, frames=[9])))
    assert first["video"].shape == (2, 3, 9, *BUCKET)
    expected = raw["video"].permute(0, 2, 1, 3, 4).float() / 127.5 - 1
    torch.testing.assert_close(first["video"], expected, atol=1e-5, rtol=0)


def test_target_fps_resamples_by_time(tmp_path: Path, planning: str) -> None:
    m = video_manifest(tmp_path, [{"frames": 60, "fps": 60.0}, {"frames": 60, "fps": 60.0}])
    batch = next(iter(loader(m, frames=[9], fps=24.0)))
    assert batch["fps"].tolist() == [24.0, 24.0]
    for row in batch["frame_index"].numpy():
        steps = np.diff(row)
        assert set(steps.tolist()) <= {2, 3} and abs(steps.mean() - 2.5) < 0.3  # every 2.5th frame by time


def test_bad_videos_are_replaced_and_listed(tmp_path: Path, planning: str) -> None:
    m = video_manifest(tmp_path, [{"frames": 18} for _ in range(4)])
    truncate_clip(m.table.column("source")[1].as_py(), keep=0.4)  # truncated after indexing
    changed = m.table.column("source")[2].as_py()
    make_clip(changed, frames=18, size=(SIZE[0] + 32, SIZE[1]))  # rewritten at another size
    with loader(m, frames=[9]) as it:
        first = [(b["ids"], b["frame_index"].clone(), b["video"].clone()) for b in it]
        assert sorted(it.failed) == ["v1", "v2"]
        served = {k for ids, _, _ in first for k in ids}
        assert served <= {"v0", "v3"}
    with loader(m, frames=[9]) as again:  # deterministic stand-ins
        second = [(b["ids"], b["frame_index"], b["video"]) for b in again]
    for (ids_a, idx_a, vid_a), (ids_b, idx_b, vid_b) in zip(first, second):
        assert ids_a == ids_b
        assert torch.equal(idx_a, idx_b) and torch.equal(vid_a, vid_b)


def test_resume_mid_epoch_is_bit_exact(tmp_path: Path, planning: str) -> None:
    m = video_manifest(tmp_path, [{"frames": 27, "codec": "vp9"}, {"frames": 18}, {"frames": 27}], images=2)
    options = {"flip": 0.5, "crop": "random", "dtype": "float16"}
    it = loader(m, **options)
    batches = list(it)
    assert len(batches) >= 3
    it = loader(m, **options)
    iterator = iter(it)
    next(iterator)
    state = json.loads(json.dumps(it.state_dict()))
    assert state["frames"] is not None
    resumed = loader(m, **options)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(batches) - 1
    for a, b in zip(batches[1:], rest):
        assert a["ids"] == b["ids"]
        assert torch.equal(a["frame_index"], b["frame_index"]) and torch.equal(a["video"], b["video"])
    other = loader(m, **options, frames=[1, 17])
    from dali_arb.errors import StateError

    with pytest.raises(StateError, match="frames"):
        other.load_state_dict(state)


def test_variable_frame_rate_clips_by_timestamp(tmp_path: Path, planning: str) -> None:
    m = video_manifest(tmp_path, [{"frames": 30, "vfr": True}, {"frames": 30, "vfr": True}])
    batch = next(iter(loader(m, frames=[9], fps=24.0)))
    times = np.asarray(m.table.column("frame_times")[0].as_py())
    for b, key in enumerate(batch["ids"]):
        index = batch["frame_index"][b].numpy()
        source = m.table.column("source")[int(key[1:])].as_py()
        reference = reference_clip(source, index)
        assert min(psnr(batch["video"][b, k].numpy(), reference[k]) for k in range(9)) >= PSNR_BOUND
        # each served frame is the one shown at its target time (start + k) / 24
        shown = np.searchsorted(times, times[index[0]] + np.arange(9) / 24.0 + 1e-6, side="right") - 1
        assert index.tolist() == shown.tolist()


def test_options_are_checked_with_the_bad_value(tmp_path: Path) -> None:
    from dali_arb.errors import ConfigError
    from dali_arb.loader.options import Video

    for bad, match in (({"frames": [0, 9]}, "frames must be"), ({"frames": [9], "layout": "BHWC"}, "layout"),
                       ({"fps": 24.0}, "need frames"), ({"frames": [9], "images": "some"}, "images must"),
                       ({"frames": [1], "clip": "all"}, "clip must"), ({"frames": [1], "decoder": "x"}, "video_decoder")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            Video(**bad)
    assert Video(frames=[17, 1, 9]).frames == (1, 9, 17)
    assert Video(frames=[9], images="exclude").on


def test_image_only_loader_is_unchanged(tmp_path: Path) -> None:
    from dali_arb.loader.options import LoaderOptions

    options = LoaderOptions.from_keywords(batch_size=2)
    assert not options.video.on
    assert options.video.spec() is None
