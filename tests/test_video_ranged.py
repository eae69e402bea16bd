"""Videos are read in pieces, never whole (issue 21: "a long video never lands whole in a worker"): the workers hand
PyAV a file (a local file or tar member read with ``pread``, an object read by ranged GETs of a few cached blocks),
so a video over ``DALI_ARB_MAX_SAMPLE_BYTES`` is served (not refused as too large), a clip costs a fraction of its
file's bytes, a video changed after indexing is still caught, and a store failing mid-read stops the run as it does
for images. The limit is lowered here (as the block and read sizes are) so that small test videos stand for long
ones."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("nvidia.dali")
torch = pytest.importorskip("torch")

import pyarrow as pa  # noqa: E402

from dali_arb.data.manifest import Manifest  # noqa: E402
from dali_arb.tools.clips import make_clip, reference_frames  # noqa: E402
from dali_arb.tools.photos import psnr  # noqa: E402
from support.videomanifest import video_manifest  # noqa: E402

SIZE = (320, 192)  # (W, H) of every clip
BUCKET = (96, 160)  # (H, W): the one bucket planned
PSNR_BOUND = 38.0  # as tests/test_video_loader.py
LIMIT = 100_000  # DALI_ARB_MAX_SAMPLE_BYTES here: every video below is larger
SMALL_READS = 16 << 10  # PyAV's read buffer and the ranged object's block, lowered with the videos' size
BUCKET_NAME = "longvideos"


@pytest.fixture(autouse=True)
def small_reads(monkeypatch):
    """The sample limit under the videos' sizes, and reads sized for them (a long video's 2 MiB blocks and 256 KiB
    buffer, scaled down)."""
    monkeypatch.setenv("DALI_ARB_MAX_SAMPLE_BYTES", str(LIMIT))
    monkeypatch.setattr("dali_arb.loader.decoders.videoframes.READ_BUFFER_BYTES", SMALL_READS)
    monkeypatch.setattr("dali_arb.data.storage.ranged.BLOCK_BYTES", SMALL_READS)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Manifest:
    """Two 192-frame H.264 videos (a keyframe every 24 frames, about 360 KB each) with their identity columns."""
    folder = tmp_path_factory.mktemp("long")
    return video_manifest(folder, [{"frames": 192, "gop": 24}, {"frames": 192, "gop": 24, "photo": "coffee"}],
                          size=SIZE, identity=True)  # fmt: skip


def loader(manifest: Manifest, **options):
    from dali_arb import BucketSpec, DALIBucketIterator

    defaults = {"batch_size": 2, "frames": [9], "device": "cpu", "workers": 0, "seed": 3, "dtype": "uint8",
                "crop": "center", "buckets": BucketSpec(bucket_sizes=[(BUCKET[1], BUCKET[0])]), "clip": "uniform",
                "clip_count": 3, "images": "exclude"}  # fmt: skip
    return DALIBucketIterator(manifest, **{**defaults, **options})


def reference_clip(path: str, indices: np.ndarray) -> np.ndarray:
    """Every frame decoded (PyAV), the wanted ones resized to cover the bucket and centre-cropped: ``uint8 [F, 3, H,
    W]``."""
    from PIL import Image

    from dali_arb.plan.geometry import cover_crop

    frames, _ = reference_frames(path)
    bh, bw = BUCKET
    rh, rw, top, left = cover_crop(SIZE[1], SIZE[0], bh, bw, 0.0, 0.0, center=True)
    out = [np.asarray(Image.fromarray(frames[i]).resize((rw, rh), Image.BILINEAR, reducing_gap=None)
                      .crop((left, top, left + bw, top + bh))) for i in indices.tolist()]  # fmt: skip
    return np.stack(out).transpose(0, 3, 1, 2)


def served(it) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    return [(b["ids"], b["frame_index"].clone(), b["video"].clone()) for b in it]


def assert_reference(batches, sources: dict[str, str]) -> None:
    for ids, index, video in batches:
        for b, key in enumerate(ids):
            reference = reference_clip(sources[key], index[b].numpy())
            assert min(psnr(video[b, k].numpy(), reference[k]) for k in range(video.shape[1])) >= PSNR_BOUND, key


def sources_of(m: Manifest) -> dict[str, str]:
    return dict(zip(m.table.column("key").to_pylist(), m.table.column("source").to_pylist()))


def count_local_reads(monkeypatch) -> list[int]:
    """The bytes of every ``pread`` a local view makes, appended as they are made."""
    from dali_arb.data.localfiles import LocalRange

    reads: list[int] = []
    original = LocalRange._read_at

    def counted(self, position: int, n: int) -> bytes:
        data = original(self, position, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(LocalRange, "_read_at", counted)
    return reads


# -- local files ----------------------------------------------------------------------------------------------------
def test_a_video_over_the_sample_limit_is_served_from_a_local_file_read_in_part(videos, monkeypatch) -> None:
    """Both videos exceed ``DALI_ARB_MAX_SAMPLE_BYTES``: every clip is served (none "too large"), its frames the
    reference's, and the workers read well under the file per clip (the header, and from the keyframe before the
    clip); the whole-bytes path (images) keeps the limit."""
    sizes = videos.table.column("source_size").to_pylist()
    assert min(sizes) > LIMIT
    reads = count_local_reads(monkeypatch)
    with loader(videos) as it:
        batches = served(it)
        assert it.failed == []
    clips = sum(len(ids) for ids, _, _ in batches)
    assert clips == 6 and {int(index[b, 0]) for _, index, _ in batches for b in range(len(index))} == {0, 91, 183}
    assert_reference(batches, sources_of(videos))
    assert sum(reads) / clips < 0.5 * min(sizes), (sum(reads), clips, sizes)
    from dali_arb.data.localfiles import UNKNOWN, FileProblem, read_local

    assert read_local(sources_of(videos)["v0"], 0, -1, UNKNOWN) == FileProblem.TOO_LARGE  # whole reads keep the limit


def test_a_video_in_a_tar_shard_is_read_within_its_member(videos, tmp_path, monkeypatch) -> None:
    """Videos as members of a tar shard (``offset``, ``length`` of the shard, its identity the shard's): the same
    batches as from the files, every read inside the member's range, a fraction of the member per clip."""
    from dali_arb.data.localfiles import LocalRange

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for path in videos.table.column("source").to_pylist():
            tar.add(path, arcname=Path(path).name)
    with tarfile.open(shard) as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    names = [Path(p).name for p in videos.table.column("source").to_pylist()]
    info = shard.stat()
    table = videos.table
    for name, values, kind in (("source", [str(shard)] * 2, pa.string()),
                               ("offset", [members[n][0] for n in names], pa.int64()),
                               ("length", [members[n][1] for n in names], pa.int64()),
                               ("source_size", [info.st_size] * 2, pa.int64()),
                               ("mtime_ns", [info.st_mtime_ns] * 2, pa.int64())):  # fmt: skip
        column = pa.array(values, kind)
        table = (table.set_column(table.column_names.index(name), name, column) if name in table.column_names
                 else table.append_column(name, column))  # fmt: skip
    spans: list[tuple[int, int]] = []
    original = LocalRange._read_at

    def within(self, position: int, n: int) -> bytes:
        if self.path == str(shard):
            spans.append((self.offset + position, self.offset + position + n))
        return original(self, position, n)

    monkeypatch.setattr(LocalRange, "_read_at", within)
    with loader(Manifest(table)) as it:
        batches = served(it)
        assert it.failed == []
    with loader(videos) as it:
        files = served(it)
    assert [ids for ids, _, _ in batches] == [ids for ids, _, _ in files]
    for (_, index_a, video_a), (_, index_b, video_b) in zip(batches, files):
        assert torch.equal(index_a, index_b) and torch.equal(video_a, video_b)
    assert spans and all(any(s <= a and b <= s + members[n][1] for n, (s, _) in members.items()) for a, b in spans)
    assert sum(b - a for a, b in spans) / 6 < 0.5 * min(size for _, size in members.values())


def test_a_video_changed_after_indexing_is_replaced(videos, tmp_path) -> None:
    """A video rewritten after indexing (another size and modification time) is caught when its file is opened, as
    before, and replaced: listed once, never served."""
    import shutil

    folder = tmp_path / "copy"
    folder.mkdir()
    table = videos.table
    paths = []
    for path in table.column("source").to_pylist():
        paths.append(str(folder / Path(path).name))
        shutil.copy2(path, paths[-1])
    table = table.set_column(table.column_names.index("source"), "source", pa.array(paths))
    make_clip(paths[1], frames=190, size=SIZE, gop=24)  # rewritten
    with loader(Manifest(table), leftover="partial") as it:
        batches = served(it)
        assert it.failed == ["v1"]
        assert "changed since indexing" in it.state_dict()["failed"]["v1"]
    assert all("v1" not in ids for ids, _, _ in batches) and sum(len(ids) for ids, _, _ in batches) == 6


def test_dali_video_remuxes_from_the_view(tmp_path, monkeypatch) -> None:
    """``dali_video``: the workers remux each clip from the file view (MJPEG in AVI and in MOV turned 90 degrees,
    which DALI's CPU decoder reads), the files over the sample limit: served, within the bound of the reference
    and the ``pyav`` workers' batches, a fraction of each file read per clip."""
    rows = []
    for i, (suffix, rotation) in enumerate(((".avi", 0), (".mov", 90))):
        path = make_clip(tmp_path / f"m{i}{suffix}", codec="mjpeg", fps=30.0, frames=96, size=SIZE, rotation=rotation,
                         gop=12)  # fmt: skip
        info = path.stat()
        assert info.st_size > LIMIT
        rows.append({"key": f"m{i}", "source": str(path), "width": SIZE[0], "height": SIZE[1], "frames": 96,
                     "fps": 30.0, "duration": 96 / 30.0, "codec": "mjpeg", "vfr": False, "frame_times": None,
                     "source_size": info.st_size, "mtime_ns": info.st_mtime_ns})  # fmt: skip
    m = Manifest(pa.Table.from_pylist(rows))
    reads = count_local_reads(monkeypatch)
    with loader(m, video_decoder="dali_video") as it:
        batches = served(it)
        assert it.failed == []
    per_clip = sum(reads) / 6
    with loader(m, video_decoder="pyav") as it:
        workers = served(it)
    assert len(batches) == len(workers) == 3
    for (ids_a, index_a, video_a), (ids_b, index_b, video_b) in zip(batches, workers):
        assert ids_a == ids_b and torch.equal(index_a, index_b)
        for b in range(len(ids_a)):
            assert min(psnr(video_a[b, k].numpy(), video_b[b, k].numpy()) for k in range(9)) >= PSNR_BOUND
    assert_reference(batches, {r["key"]: r["source"] for r in rows})
    assert per_clip < 0.5 * min(r["source_size"] for r in rows), per_clip


def test_the_rotation_is_read_from_a_view_as_from_bytes(tmp_path) -> None:
    """``mp4_rotation`` walks a file object's boxes (reading their headers) to the same answer as from bytes."""
    from dali_arb.data.localfiles import UNKNOWN, open_local
    from dali_arb.loader.decoders.videoframes import mp4_rotation

    for rotation in (0, 90, 180, 270):
        path = make_clip(tmp_path / f"r{rotation}.mp4", frames=4, size=(64, 32), rotation=rotation)
        view = open_local(str(path), 0, -1, UNKNOWN)
        with view:
            assert mp4_rotation(view) == mp4_rotation(path.read_bytes()) == rotation
            assert view.bytes_read < path.stat().st_size


# -- object storage (moto) --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(videos):
    """moto's S3 with the two videos; yields ``(server, manifest of their URLs with size and ETag)``."""
    pytest.importorskip("moto")
    from dali_arb.data.storage import head
    from support.loopback import moto_bucket, put_object

    with moto_bucket(BUCKET_NAME) as server:
        urls, etags = [], []
        for path in videos.table.column("source").to_pylist():
            put_object(BUCKET_NAME, Path(path).name, Path(path).read_bytes())
            urls.append(f"s3://{BUCKET_NAME}/{Path(path).name}")
            etags.append(head(urls[-1]).etag)
        table = videos.table.set_column(videos.table.column_names.index("source"), "source", pa.array(urls))
        yield server, Manifest(table.append_column("etag", pa.array(etags)))


def test_a_video_in_object_storage_costs_a_few_ranged_reads_per_clip(videos, s3) -> None:
    """Videos over the sample limit in S3: the batches the local files give, read by ranged GETs of blocks (none
    gathered or read ahead whole: with ``read_ahead`` on, no read-ahead file is ever hit), well under the file's
    bytes and a few requests per clip."""
    _, remote = s3
    with loader(videos) as it:
        local = served(it)
    with loader(remote, workers=2, read_ahead=2) as it:
        batches = served(it)
        stats = it.stats
        assert it.failed == []
    assert [ids for ids, _, _ in batches] == [ids for ids, _, _ in local]
    for (_, index_a, video_a), (_, index_b, video_b) in zip(batches, local):
        assert torch.equal(index_a, index_b) and torch.equal(video_a, video_b)
    size = min(videos.table.column("source_size").to_pylist())
    assert stats["hits"] == 0 and stats["bytes_read"] / 6 < 0.5 * size, stats
    assert 0 < stats["requests"] / 6 < 0.5 * size / SMALL_READS, stats


def test_a_video_changed_in_object_storage_is_replaced(videos, s3) -> None:
    """An object rewritten after indexing (another ETag and size) is refused by its first ranged GET (``If-Match``)
    and replaced; the others serve on."""
    from support.loopback import put_object

    _, remote = s3
    original = Path(videos.table.column("source")[0].as_py()).read_bytes()
    put_object(BUCKET_NAME, Path(videos.table.column("source")[0].as_py()).name, original[:-1000])
    try:
        with loader(remote, leftover="partial") as it:
            batches = served(it)
            assert it.failed == ["v0"]
            assert "changed since indexing" in it.state_dict()["failed"]["v0"]
        assert all("v0" not in ids for ids, _, _ in batches) and sum(len(ids) for ids, _, _ in batches) == 6
    finally:
        put_object(BUCKET_NAME, Path(videos.table.column("source")[0].as_py()).name, original)


@pytest.mark.parametrize(("workers", "kind"), [(0, "thread"), pytest.param(2, "process", marks=pytest.mark.slow)])
def test_a_store_failing_mid_read_stops_the_loader_and_blocklists_nothing(s3, monkeypatch, workers, kind) -> None:
    """A 503 burst that outlasts the retries while a video is being read (after a few blocks of it): one
    StorageError line naming the object and the cause, out of the loader; nothing in ``failed`` (as for images:
    tests/test_trust_store.py, finding 4)."""
    from dali_arb.errors import StorageError
    from support.loopback import FaultProxy

    server, remote = s3
    monkeypatch.setattr("dali_arb.data.storage.base.BACKOFF_S", 0.01)
    with FaultProxy(server.port, skip=4, slow_down=10**9) as proxy:  # after 4 GETs every GET is a 503
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        it = loader(remote, workers=workers, worker_kind=kind)
        with pytest.raises(StorageError) as caught:
            for _ in it:
                pass
        text = str(caught.value)
        assert "\n" not in text and f"s3://{BUCKET_NAME}/" in text and "503" in text, text
        assert it.failed == [] and it.state_dict()["failed"] == {}
        assert proxy.counts.slowed > 0
        it.close()


def test_a_ranged_object_of_unknown_size_asks_once_and_keeps_a_few_blocks(videos, s3) -> None:
    """Without the indexed size (metadata manifests), one HEAD gives it; reads then come from whole blocks, the last
    ``blocks`` kept: reading the view twice over a window of 3 blocks costs 3 GETs, not 6; a read past the end is
    empty; a view of a tar-like range never reads outside it."""
    from dali_arb.data.storage.ranged import RangedObject

    path = videos.table.column("source")[0].as_py()
    data = Path(path).read_bytes()
    url = f"s3://{BUCKET_NAME}/{Path(path).name}"
    view = RangedObject(url, block_bytes=SMALL_READS, blocks=3)
    assert view.size == len(data) and view.requests == 1  # the HEAD
    for _ in range(2):
        view.seek(5)
        assert view.read(3 * SMALL_READS - 5) == data[5 : 3 * SMALL_READS]
    assert view.requests == 2 and view.bytes_read == 3 * SMALL_READS  # one GET of the three missing blocks
    view.seek(0, os.SEEK_END)
    assert view.read(10) == b"" and view.error is None
    part = RangedObject(url, offset=1000, length=5000, size=len(data), block_bytes=SMALL_READS)
    assert part.read() == data[1000:6000] and part.read(1) == b""


def test_reads_that_go_on_read_further_ahead_and_a_seek_starts_again(videos, s3) -> None:
    """Sequential reads one block at a time: the GETs take 1, 2, 4, 8 blocks (15 blocks in 4 requests, where fixed
    blocks take 15); after a seek elsewhere the next GET is one block again."""
    from dali_arb.data.storage.ranged import RangedObject

    path = videos.table.column("source")[0].as_py()
    data = Path(path).read_bytes()
    url = f"s3://{BUCKET_NAME}/{Path(path).name}"
    view = RangedObject(url, size=len(data), block_bytes=SMALL_READS, blocks=16, read_ahead_bytes=8 * SMALL_READS)
    for k in range(15):
        assert view.read(SMALL_READS) == data[k * SMALL_READS : (k + 1) * SMALL_READS]
    assert view.requests == 4 and view.bytes_read == 15 * SMALL_READS
    view.seek(18 * SMALL_READS)
    assert view.read(100) == data[18 * SMALL_READS : 18 * SMALL_READS + 100]
    assert view.requests == 5 and view.bytes_read == 16 * SMALL_READS
    fixed = RangedObject(url, size=len(data), block_bytes=SMALL_READS, read_ahead_bytes=SMALL_READS)
    for _ in range(15):
        fixed.read(SMALL_READS)
    assert fixed.requests == 15


def test_the_os_failing_mid_read_stops_the_loader(videos, monkeypatch) -> None:
    """EIO from a ``pread`` of a video while its clip is decoded is the disk's failure, not the file's: one
    StorageError line naming the file and the errno, nothing blocklisted (as for images, finding 4)."""
    import errno

    from dali_arb.data import localfiles
    from dali_arb.errors import StorageError

    calls = []
    pread = os.pread

    def failing(fd: int, n: int, offset: int) -> bytes:
        calls.append(n)
        if len(calls) > 3:
            raise OSError(errno.EIO, "Input/output error")
        return pread(fd, n, offset)

    monkeypatch.setattr(localfiles.os, "pread", failing)
    it = loader(videos)
    with pytest.raises(StorageError) as caught:
        list(it)
    text = str(caught.value)
    assert "\n" not in text and "EIO" in text and str(Path(videos.table.column("source")[0].as_py()).parent) in text
    assert it.failed == [] and it.state_dict()["failed"] == {}
    it.close()


def test_dali_video_sizes_its_shared_memory_chunks_by_the_clips_packets(videos) -> None:
    """``dali_video``'s ``bytes_per_sample`` (the workers' ``/dev/shm`` chunks) is the 99th percentile of the clips'
    packets estimated from the manifest (the file's bytes in proportion to a clip and a keyframe interval of its
    frames), not the file's size (nor nothing: whole files have no ``length``, which sized it at 256 bytes)."""
    from dali_arb.loader.decoders.video import ASSUMED_GOP

    table = videos.table
    long = table.set_column(table.column_names.index("frames"), "frames", pa.array([1920, 1920], pa.int32()))
    with loader(Manifest(long), video_decoder="dali_video", workers=2, worker_kind="thread") as it:
        hint = it._read_ahead_plan["bytes_per_sample"]
    size = max(table.column("source_size").to_pylist())
    assert hint == pytest.approx(size * (9 + ASSUMED_GOP) / 1920 + 256, rel=0.02), (hint, size)
