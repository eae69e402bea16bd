"""The test clip maker (dali_arb.tools.clips): what it writes is what it says, decoded by PyAV as the reference."""

from __future__ import annotations

import numpy as np
import pytest

av = pytest.importorskip("av")

from dali_arb.tools.clips import (  # noqa: E402
    clip_times,
    expected_frame,
    make_clip,
    reference_frames,
    truncate_clip,
    upright,
)
from dali_arb.tools.photos import psnr  # noqa: E402

FRAMES = 20


def _stream_facts(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, stream.width, stream.height, float(stream.average_rate)


@pytest.mark.parametrize(
    ("codec", "fps", "suffix", "bound"),
    [("h264", 24.0, ".mp4", 30.0), ("vp9", 30.0, ".webm", 30.0), ("mjpeg", 60.0, ".avi", 30.0)],
)
def test_clip_frames_match_what_was_rendered(tmp_path, codec, fps, suffix, bound):
    path = make_clip(tmp_path / "clip", codec=codec, fps=fps, frames=FRAMES, size=(128, 72))
    assert path.suffix == suffix
    name, width, height, rate = _stream_facts(path)
    assert (name, width, height) == (codec, 128, 72)
    assert rate == pytest.approx(fps)
    images, times = reference_frames(path)
    assert images.shape == (FRAMES, 72, 128, 3)
    np.testing.assert_allclose(times, np.arange(FRAMES) / fps, atol=1e-3)
    for k in range(FRAMES):
        want = expected_frame(k, frames=FRAMES, size=(128, 72))
        assert psnr(images[k], want) > bound, (codec, k)
        if k + 1 < FRAMES:  # every frame is recognisably itself, not its neighbour
            assert psnr(images[k], expected_frame(k + 1, frames=FRAMES, size=(128, 72))) < bound - 8


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_a_display_matrix_pyav_reads_back(tmp_path, rotation):
    path = make_clip(tmp_path / "phone.mp4", frames=6, size=(96, 64), rotation=rotation)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        coded = (stream.width, stream.height)
        frame = next(container.decode(stream))
    assert frame.rotation % 360 == rotation  # PyAV reports -180..180
    assert coded == ((64, 96) if rotation in (90, 270) else (96, 64))
    shown = upright(frame.to_ndarray(format="rgb24"), frame.rotation)
    assert shown.shape == (64, 96, 3)
    assert psnr(shown, expected_frame(0, frames=6, size=(96, 64))) > 30
    assert psnr(frame.to_ndarray(format="rgb24")[:64, :64], expected_frame(0, frames=6, size=(96, 64))[:, :64]) < 25


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_variable_frame_rate_clip_has_the_promised_times(tmp_path, suffix):
    codec = "h264" if suffix == ".mp4" else "vp9"
    path = make_clip(tmp_path / f"vfr{suffix}", codec=codec, fps=30.0, frames=FRAMES, size=(64, 64), vfr=True)
    want = clip_times(fps=30.0, frames=FRAMES, vfr=True)
    assert len(np.unique(np.round(np.diff(want), 6))) > 1  # the times really vary
    _, times = reference_frames(path)
    np.testing.assert_allclose(times, want, atol=1.1e-3)  # Matroska keeps milliseconds


def test_truncated_clip_keeps_its_head(tmp_path):
    path = make_clip(tmp_path / "cut.mp4", frames=FRAMES, size=(64, 64))
    whole = path.stat().st_size
    assert truncate_clip(path, keep=0.5) == path
    assert path.stat().st_size == whole // 2
    with av.open(str(path)) as container:  # the index at the front still promises every frame
        assert container.streams.video[0].frames == FRAMES


def test_bad_options_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="codec='hevc'"):
        make_clip(tmp_path / "a", codec="hevc")
    with pytest.raises(ValueError, match=r"rotation=90: only \.mp4/\.mov"):
        make_clip(tmp_path / "a.webm", codec="vp9", rotation=90)
    with pytest.raises(ValueError, match="vfr=True"):
        make_clip(tmp_path / "a.avi", codec="mjpeg", vfr=True)
    with pytest.raises(ValueError, match=r"a vp9 clip is written as \.webm"):
        make_clip(tmp_path / "a.mp4", codec="vp9")
    with pytest.raises(ValueError, match="photo='nope'"):
        make_clip(tmp_path / "a", photo="nope")
    with pytest.raises(ValueError, match=r"keep=1\.5"):
        truncate_clip(tmp_path / "a.mp4", keep=1.5)
