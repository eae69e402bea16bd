"""Indexing videos (issue 21): the facts read from containers (data/videofacts.py), videos beside images in one
manifest (index/), rejects with reasons, and a video that changed after indexing caught by the identity check."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

av = pytest.importorskip("av")

from dali_arb.data.localfiles import FileProblem, Identity, read_local  # noqa: E402
from dali_arb.data.manifest import VIDEO, Manifest  # noqa: E402
from dali_arb.data.videofacts import inspect_video  # noqa: E402
from dali_arb.index import build_index  # noqa: E402
from dali_arb.tools.clips import clip_times, make_clip, truncate_clip  # noqa: E402

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "dali_arb", "samples")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One clip of each kind the issue names, made once for the module."""
    folder = tmp_path_factory.mktemp("clips")
    made = {
        "h264_24": make_clip(folder / "h264_24.mp4", fps=24, frames=30, size=(128, 72)),
        "vp9_30": make_clip(folder / "vp9_30.webm", codec="vp9", fps=30, frames=30, size=(96, 64)),
        "mjpeg_60": make_clip(folder / "mjpeg_60.avi", codec="mjpeg", fps=60, frames=30, size=(64, 48)),
        "mkv_30": make_clip(folder / "mkv_30.mkv", fps=30, frames=20, size=(64, 64)),
        "rot90": make_clip(folder / "rot90.mp4", frames=10, size=(128, 72), rotation=90),
        "rot180": make_clip(folder / "rot180.mov", frames=10, size=(128, 72), rotation=180),
        "vfr_mp4": make_clip(folder / "vfr_mp4.mp4", fps=30, frames=24, size=(64, 64), vfr=True),
        "vfr_webm": make_clip(folder / "vfr_webm.webm", codec="vp9", fps=30, frames=24, size=(64, 64), vfr=True),
    }
    return made


@pytest.mark.parametrize(
    ("name", "frames", "fps", "size", "codec", "counted"),
    [
        ("h264_24", 30, 24.0, (128, 72), "h264", False),  # MP4's index covers the file: header only
        ("vp9_30", 30, 30.0, (96, 64), "vp9", True),  # WebM has no count in its header: demuxed
        ("mjpeg_60", 30, 60.0, (64, 48), "mjpeg", False),
        ("mkv_30", 20, 30.0, (64, 64), "h264", True),
        ("rot90", 10, 24.0, (128, 72), "h264", False),  # display-upright: the coded 72x128 turned
        ("rot180", 10, 24.0, (128, 72), "h264", False),
    ],
)
def test_facts_of_each_kind(clips, name, frames, fps, size, codec, counted):
    facts = inspect_video(clips[name])
    assert not isinstance(facts, str), facts
    assert (facts.width, facts.height) == size
    assert (facts.frames, facts.codec, facts.vfr, facts.counted) == (frames, codec, False, counted)
    assert facts.fps == pytest.approx(fps)
    assert facts.duration == pytest.approx(frames / fps)
    assert facts.frame_times is None
    assert facts.rotation == {"rot90": 90, "rot180": 180}.get(name, 0)


def test_header_only_reads_a_fraction_of_a_long_mp4(tmp_path):
    path = make_clip(tmp_path / "long.mp4", frames=240, size=(256, 144), gop=48)
    facts = inspect_video(path)
    assert facts.frames == 240 and not facts.counted
    assert facts.bytes_read < 0.25 * os.path.getsize(path), (facts.bytes_read, os.path.getsize(path))


def test_rotated_clip_is_stored_sideways(clips):
    with av.open(str(clips["rot90"])) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (72, 128)  # so the upright size above came from the rotation


@pytest.mark.parametrize("name", ["vfr_mp4", "vfr_webm"])
def test_variable_frame_rate_times(clips, name):
    facts = inspect_video(clips[name])
    assert facts.vfr and facts.counted and facts.frames == 24
    want = clip_times(fps=30, frames=24, vfr=True)
    np.testing.assert_allclose(facts.frame_times, want, atol=1.1e-3)
    assert facts.fps == pytest.approx(24 / facts.duration)
    assert facts.fps < 30  # the pauses make the average rate lower than the nominal one


def _truncated(clips, name, tmp_path):
    copy = tmp_path / os.path.basename(clips[name])
    shutil.copy(clips[name], copy)
    return truncate_clip(copy, keep=0.5)


@pytest.mark.parametrize("name", ["h264_24", "vp9_30", "mjpeg_60", "mkv_30"])
def test_truncated_video_is_rejected(clips, name, tmp_path):
    reason = inspect_video(_truncated(clips, name, tmp_path))
    assert isinstance(reason, str) and reason.startswith("truncated"), reason


def test_reasons_for_bad_files(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    audio = tmp_path / "audio.mkv"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    odd = tmp_path / "mpeg2.mkv"
    with av.open(str(odd), "w") as container:
        stream = container.add_stream("mpeg2video", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    assert inspect_video(tmp_path / "empty.mp4") == "empty file (0 bytes)"
    assert inspect_video(tmp_path / "text.mp4").startswith("unreadable video (")
    assert inspect_video(audio).startswith("no video stream")
    assert inspect_video(odd).startswith("video codec 'mpeg2video': no decoder here reads it")


def test_big_frames_are_refused(clips):
    assert inspect_video(clips["h264_24"], max_pixels=90 * 90).startswith("too large: 128x72")


def test_file_object_source(clips):
    with open(clips["vp9_30"], "rb") as fh:
        facts = inspect_video(fh)
    assert facts.frames == 30 and facts.codec == "vp9"


def test_folder_of_images_and_videos(clips, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in clips.values():
        shutil.copy(path, data)
    shutil.copy(_truncated(clips, "h264_24", tmp_path), data / "cut.mp4")
    shutil.copy(os.path.join(SAMPLES, "coffee.jpg"), data)
    (data / "h264_24.txt").write_text("a slow pan over an astronaut\n")
    summary = build_index([str(data)], tmp_path / "m.parquet", workers=1)
    line = summary.line()
    assert "indexed 1 images and 8 videos" in line
    assert "videos: 4 from their header and first frame, 4 counted by demuxing" in line
    assert "KiB read per video" in line and "1 truncated video" in line
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.schema.names[-len(VIDEO) :] == VIDEO.names
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["coffee"]["frames"] is None and rows["coffee"]["codec"] is None  # an image: no video facts
    assert rows["h264_24"]["caption"] == "a slow pan over an astronaut"
    assert (rows["h264_24"]["frames"], rows["h264_24"]["fps"], rows["h264_24"]["codec"]) == (30, 24.0, "h264")
    assert (rows["rot90"]["width"], rows["rot90"]["height"]) == (128, 72)
    assert rows["vfr_webm"]["vfr"] is True and len(rows["vfr_webm"]["frame_times"]) == 24
    assert rows["vp9_30"]["frame_times"] is None
    rejects = [json.loads(line) for line in open(tmp_path / "m.parquet.rejects.jsonl")]
    assert [r["key"] for r in rejects] == ["cut"] and "header promises 30 frames" in rejects[0]["reason"]
    assert len(Manifest.read(tmp_path / "m.parquet")) == 9


def test_image_only_manifest_has_no_video_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(os.path.join(SAMPLES, "coffee.jpg"), data)
    summary = build_index([str(data)], tmp_path / "m.parquet", workers=1)
    assert not set(VIDEO.names) & set(pq.read_schema(tmp_path / "m.parquet").names)
    assert summary.line().startswith("indexed 1 images into") and "videos" not in summary.line()


def test_video_changed_after_indexing_is_caught(clips, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = shutil.copy(clips["h264_24"], data / "clip.mp4")
    build_index([str(data)], tmp_path / "m.parquet", workers=1)
    row = pq.read_table(tmp_path / "m.parquet").to_pylist()[0]
    identity = Identity(row["source_size"], row["mtime_ns"], row["etag"])
    assert isinstance(read_local(row["source"], row["offset"], row["length"], identity), bytes)
    make_clip(path, fps=24, frames=12, size=(128, 72))  # re-encoded in place: another file under the same name
    assert read_local(row["source"], row["offset"], row["length"], identity) is FileProblem.CHANGED


def _shard(path, members: dict[str, bytes]):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_videos_in_tar_shards(clips, tmp_path):
    members = {
        "0001.mp4": clips["h264_24"].read_bytes(),
        "0001.txt": b"a pan in a shard",
        "0002.webm": clips["vfr_webm"].read_bytes(),
        "0003.jpg": open(os.path.join(SAMPLES, "coffee.jpg"), "rb").read(),
        "0004.mp4": clips["h264_24"].read_bytes()[:20000],  # truncated inside the shard
    }
    shard = _shard(tmp_path / "s.tar", members)
    summary = build_index([str(shard)], tmp_path / "m.parquet", workers=1)
    assert "indexed 1 images and 2 videos" in summary.line()
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "m.parquet").to_pylist()}
    assert rows["0001"]["frames"] == 30 and rows["0001"]["caption"] == "a pan in a shard"
    assert rows["0002"]["vfr"] and len(rows["0002"]["frame_times"]) == 24
    assert rows["0003"]["frames"] is None
    with open(shard, "rb") as fh:  # the row's bytes are the member: it decodes as the clip
        fh.seek(rows["0001"]["offset"])
        assert fh.read(rows["0001"]["length"]) == members["0001.mp4"]
    rejects = [json.loads(line) for line in open(tmp_path / "m.parquet.rejects.jsonl")]
    assert [r["key"] for r in rejects] == ["0004"] and "truncated" in rejects[0]["reason"]
    # --update reuses the unchanged shard's rows, video facts included
    again = build_index([str(shard)], tmp_path / "m.parquet", workers=1, update=True)
    assert again.reused == 3 and "and 2 videos" in again.line()
    rows2 = {r["key"]: r for r in pq.read_table(tmp_path / "m.parquet").to_pylist()}
    assert rows2["0002"]["frame_times"] == rows["0002"]["frame_times"] and rows2["0001"]["frames"] == 30


def test_videos_under_an_object_storage_prefix(clips, tmp_path):
    pytest.importorskip("moto")
    from support.loopback import moto_bucket, put_object

    with moto_bucket("videos"):
        put_object("videos", "clips/a.mp4", clips["h264_24"].read_bytes())
        put_object("videos", "clips/a.txt", b"a remote pan")
        put_object("videos", "clips/b.webm", clips["vp9_30"].read_bytes())
        put_object("videos", "clips/c.jpg", open(os.path.join(SAMPLES, "coffee.jpg"), "rb").read())
        summary = build_index(["s3://videos/clips/"], tmp_path / "m.parquet", workers=1)
    assert "indexed 1 images and 2 videos" in summary.line()
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "m.parquet").to_pylist()}
    assert (rows["a"]["frames"], rows["a"]["caption"], rows["a"]["codec"]) == (30, "a remote pan", "h264")
    assert (rows["b"]["frames"], rows["b"]["codec"], rows["b"]["fps"]) == (30, "vp9", 30.0)
    assert rows["a"]["source"] == "s3://videos/clips/a.mp4" and rows["a"]["etag"]
    assert rows["c"]["frames"] is None


def test_metadata_with_video_columns(clips, tmp_path):
    import pyarrow as pa

    table = pa.table({
        "key": ["a", "b", "c", "d"],
        "width": [128, 96, 600, 64],
        "height": [72, 64, 400, 64],
        "path": [str(clips["h264_24"]), str(clips["vp9_30"]), os.path.join(SAMPLES, "coffee.jpg"), str(clips["mkv_30"])],
        "frames": [30, 30, None, 20],
        "fps": [24.0, 30.0, None, None],  # d: a video without a rate
        "codec": ["h264", "vp9", None, "h264"],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "meta.parquet")
    summary = build_index([str(tmp_path / "meta.parquet")], tmp_path / "m.parquet", workers=1)
    assert "indexed 1 images and 2 videos" in summary.line()
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "m.parquet").to_pylist()}
    assert (rows["a"]["frames"], rows["a"]["fps"], rows["a"]["duration"], rows["a"]["vfr"]) == (30, 24.0, 1.25, False)
    assert rows["c"]["frames"] is None and "d" not in rows
    rejects = [json.loads(line) for line in open(tmp_path / "m.parquet.rejects.jsonl")]
    assert [r["key"] for r in rejects] == ["d"] and "frames >= 1 and fps > 0" in rejects[0]["reason"]
