"""The loader serving clips (``frames=``): batch keys and shapes, frames against the reference decode, images as
1-frame clips, bad videos replaced and listed, resume bit-exact mid-epoch, the frame spec in the state.

The manifests are written by ``support/videomanifest.py`` (the video indexer's columns, without indexing); the plan
is the package's (``plan/frames.py``, the clip planner), over one explicit bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("nvidia.dali")
torch = pytest.importorskip("torch")

from dali_arb.data.manifest import Manifest  # noqa: E402
from dali_arb.tools.clips import (  # noqa: E402
    make_clip,
    reference_frames,
    truncate_clip,
)
from dali_arb.tools.photos import psnr  # noqa: E402
from support.videomanifest import video_manifest as make_manifest  # noqa: E402

SIZE = (160, 96)  # every clip's and image's displayed (W, H)
BUCKET = (64, 96)  # (H, W): the one bucket the loaders below plan
PSNR_BOUND = 38.0  # as tests/test_video_decode.py


def video_manifest(folder: Path, clips: list[dict], images: int = 0) -> Manifest:
    return make_manifest(folder, clips, images, size=SIZE)


# -- the tests -----------------------------------------------------------------------------------------------------
def loader(manifest: Manifest, **options):
    from dali_arb import BucketSpec, DALIBucketIterator

    defaults = {"batch_size": 2, "frames": [1, 9], "device": "cpu", "workers": 0, "seed": 3, "dtype": "uint8",
                "crop": "center", "buckets": BucketSpec(bucket_sizes=[(BUCKET[1], BUCKET[0])]), "clip": "chunk"}  # fmt: skip
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


def test_batches_hold_clips_that_match_the_reference(tmp_path: Path) -> None:
    m = video_manifest(tmp_path, [{"codec": "h264", "fps": 24.0, "frames": 20},
                                  {"codec": "vp9", "fps": 30.0, "frames": 19},
                                  {"codec": "mjpeg", "fps": 60.0, "frames": 27}], images=2)  # fmt: skip
    with loader(m) as it:
        seen_clips = 0
        for batch in it:
            video, index = batch["video"], batch["frame_index"]
            f = index.shape[1]
            assert video.shape == (len(batch["ids"]), f, 3, *BUCKET) and video.dtype == torch.uint8
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


def test_layout_bcfhw_and_float_scaling(tmp_path: Path) -> None:
    m = video_manifest(tmp_path, [{"frames": 18}, {"frames": 18, "fps": 30.0}])
    first = next(iter(loader(m, layout="BCFHW", dtype="float32", frames=[9])))
    raw = next(iter(loader(m, frames=[9])))
    assert first["video"].shape == (2, 3, 9, *BUCKET)
    expected = raw["video"].permute(0, 2, 1, 3, 4).float() / 127.5 - 1
    torch.testing.assert_close(first["video"], expected, atol=1e-5, rtol=0)


def test_target_fps_resamples_by_time(tmp_path: Path) -> None:
    m = video_manifest(tmp_path, [{"frames": 60, "fps": 60.0}, {"frames": 60, "fps": 60.0}])
    batch = next(iter(loader(m, frames=[9], fps=24.0)))
    assert batch["fps"].tolist() == [24.0, 24.0]
    for row in batch["frame_index"].numpy():
        steps = np.diff(row)
        assert set(steps.tolist()) <= {2, 3} and abs(steps.mean() - 2.5) < 0.3  # every 2.5th frame by time


def test_bad_videos_are_replaced_and_listed(tmp_path: Path) -> None:
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


def test_resume_mid_epoch_is_bit_exact(tmp_path: Path) -> None:
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


def test_variable_frame_rate_clips_by_timestamp(tmp_path: Path) -> None:
    m = video_manifest(tmp_path, [{"frames": 30, "vfr": True}, {"frames": 30, "vfr": True}])
    batch = next(iter(loader(m, frames=[9], fps=24.0)))
    times = np.asarray(m.table.column("frame_times")[0].as_py())
    for b, key in enumerate(batch["ids"]):
        index = batch["frame_index"][b].numpy()
        source = m.table.column("source")[int(key[1:])].as_py()
        reference = reference_clip(source, index)
        assert min(psnr(batch["video"][b, k].numpy(), reference[k]) for k in range(9)) >= PSNR_BOUND
        # each served frame is the one on screen at its target time (start + k) / 24, for the clip's start
        shown = [
            (np.searchsorted(times, (s + np.arange(9)) / 24.0 + 1e-6, side="right") - 1).tolist() for s in range(64)
        ]
        assert index.tolist() in shown


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
    from dali_arb import DALIBucketIterator

    m = video_manifest(tmp_path, [], images=4)
    with DALIBucketIterator(m, batch_size=2, device="cpu", workers=0, dtype="uint8") as it:
        batch = next(iter(it))
        assert batch["images"].shape[1] == 3 and "video" not in batch and "frame_index" not in batch
        assert "frames" not in it.state_dict()


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_nvdec_serves_the_frames_the_cpu_workers_serve(tmp_path: Path, codec: str) -> None:
    """On a GPU: ``video_decoder="dali_video"`` (NVDEC, fed bytes and frame indices) against the CPU ``pyav``
    workers on the same plan: the same ids and frame indices, every frame within the bound, on ``cuda``."""
    m = video_manifest(tmp_path, [{"codec": codec, "frames": 27, "fps": f} for f in (24.0, 30.0, 60.0, 24.0)])
    options = {"frames": [9], "images": "exclude", "crop": "random", "flip": 0.5}
    cpu = list(loader(m, **options))
    gpu = list(loader(m, **options, device="gpu", video_decoder="dali_video"))
    assert len(cpu) == len(gpu) > 0
    for a, b in zip(cpu, gpu):
        assert a["ids"] == b["ids"] and torch.equal(a["frame_index"], b["frame_index"])
        assert b["video"].is_cuda and b["video"].shape == a["video"].shape
        for i in range(a["video"].shape[0]):
            for k in range(a["video"].shape[1]):
                frame_a = a["video"][i, k].numpy().transpose(1, 2, 0)
                frame_b = b["video"][i, k].cpu().numpy().transpose(1, 2, 0)
                assert psnr(frame_a, frame_b) >= 30.0  # NVDEC's colour conversion and DALI's resize differ a little


@pytest.mark.slow
def test_clips_from_object_storage_with_read_ahead(tmp_path: Path) -> None:
    """Clips in S3 (moto) serve the same batches as the same files on disk, with read-ahead on: a video is read by
    ranged GETs while its clip is decoded, never fetched ahead whole (no read-ahead hit; tests/test_video_ranged.py)."""
    pytest.importorskip("moto")
    import pyarrow as pa

    from support.loopback import moto_bucket, put_object

    m = video_manifest(tmp_path, [{"frames": 18, "codec": c} for c in ("h264", "vp9", "mjpeg", "h264")])
    local = list(loader(m, frames=[9], workers=2))
    with moto_bucket("clips"):
        urls = []
        for path in m.table.column("source").to_pylist():
            put_object("clips", Path(path).name, Path(path).read_bytes())
            urls.append(f"s3://clips/{Path(path).name}")
        remote_manifest = Manifest(m.table.set_column(m.table.column_names.index("source"), "source", pa.array(urls)))
        with loader(remote_manifest, frames=[9], workers=2, read_ahead=2) as it:
            remote = list(it)
            stats = it.stats
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert a["ids"] == b["ids"]
        assert torch.equal(a["frame_index"], b["frame_index"]) and torch.equal(a["video"], b["video"])
    assert stats["requests"] >= 4 and stats["hits"] == 0


def test_jax_adapter_serves_the_same_clips(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    from dali_arb.jax import DALIBucketIterator as JaxIterator

    m = video_manifest(tmp_path, [{"frames": 18}, {"frames": 18, "codec": "vp9"}])
    from dali_arb import BucketSpec

    options = {"batch_size": 2, "frames": [9], "device": "cpu", "workers": 0, "seed": 3, "dtype": "uint8",
               "layout": "BCFHW", "crop": "center", "clip": "chunk",
               "buckets": BucketSpec(bucket_sizes=[(BUCKET[1], BUCKET[0])])}  # fmt: skip
    ours = next(iter(loader(m, **options)))
    theirs = next(iter(JaxIterator(m, **options)))
    assert theirs["ids"] == ours["ids"]
    assert isinstance(theirs["video"], jax.Array) and theirs["video"].shape == (2, 3, 9, *BUCKET)
    np.testing.assert_array_equal(np.asarray(theirs["video"]), ours["video"].numpy())
    np.testing.assert_array_equal(np.asarray(theirs["frame_index"]), ours["frame_index"].numpy())
    assert theirs["target_size"] == BUCKET


def test_every_clip_once_per_epoch_and_several_datasets(tmp_path: Path) -> None:
    """Two datasets of videos, ``chunk`` clips, ``leftover="partial"``: each epoch serves every clip of every video
    exactly once (counted by (video, first frame)), and each clip's frames are its video's."""
    first = video_manifest(tmp_path / "a", [{"frames": 27}, {"frames": 18, "codec": "vp9"}])
    second = video_manifest(tmp_path / "b", [{"frames": 27, "codec": "mjpeg", "fps": 30.0}])
    from dali_arb import BucketSpec

    spec = BucketSpec(bucket_sizes=[(BUCKET[1], BUCKET[0])])
    for epoch in (0, 1):
        it = loader([first, second], frames=[9], leftover="partial", buckets=spec)
        it.set_epoch(epoch)
        served = []
        for batch in it:
            for b, key in enumerate(batch["ids"]):
                dataset = int(batch["dataset"][b])
                served.append((dataset, key, int(batch["frame_index"][b, 0])))
                manifest = (first, second)[dataset]
                source = manifest.table.column("source")[int(key[1:])].as_py()
                reference = reference_clip(source, batch["frame_index"][b].numpy())
                assert psnr(batch["video"][b, 4].numpy(), reference[4]) >= PSNR_BOUND
        expected = (
            [(0, "v0", s) for s in (0, 9, 18)] + [(0, "v1", s) for s in (0, 9)] + [(1, "v0", s) for s in (0, 9, 18)]
        )
        assert sorted(served) == sorted(expected)


def test_pooled_leftover_clips_are_served_at_the_steps_frame_count(tmp_path: Path) -> None:
    """A leftover clip pooled into a step of fewer frames is served at that step's frame count (its first frames),
    so every batch is one [B, F, ...] array (a ragged batch failed in the pipeline before)."""
    from dali_arb import BucketSpec

    m = video_manifest(tmp_path, [{"frames": 20}, {"frames": 20, "codec": "vp9"}, {"frames": 20}, {"frames": 12}])
    spec = BucketSpec(bucket_sizes=[(BUCKET[1], BUCKET[0])])
    shorter = 0
    for leftover in ("auto", "nearest", "partial"):
        with loader(m, frames=[9, 17], clip="head", buckets=spec, leftover=leftover) as it:
            for batch in it:
                f = batch["frame_index"].shape[1]
                assert batch["video"].shape[:2] == (len(batch["ids"]), f)
                for b, key in enumerate(batch["ids"]):
                    index = batch["frame_index"][b].numpy()
                    assert index.tolist() == list(range(f))  # head clips at the video's own rate
                    shorter += int(key != "v3" and f == 9)
    assert shorter > 0  # some 17-frame clip was served at 9 frames


@pytest.mark.parametrize("decoder", ["pyav", "dali_video"])
def test_a_video_truncated_after_indexing_is_replaced_by_either_decoder(tmp_path: Path, decoder: str) -> None:
    """A VP9 file truncated after indexing is caught by its identity (size, modification time), before any decoder
    sees it, with ``pyav`` and with ``dali_video`` (DALI's CPU decoder serves a truncated VP9 without an error:
    checked, so the identity is what protects it)."""
    m = make_manifest(tmp_path, [{"frames": 18, "codec": "vp9"} for _ in range(4)], size=SIZE, identity=True)
    truncate_clip(m.table.column("source")[2].as_py(), keep=0.3)
    options = {"frames": [9], "images": "exclude", "video_decoder": decoder}
    with loader(m, **options) as it:
        batches = list(it)
        assert it.failed == ["v2"]
        assert "changed since indexing" in it.state_dict()["failed"]["v2"]
    assert batches and all("v2" not in b["ids"] for b in batches)
    for batch in batches:
        for b, key in enumerate(batch["ids"]):
            source = m.table.column("source")[int(key[1:])].as_py()
            reference = reference_clip(source, batch["frame_index"][b].numpy())
            assert psnr(batch["video"][b, 0].numpy(), reference[0]) >= PSNR_BOUND


def garble_frames(path: str) -> None:
    """Overwrite every frame's payload with noise, in place: the container (size, index, timestamps) stays intact,
    so the workers' remux succeeds and the decoder in the DALI graph fails ("No JPEG data found in image")."""
    with av.open(path) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = np.fromfile(path, np.uint8)
    rng = np.random.default_rng(7)
    for pos, size in spans:
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8)
    data.tofile(path)


def test_dali_video_recovers_from_a_clip_its_decoder_fails_on(tmp_path: Path) -> None:
    """``dali_video`` on DALI's CPU decoder: an MJPEG clip whose frames are garbled (the container intact, so only
    the decoder in the graph can tell) fails the batch; the loader finds it by probing, lists it in ``failed`` and
    serves its stand-in, every epoch's clips exactly once otherwise, the same batches in a second run."""
    m = video_manifest(tmp_path, [{"frames": 18, "codec": "mjpeg", "fps": 30.0} for _ in range(4)])
    garble_frames(m.table.column("source")[1].as_py())
    options = {"frames": [9], "images": "exclude", "video_decoder": "dali_video", "leftover": "partial"}
    runs = []
    for _ in range(2):
        with loader(m, **options) as it:
            batches = [(b["ids"], b["frame_index"].clone(), b["video"].clone()) for b in it]
            assert it.failed == ["v1"]
            assert "cannot be decoded by DALI" in it.state_dict()["failed"]["v1"]  # found by DALI, not the workers
        runs.append(batches)
    served = [(key, int(index[b, 0])) for ids, index, _ in runs[0] for b, key in enumerate(ids)]
    assert len(served) == 8  # 4 videos x 2 chunks: every position of the plan served
    assert {s for s in served if s[0] != "v1"} == {(f"v{i}", s) for i in (0, 2, 3) for s in (0, 9)}
    assert all(key != "v1" for key, _ in served)
    for ids, index, video in runs[0]:
        for b, key in enumerate(ids):
            source = m.table.column("source")[int(key[1:])].as_py()
            reference = reference_clip(source, index[b].numpy())
            assert min(psnr(video[b, k].numpy(), reference[k]) for k in range(9)) >= PSNR_BOUND
    for (ids_a, idx_a, vid_a), (ids_b, idx_b, vid_b) in zip(*runs):
        assert ids_a == ids_b and torch.equal(idx_a, idx_b) and torch.equal(vid_a, vid_b)


def test_dali_video_workers_catch_a_truncated_clip_without_identity_columns(tmp_path: Path) -> None:
    """A manifest without the files' identity (metadata-indexed) and a VP9 file truncated after indexing: DALI's
    CPU decoder would serve it without an error (it did when fed whole files); the workers' remux finds the stream
    ends before the clip's last frame, so the clip is replaced and listed as truncated."""
    m = video_manifest(tmp_path, [{"frames": 18, "codec": "vp9"} for _ in range(4)])
    truncate_clip(m.table.column("source")[3].as_py(), keep=0.5)
    with loader(m, frames=[9], images="exclude", video_decoder="dali_video", leftover="partial") as it:
        batches = list(it)
        assert it.failed == ["v3"]
        assert "truncated" in it.state_dict()["failed"]["v3"]
    assert all("v3" not in b["ids"] for b in batches)
    assert sum(len(b["ids"]) for b in batches) == 8


def test_a_clip_over_max_clip_mb_is_refused_when_the_loader_is_built(tmp_path: Path) -> None:
    """The cap is checked from the manifest before anything is read: ``dali_video`` holds ``F x H x W x 3`` at the
    source size (17 x 160 x 96 x 3 = 0.75 MiB for the 18-frame video) and the clip's packets (here the whole small
    file: a keyframe interval before 17 of 18 frames), ``pyav`` ``F x bucket x 3`` and one source frame (0.34 MiB),
    each with what is held of the file while it is read (``source_size``, under ``VIEW_BYTES``); the refusal names
    the largest clip's video."""
    from dali_arb.errors import ConfigError

    m = make_manifest(tmp_path, [{"frames": 10, "codec": "vp9"}, {"frames": 18, "codec": "vp9"}], size=SIZE, identity=True)  # fmt: skip
    encoded = max(m.table.column("source_size").to_pylist()) / 2**20
    options = {"frames": [1, 9, 17], "images": "exclude"}
    dali = 17 * SIZE[0] * SIZE[1] * 3 / 2**20 + 2 * encoded
    pyav = (17 * BUCKET[0] * BUCKET[1] * 3 + SIZE[0] * SIZE[1] * 3) / 2**20 + encoded
    cap = (dali + pyav) / 2
    with pytest.raises(ConfigError) as refused:
        loader(m, **options, video_decoder="dali_video", max_clip_mb=cap)
    message = str(refused.value)
    assert "1 clip(s)" in message and m.table.column("source")[1].as_py() in message
    assert f"max_clip_mb={cap:g}" in message and "17 frames x 160x96" in message and "\n" not in message
    loader(m, **options, video_decoder="pyav", max_clip_mb=cap).close()  # the same clips fit the workers' decode
    loader(m, **options, video_decoder="dali_video", max_clip_mb=dali * 1.01).close()
    loader(m, **options, video_decoder="dali_video", max_clip_mb=None).close()
    with pytest.raises(ConfigError, match="17 frames at the bucket size"):
        loader(m, **options, video_decoder="pyav", max_clip_mb=pyav * 0.99)


def test_max_clip_mb_is_checked_with_the_bad_value() -> None:
    from dali_arb.errors import ConfigError
    from dali_arb.loader.options import Video

    for bad in (0, -1, float("nan"), True, "4096"):
        with pytest.raises(ConfigError, match=f"max_clip_mb must be .*got {bad!r}"):
            Video(frames=[9], max_clip_mb=bad)
    with pytest.raises(ConfigError, match="need frames"):
        Video(max_clip_mb=100)
    assert Video(frames=[9]).max_clip_mb == 4096.0 and Video(frames=[9], max_clip_mb=None).max_clip_mb is None


def test_frames_keyed_batch_table_serves_and_resumes_elastically(tmp_path: Path) -> None:
    """``batch_sizes`` keyed by ``(frames, width, height)``: 1-frame samples (images) and 9-frame clips get their own
    batch; a state taken on 2 ranks resumes on 1 rank with the table doubled (the same global batch per bucket: the
    check looks the table up by frames too; without frames it found no entry)."""
    m = video_manifest(tmp_path, [{"frames": 18}, {"frames": 18, "codec": "vp9"}], images=4)
    w, h = BUCKET[1], BUCKET[0]
    from dali_arb import BucketSpec, DALIBucketIterator

    options = {"frames": [1, 9], "leftover": "partial", "device": "cpu", "workers": 0, "seed": 3, "dtype": "uint8",
               "crop": "center", "buckets": BucketSpec(bucket_sizes=[(w, h)]), "clip": "chunk"}  # fmt: skip

    def loader(manifest, **more):
        return DALIBucketIterator(manifest, **options, **more)

    with loader(m, batch_sizes={(1, w, h): 4, (9, w, h): 2}) as it:
        sizes = {(b["frame_index"].shape[1], len(b["ids"])) for b in it}
    assert sizes == {(1, 4), (9, 2)}
    two = loader(m, batch_sizes={(1, w, h): 2, (9, w, h): 1}, world_size=2, rank=0)
    state = json.loads(json.dumps(two.state_dict()))
    assert state["batching"]["batch_sizes"] == [[1, w, h, 2], [9, w, h, 1]]
    one = loader(m, batch_sizes={(1, w, h): 4, (9, w, h): 2}, world_size=1, rank=0)
    one.load_state_dict(state)
    assert len(list(one)) == len(one)


def test_dali_video_serves_rotated_and_variable_rate_clips_as_the_reference(tmp_path: Path) -> None:
    """``dali_video`` end to end on DALI's CPU decoder: MJPEG clips in MOV with a display rotation of 90 and 270
    degrees (DALI's decoder serves the coded frames: the graph turns them) and VP9 clips at a variable frame rate,
    each clip remuxed in the workers; every frame matches the reference decode, random crops and flips included,
    and the batches are the ``pyav`` workers' (same ids and frame indices)."""
    import pyarrow as pa

    rows = []
    for i, rotation in enumerate((90, 270)):
        path = make_clip(tmp_path / f"r{i}.mov", codec="mjpeg", fps=30.0, frames=20, size=SIZE, rotation=rotation, gop=5)  # fmt: skip
        rows.append({"key": f"r{i}", "source": str(path), "width": SIZE[0], "height": SIZE[1], "frames": 20,
                     "fps": 30.0, "duration": 20 / 30.0, "codec": "mjpeg", "vfr": False, "frame_times": None})  # fmt: skip
    vfr = video_manifest(tmp_path / "vfr", [{"frames": 24, "codec": "vp9", "vfr": True} for _ in range(2)])
    table = pa.concat_tables([pa.Table.from_pylist(rows, schema=vfr.table.schema), vfr.table])
    m = Manifest(table)
    options = {"frames": [9], "images": "exclude", "crop": "random", "flip": 0.5, "leftover": "partial"}
    served = list(loader(m, **options, video_decoder="dali_video"))
    workers = list(loader(m, **options, video_decoder="pyav"))
    assert len(served) == len(workers) >= 3
    keys = table.column("key").to_pylist()
    flips = 0
    for batch, theirs in zip(served, workers):
        assert batch["ids"] == theirs["ids"] and torch.equal(batch["frame_index"], theirs["frame_index"])
        for b, key in enumerate(batch["ids"]):
            source = table.column("source")[keys.index(key)].as_py()
            frames, _ = reference_frames(source)
            top, left = (int(v) for v in batch["crop_top_left"][b])
            flipped = bool(batch["flipped"][b])
            flips += flipped
            for k, index in enumerate(batch["frame_index"][b].tolist()):
                expected = cover_and_cut(frames[index], top, left, flipped)
                assert psnr(batch["video"][b, k].numpy(), expected) >= PSNR_BOUND, (key, index)
                assert psnr(batch["video"][b, k].numpy(), theirs["video"][b, k].numpy()) >= PSNR_BOUND
    assert 0 < flips


def cover_and_cut(frame: np.ndarray, top: int, left: int, flipped: bool) -> np.ndarray:
    """An upright reference frame resized to cover the bucket (Pillow), cut at the batch's ``crop_top_left`` (given
    after the flip) and flipped: ``uint8 [3, H, W]``."""
    from PIL import Image

    from dali_arb.plan.geometry import cover_crop

    bh, bw = BUCKET
    rh, rw, _, _ = cover_crop(SIZE[1], SIZE[0], bh, bw, 0.0, 0.0, center=True)
    resized = np.asarray(Image.fromarray(frame).resize((rw, rh), Image.BILINEAR, reducing_gap=None))
    if flipped:
        resized = resized[:, ::-1]
    return np.ascontiguousarray(resized[top : top + bh, left : left + bw]).transpose(2, 0, 1)
