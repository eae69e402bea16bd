"""A hostile user against what landed for issues 21 and 22: odd original sizes (metadata and the Parquet beside
shards), a Parquet beside a shard that lists a key twice, odd batch-size tables and clips that end among an open
GOP's leading frames. Each test here failed before its fix (or is a strict xfail naming where the fix belongs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb.errors import ConfigError
from dali_arb.index import build_index
from dali_arb.plan.batching import BatchSizing

from .images import jpeg_bytes
from .test_original_size import STORED, photos
from .test_shards_meta import write_shard

REPO = Path(__file__).resolve().parents[1]


def index_cli(*args: str) -> subprocess.CompletedProcess:
    """``dali-arb index ARGS`` in a subprocess (what a user sees: its exit status and its lines)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "dali_arb", "index", *args], capture_output=True, text=True, env=env)


def columns(path: Path, *names: str) -> list[tuple]:
    table = pq.read_table(path)
    return list(zip(*(table.column(n).to_pylist() for n in names)))


# -- original sizes as odd values -------------------------------------------------------------------------------------


def test_metadata_with_original_sizes_past_int64_keeps_the_rows_without_them(tmp_path: Path) -> None:
    """An unsigned 64-bit original size past int64 (a corrupt or sentinel value) is not a usable size: the row keeps
    its own size, as for any other out-of-range value. Before: 'internal error: ArrowInvalid ... report it'."""
    keys = photos(tmp_path / "images", STORED[:2])
    meta = tmp_path / "images" / "meta.parquet"
    pq.write_table(pa.table({
        "key": keys, "path": [f"{k}.jpg" for k in keys], "width": [300, 200], "height": [200, 300],
        "original_width": pa.array([2**63 + 5, 800], pa.uint64()),
        "original_height": pa.array([5, 1200], pa.uint64()),
    }), meta)  # fmt: skip
    out = tmp_path / "m.parquet"
    done = index_cli(str(meta), "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    assert columns(out, "key", "original_width", "original_height") == [("img0", None, None), ("img1", 800, 1200)]


def test_metadata_with_sizes_past_int64_rejects_those_rows(tmp_path: Path) -> None:
    """The same for the size columns: the row is rejected with its reason, the others indexed."""
    keys = photos(tmp_path / "images", STORED[:2])
    meta = tmp_path / "images" / "meta.parquet"
    pq.write_table(pa.table({"key": keys, "path": [f"{k}.jpg" for k in keys],
                             "width": pa.array([2**64 - 1, 200], pa.uint64()), "height": pa.array([200, 300], pa.uint64())}),
                   meta)  # fmt: skip
    out = tmp_path / "m.parquet"
    summary = build_index([str(meta)], out, workers=1, progress=False)
    assert columns(out, "key", "width", "height") == [("img1", 200, 300)]
    assert summary.rejected == 1


def test_the_parquet_beside_a_shard_gives_original_sizes_as_metadata_does(tmp_path: Path) -> None:
    """Original sizes written as text ("800", as from a CSV turned into Parquet) or past int64: read as metadata reads
    them (text of a whole number kept, the value past int64 dropped), not the whole index stopped nor every row's
    original size dropped. Before: past int64 stopped the index ('cannot read ... the metadata beside ...'); text
    gave no original size at all where metadata gave one."""
    folder = tmp_path / "shards"
    folder.mkdir()
    shard = write_shard(folder / "00000.tar", [("a", jpeg_bytes(200, 300, seed=1), "x"),
                                               ("b", jpeg_bytes(300, 200, seed=2), "y")])  # fmt: skip
    base = {"key": ["a", "b"], "width": [200, 300], "height": [300, 200]}
    pq.write_table(pa.table({**base, "original_width": ["800", "900"], "original_height": ["1200", " 600 "]}),
                   folder / "00000.parquet")  # fmt: skip
    out = tmp_path / "text.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    assert columns(out, "key", "original_width", "original_height") == [("a", 800, 1200), ("b", 900, 600)]

    huge = {"original_width": pa.array([2**63 + 5, 900], pa.uint64()), "original_height": pa.array([5, 600], pa.uint64())}  # fmt: skip
    pq.write_table(pa.table({**base, **huge}), folder / "00000.parquet")
    out = tmp_path / "huge.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    assert columns(out, "key", "original_width", "original_height") == [("a", None, None), ("b", 900, 600)]


# -- a Parquet beside a shard that lists a key twice ------------------------------------------------------------------


def test_a_key_the_parquet_lists_twice_is_sized_from_its_image(tmp_path: Path) -> None:
    """img2dataset's Parquet beside a shard lists key ``a`` twice with different sizes (two runs' metadata joined):
    neither can be trusted, so the sample is read from the tar like a sample the Parquet does not list. Before: the
    last row won silently, a 200x300 image was indexed as 999x100 (bucketed, cropped and conditioned as that)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    shard = write_shard(folder / "00000.tar", [("a", jpeg_bytes(200, 300, seed=1), "x"),
                                               ("b", jpeg_bytes(300, 200, seed=2), "y")])  # fmt: skip
    pq.write_table(pa.table({"key": ["a", "a", "b"], "width": [200, 999, 300], "height": [300, 100, 200],
                             "caption": ["c1", "c2", "c3"], "original_width": [800, 4000, 900],
                             "original_height": [1200, 400, 600]}),
                   folder / "00000.parquet")  # fmt: skip
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    assert columns(out, "key", "width", "height", "caption", "original_width") == [
        ("a", 200, 300, "x", None),  # from the image and its .txt, as without the Parquet
        ("b", 300, 200, "c3", 900),
    ]


def test_a_key_listed_twice_alike_or_once_failed_keeps_the_parquets_facts(tmp_path: Path) -> None:
    """The same row twice, or a failed download and a success of one key, is no conflict: the Parquet's facts."""
    folder = tmp_path / "shards"
    folder.mkdir()
    shard = write_shard(folder / "00000.tar", [("a", jpeg_bytes(200, 300, seed=1), "x"),
                                               ("b", jpeg_bytes(300, 200, seed=2), "y")])  # fmt: skip
    pq.write_table(pa.table({"key": ["a", "a", "b", "b"], "width": [200, 200, None, 300],
                             "height": [300, 300, None, 200], "caption": ["c1", "c1", None, "c3"],
                             "status": ["success", "success", "failed_to_download", "success"]}),
                   folder / "00000.parquet")  # fmt: skip
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    assert columns(out, "key", "width", "height", "caption") == [("a", 200, 300, "c1"), ("b", 300, 200, "c3")]


# -- batch-size tables ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [(float("inf"), 832, 480), (832, float("-inf")), (float("nan"), 832, 480)])
def test_a_table_key_that_is_not_finite_is_a_config_error(key: tuple) -> None:
    """Before: ``(inf, 832, 480)`` raised OverflowError (a traceback), not the table's ConfigError."""
    with pytest.raises(ConfigError, match="batch_sizes must map"):
        BatchSizing(batch_sizes={key: 2})


# -- open GOPs through dali_video's remux -----------------------------------------------------------------------------


def open_gop_h264(path: Path, frames: int = 96) -> Path:
    """x264 with open GOPs every 24 frames (3 B-frames): a keyframe's leading B-frames are shown before it."""
    av = pytest.importorskip("av")
    from dali_arb.tools.clips import expected_frame

    params = "open-gop=1:keyint=24:min-keyint=24:scenecut=0:bframes=3"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"preset": "veryfast", "crf": "16", "x264-params": params})  # fmt: skip
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(expected_frame(k, frames=frames, size=(160, 96)), format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("wanted", [[40, 47], [47], [20, 23], [44, 45, 46]])
def test_a_clip_ending_on_an_open_gops_leading_frames_is_not_truncated(tmp_path: Path, wanted: list[int]) -> None:
    """Frames 45-47 (and 21-23, 69-71) are shown before the keyframe at 48 but decoded after it. A clip whose last
    frame is one of them is whole: ``clip_bytes`` must give its packets (and the keyframe after, which they refer
    to), not TRUNCATED: dali_video would drop it as a bad sample from a good file, every epoch."""
    from dali_arb.loader.contracts import Failure
    from dali_arb.loader.decoders.videoframes import ClipFrames, clip_bytes
    from dali_arb.tools.clips import reference_frames
    from dali_arb.tools.photos import psnr

    path = open_gop_h264(tmp_path / "open.mp4")
    cut, failure = clip_bytes(path, ClipFrames(np.array(wanted, np.int64), 24.0))
    assert failure == Failure.NONE
    reference, _ = reference_frames(path)
    with open(tmp_path / "cut.mp4", "wb") as f:
        f.write(cut.data.tobytes())
    frames, _ = reference_frames(tmp_path / "cut.mp4")
    for index in wanted:
        assert psnr(frames[index - cut.first], reference[index]) > 60, index


# -- frame buckets ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["frames", "stride", "count"])
def test_a_frame_count_past_int32_is_a_config_error(option: str) -> None:
    """``--frames 99999999999999999999`` was 'internal error: OverflowError ... report it' in ``buckets``
    (``np.asarray(frames, np.int64)``); no video holds more than 2**31 - 1 frames (the manifest's int32)."""
    from dali_arb.plan.frames import FrameSpec

    given = {"frames": (1, 17), option: 10**20} if option != "frames" else {"frames": (1, 10**20)}
    with pytest.raises(ConfigError, match=r"at most 2\*\*31 - 1.*100000000000000000000"):
        FrameSpec(**given)
    FrameSpec(**{**given, option: 2**31 - 1} if option != "frames" else {"frames": (1, 2**31 - 1)})


def test_buckets_with_a_huge_frame_bucket_says_one_line(capsys) -> None:
    from dali_arb.cli import main

    assert main(["buckets", "--frames", "99999999999999999999", "--bucket-sizes", "512x512", "-b", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2**31 - 1" in err[0] and "internal error" not in err[0]


# -- captions: the Parquet beside a shard without one for a key --------------------------------------------------------


def test_a_caption_the_parquet_lacks_is_read_from_the_tar(tmp_path: Path) -> None:
    """The Parquet beside a shard has a ``caption`` column, null (or empty) for ``a`` and ``b``, whose captions are in
    the tar (``a.txt``, ``b.json``: captioned after the download). Null means the Parquet does not know, not that the
    sample has no caption: the tar's caption is kept, as when the shard is read without the Parquet. Before: the
    samples were indexed without a caption (trained unconditioned), silently."""
    import io
    import json
    import tarfile

    folder = tmp_path / "shards"
    folder.mkdir()
    members = [("a.jpg", jpeg_bytes(200, 300, seed=1)), ("a.txt", b"a red door"),
               ("b.jpg", jpeg_bytes(300, 200, seed=2)), ("b.json", json.dumps({"caption": "a blue car"}).encode()),
               ("c.jpg", jpeg_bytes(240, 240, seed=3)), ("c.txt", b"not this one")]  # fmt: skip
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["a", "b", "c"], "width": [200, 300, 240], "height": [300, 200, 240],
                             "caption": [None, "  ", "the Parquet's"]}),
                   folder / "00000.parquet")  # fmt: skip
    out = tmp_path / "m.parquet"
    build_index([str(folder / "00000.tar")], out, workers=1, progress=False)
    assert columns(out, "key", "caption") == [("a", "a red door"), ("b", "a blue car"), ("c", "the Parquet's")]


# -- max_clip_mb and videos in a shard ---------------------------------------------------------------------------------


def test_a_small_video_in_a_large_shard_is_not_refused_by_max_clip_mb(tmp_path: Path) -> None:
    """Two 13 KB clips in a 12 MiB webdataset shard: a worker reads a member (``length``), never the shard, so a 5
    MiB cap holds them, and dali_video's ``/dev/shm`` chunks are sized by the member's packets. Before: both refused
    as holding the shard's bytes (its ``source_size``): with the default cap (4096 MiB) no clip of a shard over 4 GiB
    could be loaded at all, and the chunk hint was the shard's share, not the clip's."""
    import io
    import tarfile

    from dali_arb import BucketSpec, DALIBucketIterator
    from dali_arb.tools.clips import make_clip

    members = []
    for i in range(2):
        clip = make_clip(tmp_path / f"v{i}.webm", codec="vp9", fps=24.0, frames=12, size=(96, 64))
        members.append((f"v{i}.webm", clip.read_bytes()))
    members.append(("pad.bin", bytes(12 << 20)))  # the rest of the shard (other samples' members)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "m.parquet"
    build_index([str(tmp_path / "s.tar")], out, workers=1, progress=False)
    options = {"batch_size": 1, "frames": [1, 9], "images": "exclude", "device": "cpu", "workers": 0,
               "dtype": "uint8", "clip": "chunk", "leftover": "partial", "max_clip_mb": 5,
               "buckets": BucketSpec(bucket_sizes=[(96, 64)])}  # fmt: skip
    with DALIBucketIterator(str(out), **options, video_decoder="pyav") as it:
        assert sorted(key for batch in it for key in batch["ids"]) == ["v0", "v1"]
    threads = {"workers": 2, "worker_kind": "thread"}
    with DALIBucketIterator(str(out), **{**options, **threads}, video_decoder="dali_video") as it:
        hint = it._read_ahead_plan["bytes_per_sample"]
    member = max(len(data) for name, data in members if name.endswith(".webm"))
    assert hint <= member + 256  # (12 frames: every clip's packets are the whole member)


# -- a damaged tar header inside a shard ------------------------------------------------------------------------------


def damaged_shard(folder: Path) -> tuple[Path, list[str]]:
    """A shard of six samples whose third image's header is damaged (one byte of its mode field flipped: the header
    checksum fails); the keys."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    samples = [(f"{i:03d}", jpeg_bytes(64 + i, 48, seed=i), f"cap {i}") for i in range(6)]
    shard = write_shard(folder / "00000.tar", samples)
    with tarfile.open(shard) as tar:
        victim = next(m for m in tar.getmembers() if m.name == "002.jpg")
    raw = bytearray(shard.read_bytes())
    raw[victim.offset + 100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return shard, [k for k, _, _ in samples]


@pytest.mark.parametrize("with_parquet", [False, True])
def test_a_damaged_header_inside_a_shard_is_a_reject_not_silence(tmp_path: Path, with_parquet: bool) -> None:
    """``tarfile`` ends its member list at a header whose checksum fails (after the first): the samples from there
    on were dropped with no reject, the run said 'rejected 0'. Now the shard's samples before it are indexed and a
    reject names the shard, the byte and what to do."""
    shard, keys = damaged_shard(tmp_path / "shards")
    if with_parquet:
        pq.write_table(pa.table({"key": keys, "width": [64 + i for i in range(6)], "height": [48] * 6}),
                       shard.with_suffix(".parquet"))  # fmt: skip
    out = tmp_path / "m.parquet"
    summary = build_index([str(shard)], out, workers=1, progress=False)
    assert [k for (k,) in columns(out, "key")] == keys[:2]
    rejects = [__import__("json").loads(line) for line in open(f"{out}.rejects.jsonl")]
    assert summary.rejected == 1 and len(rejects) == 1
    assert rejects[0]["source"] == str(shard) and "damaged tar header at byte" in rejects[0]["reason"]


def test_a_shard_without_end_of_archive_blocks_is_whole(tmp_path: Path) -> None:
    """A tar cut exactly after its last member (no two zero blocks: some writers, a copy cut at a member's end) has no
    damaged header: every sample, no reject."""
    folder = tmp_path / "shards"
    folder.mkdir()
    shard = write_shard(folder / "00000.tar", [(f"{i}", jpeg_bytes(64, 48, seed=i), None) for i in range(3)])
    import tarfile

    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    shard.write_bytes(shard.read_bytes()[:end])
    summary = build_index([str(shard)], tmp_path / "m.parquet", workers=1, progress=False)
    assert summary.rows == 3 and summary.rejected == 0


def test_the_s3_header_walk_of_a_damaged_shard_gives_the_local_reject(tmp_path: Path, monkeypatch) -> None:
    """The same shard in S3 with its Parquet, walked with ranged GETs: the local rows and reject (naming the URL)."""
    pytest.importorskip("moto")
    from dali_arb.data.storage import head
    from dali_arb.index import remote
    from dali_arb.index.shards import shard_task
    from support.loopback import moto_bucket, put_object

    shard, keys = damaged_shard(tmp_path / "shards")
    meta = shard.with_suffix(".parquet")
    pq.write_table(pa.table({"key": keys, "width": [64 + i for i in range(6)], "height": [48] * 6}), meta)
    local_rows, local_rejects = shard_task((str(shard), 10**8, [], str(meta)))
    monkeypatch.setattr(remote, "WALK_MIN_STRIDE", 1)  # (small images: walked, not fetched whole)
    with moto_bucket("hostile"):
        put_object("hostile", "d/00000.tar", shard.read_bytes())
        put_object("hostile", "d/00000.parquet", meta.read_bytes())
        rows, rejects, _, walked = remote.remote_shard_task((head("s3://hostile/d/00000.tar"), 10**8, 4096))
    assert walked and [(r.key, r.offset) for r in rows] == [(r.key, r.offset) for r in local_rows]
    assert [r["reason"] for r in rejects] == [r["reason"] for r in local_rejects] and len(rejects) == 1
    assert rejects[0]["source"] == "s3://hostile/d/00000.tar"


# -- a member appended to a shard after its Parquet was written -------------------------------------------------------


@pytest.mark.parametrize("appended", ["image", "caption"])
def test_a_member_appended_after_the_parquet_is_read_from_the_tar(tmp_path: Path, appended: str) -> None:
    """``tar -rf`` appends a new ``a.jpg`` (another picture, 400x100) or a new ``a.txt`` to a shard that
    img2dataset's Parquet describes: the last copy is the sample (as for every tar extractor), and the Parquet
    describes the first, so the sample is read from the tar. Before: the new picture's bytes were indexed with the
    old one's size (200x300, a portrait bucket for a 4:1 image) and caption ("old"): served under another's label."""
    import io
    import tarfile

    folder = tmp_path / "shards"
    folder.mkdir()
    shard = write_shard(folder / "00000.tar", [("a", jpeg_bytes(200, 300, seed=1), "old"),
                                               ("b", jpeg_bytes(300, 200, seed=2), "b")])  # fmt: skip
    added = [("a.jpg", jpeg_bytes(400, 100, seed=9))] if appended == "image" else []
    with tarfile.open(shard, "a") as tar:
        for name, data in [*added, ("a.txt", b"new")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["a", "b"], "width": [200, 300], "height": [300, 200], "caption": ["old", "b"]}),
                   folder / "00000.parquet")  # fmt: skip
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    size = (400, 100) if appended == "image" else (200, 300)
    assert columns(out, "key", "width", "height", "caption") == [("a", *size, "new"), ("b", 300, 200, "b")]


# -- EXIF orientation and the Parquet beside a shard ------------------------------------------------------------------


def exif_shard(folder: Path) -> Path:
    """A shard of ``r`` (stored 300x200, EXIF orientation 6: shown 200x300) and ``n`` (300x200, no EXIF), and the
    Parquet img2dataset writes beside it keeping the JPEGs' bytes (``--resize_mode no`` or
    ``--resize_only_if_bigger`` with ``--skip_reencode``): sizes from cv2's ``IMREAD_UNCHANGED`` (orientation not
    applied), original sizes alike."""
    from .images import save_jpeg

    folder.mkdir(parents=True)
    save_jpeg(folder / "r.jpg", 300, 200, seed=1, orientation=6)
    shard = write_shard(folder / "00000.tar", [("r", (folder / "r.jpg").read_bytes(), "x"),
                                               ("n", jpeg_bytes(300, 200, seed=2), "y")])  # fmt: skip
    pq.write_table(pa.table({"key": ["r", "n"], "width": [300, 300], "height": [200, 200],
                             "original_width": [1200, 900], "original_height": [800, 600]}),
                   folder / "00000.parquet")  # fmt: skip
    return shard


def test_an_exif_turned_jpeg_sized_by_the_parquet_is_served(tmp_path: Path) -> None:
    """The manifest holds the photo's displayed size, as without the Parquet, and its original size turned alike
    (SDXL's original_size describes the picture served: a portrait); the walk reads its first bytes for the EXIF
    orientation. Before: indexed 300x200, the loader refused its decoded
    200x300 ('changed since indexing') and replaced it every epoch; ``--update`` read the same Parquet again."""
    from .conftest import small_loader

    shard = exif_shard(tmp_path / "shards")
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    assert columns(out, "key", "width", "height", "original_width", "original_height") == [
        ("r", 200, 300, 800, 1200), ("n", 300, 200, 900, 600),
    ]  # fmt: skip
    with small_loader(str(out), leftover="partial") as it:
        assert sorted(key for batch in it for key in batch["ids"]) == ["n", "r"]


def test_the_s3_walk_finds_the_exif_orientation_in_the_window_it_holds(tmp_path: Path, monkeypatch) -> None:
    """In S3 the JPEG's first bytes come with the window that read its header (not one request more than the walk
    without the EXIF check), and the rows are the local shard's."""
    pytest.importorskip("moto")
    from dali_arb.data.storage import head
    from dali_arb.index import remote, shards
    from dali_arb.index.shards import shard_task
    from support.loopback import moto_bucket, put_object

    shard = exif_shard(tmp_path / "shards")
    meta = shard.with_suffix(".parquet")
    local_rows, _ = shard_task((str(shard), 10**8, [], str(meta)))
    monkeypatch.setattr(remote, "WALK_MIN_STRIDE", 1)
    with moto_bucket("hostile"):
        put_object("hostile", "e/00000.tar", shard.read_bytes())
        put_object("hostile", "e/00000.parquet", meta.read_bytes())
        rows, rejects, io, walked = remote.remote_shard_task((head("s3://hostile/e/00000.tar"), 10**8, 4096))
        monkeypatch.setattr(shards, "_exif_turned", lambda *args: False)
        unchecked = remote.remote_shard_task((head("s3://hostile/e/00000.tar"), 10**8, 4096))[2]
    assert walked and not rejects
    assert (
        [(r.key, r.width, r.height, r.original_width) for r in rows]
        == [(r.key, r.width, r.height, r.original_width) for r in local_rows]
        == [("r", 200, 300, 800), ("n", 300, 200, 900)]
    )
    assert io["requests"] == unchecked["requests"] and io["bytes_read"] == unchecked["bytes_read"]


# -- a damaged Parquet beside a shard ---------------------------------------------------------------------------------


def test_a_damaged_parquet_beside_a_shard_is_one_line_with_what_to_do(tmp_path: Path) -> None:
    """A Parquet beside a shard whose footer reads but whose ``width`` column chunk is garbage: the index stops with
    one line naming it and what to do. Before: two lines (Arrow's message goes on: 'Deserializing page header
    failed.') and no way out."""
    folder = tmp_path / "shards"
    folder.mkdir()
    shard = write_shard(folder / "00000.tar", [("a", jpeg_bytes(64, 48, seed=1), "x")])
    meta = folder / "00000.parquet"
    pq.write_table(pa.table({"key": ["a"], "width": [64], "height": [48]}), meta, compression="none")
    chunk = pq.read_metadata(meta).row_group(0).column(1)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(meta.read_bytes())
    raw[start : start + chunk.total_compressed_size] = b"\xab" * chunk.total_compressed_size
    meta.write_bytes(bytes(raw))
    done = index_cli(str(shard), "-o", str(tmp_path / "m.parquet"), "-q")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert str(meta) in lines[0] and "move it away (the shard is then read whole)" in lines[0]
    meta.rename(tmp_path / "aside.parquet")  # what the line says: then the shard indexes
    assert index_cli(str(shard), "-o", str(tmp_path / "m.parquet"), "-q").returncode == 0


def test_a_parquet_that_already_gives_the_displayed_size_is_not_turned_again(tmp_path: Path) -> None:
    """A Parquet written by another tool with the photo's displayed size (200x300): its frame header (300x200, in the
    first bytes read) shows the size is already turned, so it stays."""
    shard = exif_shard(tmp_path / "shards")
    meta = shard.with_suffix(".parquet")
    pq.write_table(pa.table({"key": ["r", "n"], "width": [200, 300], "height": [300, 200]}), meta)
    out = tmp_path / "m.parquet"
    build_index([str(shard)], out, workers=1, progress=False)
    assert columns(out, "key", "width", "height") == [("r", 200, 300), ("n", 300, 200)]


def test_jpeg_stored_size_and_orientation_from_a_prefix(tmp_path: Path) -> None:
    """``jpeg_swaps_sides`` and ``jpeg_stored_size`` agree with Pillow wherever the bytes given reach far enough,
    and say None (unknown) where they do not."""
    from PIL import Image

    from dali_arb.data.imagefacts import jpeg_stored_size, jpeg_swaps_sides, swaps_sides

    from .images import save_jpeg

    for orientation in (None, 1, 3, 5, 6, 7, 8):
        for extra in ({}, {"icc_profile": b"x" * 3000}):
            data = save_jpeg(tmp_path / "o.jpg", 64, 48, orientation=orientation, **extra).read_bytes()
            with Image.open(tmp_path / "o.jpg") as img:
                turned, stored = swaps_sides(img), img.size
            assert jpeg_swaps_sides(data) == turned and jpeg_stored_size(data) == stored
            for n in (16, 100, 1000, 4000):
                assert jpeg_swaps_sides(data[:n]) in (None, turned) and jpeg_stored_size(data[:n]) in (None, stored)
    assert jpeg_swaps_sides(b"not a jpeg") is None and jpeg_stored_size(b"") is None
