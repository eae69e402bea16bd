"""Decoding chosen frames of a clip (``loader/decoders/videoframes.py``) against the reference decode.

The reference (``dali_arb.tools.clips.reference_frames``): PyAV decodes every frame from the start in presentation
order, display rotation applied; each wanted frame is then resized to cover the bucket with Pillow (whole frame,
antialiased bilinear) and cropped. The worker's decode seeks, resizes only the crop window and must land within
:data:`PSNR_BOUND` of it on every frame, and further from the wanted frame's neighbours than from the wanted frame.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from dali_arb.loader.assembly import place  # noqa: E402
from dali_arb.loader.contracts import Failure  # noqa: E402
from dali_arb.loader.decoders.videoframes import ClipFrames, decode_clip, frame_number  # noqa: E402
from dali_arb.tools.clips import make_clip, reference_frames, truncate_clip  # noqa: E402
from dali_arb.tools.photos import psnr  # noqa: E402

#: Worst frame PSNR (dB) between the worker's decode (crop window resized) and the reference (whole frame resized
#: to cover, then cropped); measured 76 dB worst on the clips of the first test below, where a neighbouring frame
#: scores at most 18 dB: the bound leaves room for other resamplers (DALI's resize in the dali_video graph).
PSNR_BOUND = 38.0
EXT = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}


def reference_crop(frame: np.ndarray, geometry) -> np.ndarray:
    """``frame`` (upright ``uint8 [H, W, 3]``) resized to cover with Pillow and cropped: ``uint8 [bh, bw, 3]``."""
    from PIL import Image

    _, _, rh, rw, top, left, bh, bw = geometry
    resized = Image.fromarray(frame).resize((rw, rh), Image.BILINEAR, reducing_gap=None)
    return np.asarray(resized.crop((left, top, left + bw, top + bh)))


def check_frames(served: np.ndarray, reference: np.ndarray, wanted: np.ndarray, geometry) -> None:
    """Every served frame is the reference's wanted frame (within the bound), and not its neighbour."""
    assert served.shape == (len(wanted), geometry.bucket_h, geometry.bucket_w, 3)
    assert served.dtype == np.uint8
    for k, index in enumerate(wanted.tolist()):
        expected = reference_crop(reference[index], geometry)
        score = psnr(served[k], expected)
        assert score >= PSNR_BOUND, f"frame {index}: {score:.1f} dB"
        for other in (index - 1, index + 1):
            if 0 <= other < len(reference) and other != index:
                assert psnr(served[k], reference_crop(reference[other], geometry)) < score - 3, (index, other)


@pytest.mark.parametrize("codec", ["h264", "vp9", "mjpeg"])
@pytest.mark.parametrize("fps", [24.0, 30.0, 60.0])
def test_frames_deep_in_a_clip_match_the_reference(tmp_path: Path, codec: str, fps: float) -> None:
    path = make_clip(tmp_path / f"c{EXT[codec]}", codec=codec, fps=fps, frames=60, size=(192, 112), gop=12)
    reference, _ = reference_frames(path)
    wanted = np.array([29, 30, 30, 33, 47], np.int64)  # not on a keyframe, a repeat, a gap
    geometry = place(112, 192, bucket_h=64, bucket_w=96, u_y=0.7, u_x=0.2, center=False)
    served, failure = decode_clip(path, ClipFrames(wanted, fps), geometry)
    assert failure == Failure.NONE
    check_frames(served, reference, wanted, geometry)


def test_bytes_and_path_give_the_same_frames(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "c.mp4", codec="h264", fps=24.0, frames=30, size=(160, 96))
    wanted = np.arange(0, 30, 4, dtype=np.int64)
    geometry = place(96, 160, bucket_h=64, bucket_w=64, u_y=0.0, u_x=0.0, center=True)
    from_path, _ = decode_clip(path, ClipFrames(wanted, 24.0), geometry)
    from_bytes, _ = decode_clip(np.fromfile(path, np.uint8), ClipFrames(wanted, 24.0), geometry)
    np.testing.assert_array_equal(from_path, from_bytes)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_clips_come_out_upright(tmp_path: Path, rotation: int) -> None:
    path = make_clip(tmp_path / "r.mp4", codec="h264", frames=24, size=(160, 96), rotation=rotation)
    reference, _ = reference_frames(path)
    height, width = reference.shape[1:3]
    assert (width, height) == (160, 96)  # the clip maker's size is the displayed one
    wanted = np.array([3, 17], np.int64)
    geometry = place(height, width, bucket_h=64, bucket_w=64, u_y=0.3, u_x=0.6, center=False)
    served, failure = decode_clip(path, ClipFrames(wanted, 24.0), geometry)
    assert failure == Failure.NONE
    check_frames(served, reference, wanted, geometry)
    # the indexed size is the upright one: the coded size is refused as changed
    coded = place(width, height, bucket_h=64, bucket_w=64, u_y=0.3, u_x=0.6, center=False)
    if rotation != 180:
        assert decode_clip(path, ClipFrames(wanted, 24.0), coded) == (None, Failure.RESIZED)


def test_variable_frame_rate_by_timestamp(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "v.mp4", codec="h264", fps=24.0, frames=40, size=(160, 96), vfr=True)
    reference, times = reference_frames(path)
    assert np.ptp(np.diff(times)) > 0.01  # really variable
    wanted = np.array([5, 6, 7, 19, 31], np.int64)
    clip = ClipFrames(wanted, fps=len(times) / (times[-1] + times[1]), frame_times=times.astype(np.float32))
    assert [frame_number(float(times[i]), clip) for i in range(len(times))] == list(range(len(times)))
    geometry = place(96, 160, bucket_h=64, bucket_w=96, u_y=0.5, u_x=0.5, center=True)
    served, failure = decode_clip(path, clip, geometry)
    assert failure == Failure.NONE
    check_frames(served, reference, wanted, geometry)


@pytest.mark.parametrize("codec", ["h264", "vp9", "mjpeg"])
def test_a_truncated_clip_is_a_failure_not_an_exception(tmp_path: Path, codec: str) -> None:
    path = make_clip(tmp_path / f"t{EXT[codec]}", codec=codec, frames=48, size=(160, 96))
    truncate_clip(path, keep=0.5)
    geometry = place(96, 160, bucket_h=64, bucket_w=64, u_y=0.0, u_x=0.0, center=True)
    served, failure = decode_clip(path, ClipFrames(np.arange(30, 47, dtype=np.int64), 24.0), geometry)
    assert served is None
    assert failure in (Failure.TRUNCATED, Failure.UNDECODABLE)


def test_frames_past_the_end_are_truncated(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "s.webm", codec="vp9", frames=20, size=(160, 96))
    geometry = place(96, 160, bucket_h=64, bucket_w=64, u_y=0.0, u_x=0.0, center=True)
    assert decode_clip(path, ClipFrames(np.array([18, 19, 20, 21]), 24.0), geometry) == (None, Failure.TRUNCATED)


def test_not_a_video_and_a_changed_size(tmp_path: Path) -> None:
    geometry = place(96, 160, bucket_h=64, bucket_w=64, u_y=0.0, u_x=0.0, center=True)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 50)
    assert decode_clip(junk, ClipFrames(np.array([0]), 24.0), geometry) == (None, Failure.UNDECODABLE)
    path = make_clip(tmp_path / "c.mp4", codec="h264", frames=12, size=(192, 96))  # indexed as 160x96
    assert decode_clip(path, ClipFrames(np.array([0]), 24.0), geometry) == (None, Failure.RESIZED)


def test_indices_must_be_non_decreasing(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "c.mp4", codec="h264", frames=12, size=(160, 96))
    geometry = place(96, 160, bucket_h=64, bucket_w=64, u_y=0.0, u_x=0.0, center=True)
    with pytest.raises(ValueError, match="non-decreasing"):
        decode_clip(path, ClipFrames(np.array([3, 1]), 24.0), geometry)


def test_seeking_decodes_only_from_the_keyframe_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker does not decode from the start: frames before the last keyframe at or before the first wanted
    frame never leave the decoder (counted on the container's decode generator)."""
    from dali_arb.loader.decoders import videoframes

    path = make_clip(tmp_path / "k.mp4", codec="h264", fps=24.0, frames=96, size=(160, 96), gop=12)
    numbers: list[int] = []
    real_number = videoframes.frame_number

    def spy(seconds: float, clip: ClipFrames) -> int:
        numbers.append(real_number(seconds, clip))
        return numbers[-1]

    monkeypatch.setattr(videoframes, "frame_number", spy)
    geometry = place(96, 160, bucket_h=64, bucket_w=64, u_y=0.0, u_x=0.0, center=True)
    _, failure = decode_clip(path, ClipFrames(np.arange(70, 75, dtype=np.int64), 24.0), geometry)
    assert failure == Failure.NONE
    assert 60 <= min(numbers) <= 70, numbers[:5]  # the keyframe at or before 70 (every 12 frames)
    assert max(numbers) == 74  # and no further than the last wanted frame


def run_graph(decoder, samples: list[dict[str, np.ndarray]], mirror: list[bool]) -> np.ndarray:
    """The decoder's graph and the pipeline's flip (CPU DALI) over ``samples``: ``uint8 [B, F, 3, H, W]``."""
    from nvidia.dali import fn, pipeline_def, types

    names = [o.name for o in (*decoder.part_outputs, *decoder.shared_outputs)]
    columns = [[s[name] for s in samples] for name in names]
    flips = [np.array(m, np.int32) for m in mirror]

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        feeds = dict(zip(names, fn.external_source(source=lambda: columns, num_outputs=len(names), batch=True)))
        images = decoder.graph(feeds, gpu=False)["images"]
        mirror_node = fn.external_source(source=lambda: flips, batch=True, dtype=types.INT32)
        return fn.crop_mirror_normalize(images, mirror=mirror_node, dtype=types.UINT8, output_layout="FCHW")

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.stack([np.asarray(out[i]) for i in range(len(samples))])


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_video_graph_on_the_cpu_matches_the_workers(tmp_path: Path, codec: str) -> None:
    """The ``dali_video`` graph (the one NVDEC runs on the GPU) on DALI's CPU decoder: the same frames, crop and
    flip as the ``pyav`` workers, by the same frame numbers (per-sample frame lists of different lengths)."""
    pytest.importorskip("nvidia.dali")
    from dali_arb.loader.decoders.video import DaliVideoDecoder, PyAVDecoder

    path = make_clip(tmp_path / f"c{EXT[codec]}", codec=codec, fps=30.0, frames=40, size=(192, 112), gop=10)
    data = np.fromfile(path, np.uint8)
    geometry = place(112, 192, bucket_h=64, bucket_w=96, u_y=0.4, u_x=0.8, center=False)
    clips = [ClipFrames(np.array([13, 14, 15, 21], np.int64), 30.0), ClipFrames(np.array([2, 38], np.int64), 30.0)]
    dali = DaliVideoDecoder()
    samples = [dali.prepare_clip(data, clip, geometry)[0] for clip in clips]
    out = [run_graph(dali, [s], [m])[0] for s, m in zip(samples, (False, True))]
    for clip, served, flipped in zip(clips, out, (False, True)):
        expected, failure = PyAVDecoder().prepare_clip(data, clip, geometry)
        assert failure == Failure.NONE
        frames = expected["video"][:, :, ::-1] if flipped else expected["video"]
        assert served.shape == (len(clip.indices), 3, 64, 96)
        for k in range(len(clip.indices)):
            assert psnr(served[k].transpose(1, 2, 0), frames[k]) >= PSNR_BOUND


def dali_raw(data: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """DALI's CPU video decoder on ``data`` at ``frames``: the coded frames ``uint8 [F, H, W, 3]``, unturned."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        feeds = fn.external_source(source=lambda: ([data], [np.asarray(frames, np.int32)]), num_outputs=2, batch=True)
        return fn.decoders.video(feeds[0], device="cpu", frames=feeds[1])

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.asarray(out[0])


#: (codec, file, make_clip options): the clips DALI's CPU decoder reads, with a variable frame rate and rotations
REMUX_CASES = [
    ("vp9", "c.webm", {}),
    ("mjpeg", "c.avi", {}),
    ("vp9", "v.webm", {"vfr": True}),
    ("mjpeg", "c.mkv", {}),
    *[("mjpeg", f"r{r}.mov", {"rotation": r}) for r in (90, 180, 270)],
]


@pytest.mark.parametrize(("codec", "name", "extra"), REMUX_CASES, ids=[c[1] for c in REMUX_CASES])
def test_dali_video_is_fed_only_the_clips_packets(tmp_path: Path, codec: str, name: str, extra: dict) -> None:
    """``dali_video`` feeds DALI the clip's packets remuxed from the keyframe before its first frame: far fewer
    bytes than the file, the same decoded frames as from the whole file (frame numbers shifted), and through the
    graph the reference's frames, upright (DALI's decoder does not turn frames: the graph does)."""
    pytest.importorskip("nvidia.dali")
    from dali_arb.loader.decoders.video import DaliVideoDecoder
    from dali_arb.loader.decoders.videoframes import clip_bytes

    path = make_clip(tmp_path / name, codec=codec, fps=30.0, frames=90, size=(192, 112), gop=10, **extra)
    reference, times = reference_frames(path)
    data = np.fromfile(path, np.uint8)
    frame_times = times.astype(np.float32) if extra.get("vfr") else None
    clip = ClipFrames(np.array([43, 44, 44, 47, 52], np.int64), 30.0, frame_times)
    cut, failure = clip_bytes(data, clip)
    assert failure == Failure.NONE
    assert 33 <= cut.first <= 43 and cut.rotation == extra.get("rotation", 0)
    assert len(cut.data) < 0.4 * len(data)  # about 20 of 90 frames
    np.testing.assert_array_equal(dali_raw(cut.data, clip.indices - cut.first), dali_raw(data, clip.indices))
    height, width = reference.shape[1:3]
    geometry = place(height, width, bucket_h=48, bucket_w=80, u_y=0.3, u_x=0.7, center=False)
    sample, failure = DaliVideoDecoder().prepare_clip(data, clip, geometry)
    assert failure == Failure.NONE
    served = run_graph(DaliVideoDecoder(), [sample], [False])[0].transpose(0, 2, 3, 1)
    check_frames(served, reference, clip.indices, geometry)


@pytest.mark.parametrize("rotation", [0, 90])
def test_clip_bytes_of_h264_with_b_frames_decode_to_the_same_frames(tmp_path: Path, rotation: int) -> None:
    """H.264 with B-frames (decode order is not presentation order; DALI's CPU decoder refuses H.264, so PyAV
    decodes the remuxed MP4): every wanted frame is in it, at its number minus the keyframe's."""
    from dali_arb.loader.decoders.videoframes import clip_bytes

    path = make_clip(tmp_path / "b.mp4", codec="h264", fps=24.0, frames=96, size=(160, 96), gop=24, rotation=rotation)
    reference, _ = reference_frames(path)
    for wanted in ([0, 1, 2], [30, 31, 40], [47, 48], [70, 95], [95]):
        cut, failure = clip_bytes(path, ClipFrames(np.array(wanted, np.int64), 24.0))
        assert failure == Failure.NONE and cut.rotation == rotation
        frames, _ = reference_frames_of_bytes(cut.data)
        assert cut.first == wanted[0] // 24 * 24  # the keyframe at or before the first wanted frame
        for index in wanted:
            assert psnr(frames[index - cut.first], reference[index]) > 60, (wanted, index)


def reference_frames_of_bytes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data.tobytes())
        f.flush()
        return reference_frames(f.name)


def test_clip_bytes_of_a_truncated_or_junk_file_are_a_failure(tmp_path: Path) -> None:
    from dali_arb.loader.decoders.videoframes import clip_bytes

    path = make_clip(tmp_path / "t.webm", codec="vp9", frames=48, size=(160, 96))
    truncate_clip(path, keep=0.5)
    assert clip_bytes(path, ClipFrames(np.arange(30, 47, dtype=np.int64), 24.0)) == (None, Failure.TRUNCATED)
    junk = tmp_path / "junk.webm"
    junk.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)  # an EBML header, then nothing
    assert clip_bytes(junk, ClipFrames(np.array([0]), 24.0)) == (None, Failure.UNDECODABLE)


def test_clip_bytes_of_an_open_gop_leave_out_the_leading_frames(tmp_path: Path) -> None:
    """x264 with open GOPs: after a keyframe come B-frames shown before it, which refer to the GOP before. The remux
    leaves them out: DALI numbers the frames of the small container by their packets' times, so one of them would be
    its frame 0 and every index would shift (PyAV's decoder drops them, so the decoded frames cannot tell); every
    wanted frame decodes as from the whole file."""
    from dali_arb.loader.decoders.videoframes import clip_bytes
    from dali_arb.tools.clips import expected_frame

    path = tmp_path / "open.mp4"
    params = "open-gop=1:keyint=24:min-keyint=24:scenecut=0:bframes=3"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"preset": "veryfast", "crf": "16", "x264-params": params})  # fmt: skip
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for k in range(96):
            frame = av.VideoFrame.from_ndarray(expected_frame(k, frames=96, size=(160, 96)), format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
    leading = [pts for (key_pts, key), (pts, _) in itertools.pairwise(packets) if key and 0 < pts < key_pts]
    assert leading  # the stream has open GOPs: a frame shown before the keyframe it follows
    reference, _ = reference_frames(path)
    for wanted in ([24, 25], [30, 40], [47, 48, 50], [72, 95]):
        cut, failure = clip_bytes(path, ClipFrames(np.array(wanted, np.int64), 24.0))
        assert failure == Failure.NONE and cut.first == wanted[0] // 24 * 24
        frames, _ = reference_frames_of_bytes(cut.data)
        assert psnr(frames[0], reference[cut.first]) > 60
        with av.open(io.BytesIO(cut.data.tobytes())) as container:  # what DALI indexes: packets, by time
            kept = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
        assert kept[0][1] and min(pts for pts, _ in kept) == kept[0][0]  # nothing shown before the keyframe
        for index in wanted:
            assert psnr(frames[index - cut.first], reference[index]) > 60, (wanted, index)


def test_the_encoded_bytes_are_not_copied_when_a_clip_is_opened(tmp_path: Path) -> None:
    """A worker holds a video's bytes once: opening them (``decode_clip``, ``clip_bytes``) reads through a view, not
    an ``io.BytesIO`` copy (which copied any buffer but ``bytes``: 64 MiB more for a 64 MiB file)."""
    import tracemalloc

    from dali_arb.loader.decoders.videoframes import clip_bytes

    path = make_clip(tmp_path / "c.mp4", codec="h264", frames=48, size=(160, 96))
    data = np.concatenate([np.fromfile(path, np.uint8), np.zeros(64 * 2**20, np.uint8)])  # a long file's size
    clip = ClipFrames(np.arange(30, 40, dtype=np.int64), 24.0)
    geometry = place(96, 160, bucket_h=64, bucket_w=64, u_y=0.0, u_x=0.0, center=True)
    for read in (lambda: clip_bytes(data, clip), lambda: decode_clip(data, clip, geometry)):
        tracemalloc.start()
        try:
            served, failure = read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert failure == Failure.NONE and served is not None
        assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB allocated while reading a 64 MiB buffer"


def test_mp4_rotation_of_odd_files_is_zero(tmp_path: Path) -> None:
    """The track-header reader never fails: not an MP4, an empty file, a truncated header, a box that lies about its
    size, all read as no rotation (FFmpeg decides whether the file is usable)."""
    from dali_arb.loader.decoders.videoframes import mp4_rotation

    path = make_clip(tmp_path / "r.mp4", codec="h264", frames=6, size=(160, 96), rotation=90)
    data = np.fromfile(path, np.uint8)
    assert mp4_rotation(path) == mp4_rotation(data) == 90
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert mp4_rotation(empty) == 0
    assert mp4_rotation(np.frombuffer(b"\x1a\x45\xdf\xa3" + bytes(60), np.uint8)) == 0  # WebM
    at = data.tobytes().find(b"tkhd")
    assert mp4_rotation(data[: at + 40]) == 0  # cut inside the track header
    lying = data.copy()
    lying[at - 4 : at] = np.frombuffer((12).to_bytes(4, "big"), np.uint8)  # a 12-byte tkhd
    assert mp4_rotation(lying) == 0
