"""The DALI pipeline and DALIBucketIterator on the CPU (DALI's CPU operators)."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dali_arb import (
    ConfigError,
    DALIBucketIterator,
    DeviceError,
    Manifest,
    ManifestError,
    ResourceError,
    StateError,
)
from dali_arb.index import build_index

from .conftest import SIZES, SMALL, small_loader
from .resume import check_save_load_state


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def loader(manifest, **kw):
    return small_loader(manifest, **kw)


def _budget(manifest, **kw):
    """``loader`` with batch sizes by bucket instead of its batch size."""
    options = {"buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3, **kw}
    return DALIBucketIterator(manifest if isinstance(manifest, Manifest) else str(manifest), **options)


def pillow_reference(path, target, top, left, flipped):
    """Independent reference: EXIF transpose, resize to cover with bilinear, crop, flip."""
    img = ImageOps.exif_transpose(Image.open(path).convert("RGB"))
    w, h = img.size
    bh, bw = target
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    x0 = rw - left - bw if flipped else left
    out = img.resize((rw, rh), Image.BILINEAR).crop((x0, top, x0 + bw, top + bh))
    if flipped:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out), (h, w)


@pytest.mark.parametrize("decoder", ["dali", "pillow", "opencv"])
def test_pixels_match_an_independent_pillow_reference(dataset, decoder):
    folder, manifest = dataset
    it = loader(manifest, flip=0.5, decoder=decoder)
    seen_flip = set()
    worst = math.inf
    for batch in it:
        images = batch["images"]
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        assert tuple(images.shape[2:]) == batch["target_size"]
        for i, key in enumerate(batch["ids"]):
            top, left = batch["crop_top_left"][i].tolist()
            flipped = bool(batch["flipped"][i])
            seen_flip.add(flipped)
            ref, size = pillow_reference(folder / f"{key}.jpg", batch["target_size"], top, left, flipped)
            assert tuple(batch["original_size"][i].tolist()) == size
            ours = images[i].permute(1, 2, 0).numpy()
            worst = min(worst, psnr(ours, ref))
            assert batch["captions"][i] == f"caption {int(key[3:])}"
    assert worst > 35, f"worst PSNR {worst:.1f} dB"
    assert seen_flip == {True, False}


def test_batches_stay_valid_while_later_ones_arrive(dataset):
    _, manifest = dataset
    held, copies = [], []
    for batch in loader(manifest, dtype="float16"):  # outputs reach torch without a copy
        held.append(batch["images"])
        copies.append(batch["images"].clone())
    assert len(held) > 3 and all(torch.equal(h, c) for h, c in zip(held, copies))


def test_manifest_in_memory_reaches_the_workers(dataset):
    _, manifest = dataset
    in_memory = Manifest(Manifest.read(manifest).table)  # no file for the workers to reload
    from_file = [b["ids"] for b in loader(manifest, workers=0)]
    assert [b["ids"] for b in loader(in_memory, workers=1)] == from_file
    assert [b["ids"] for b in loader(in_memory, workers=1, worker_kind="process")] == from_file


def test_center_crop_and_float_outputs(dataset):
    _, manifest = dataset
    raw = next(iter(loader(manifest, crop="center")))
    for dtype, torch_dtype in (("float16", torch.float16), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        batch = next(iter(loader(manifest, crop="center", dtype=dtype)))
        assert batch["images"].dtype == torch_dtype and batch["ids"] == raw["ids"]
        expected = (raw["images"].float() - 127.5) / 127.5
        assert batch["images"].float().min() >= -1 and batch["images"].float().max() <= 1
        assert torch.allclose(batch["images"].float(), expected, atol=0.02)
    bh, bw = raw["target_size"]
    for (h, w), (top, left) in zip(raw["original_size"].tolist(), raw["crop_top_left"].tolist()):
        scale = max(bh / h, bw / w)
        assert (top, left) == ((max(bh, round(h * scale)) - bh) // 2, (max(bw, round(w * scale)) - bw) // 2)


def test_every_rank_same_length_and_the_epoch_is_covered(dataset):
    _, manifest = dataset
    ranks = [loader(manifest, rank=r, world_size=3, batch_size=2) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    served = [key for r in ranks for batch in r for key in batch["ids"]]
    assert len(served) == len(set(served)) == len(SIZES) * 2 - (len(SIZES) * 2) % 6


def test_epochs_follow_one_another_and_reshuffle(dataset):
    _, manifest = dataset
    it = loader(manifest)
    first = [b["ids"] for b in it]
    second = [b["ids"] for b in it]  # runs epoch 1 without set_epoch
    assert it.epoch == 1 and first != second
    it.set_epoch(0)
    assert [b["ids"] for b in it] == first


@pytest.mark.parametrize(
    ("workers", "kind", "device"),
    [
        (0, "thread", "cpu"),
        (2, "thread", "cpu"),
        (1, "process", "cpu"),
        pytest.param(1, "thread", "gpu", marks=pytest.mark.gpu),
    ],
)
def test_resume_is_bit_identical_for_every_following_batch(dataset, workers, kind, device):
    """Cut anywhere, including the last step of an epoch, and every batch after the cut, across the epoch
    boundary, is the one the uninterrupted run produced (with the README's `range(loader.epoch, E)` loop);
    on the GPU too (nvJPEG, the hardware decoder's share of each batch, GPU resize)."""
    _, manifest = dataset
    steps = len(loader(manifest))
    check_save_load_state(
        lambda: loader(manifest, flip=0.5, workers=workers, worker_kind=kind, device=device),
        sorted({0, 1, steps // 2, steps - 2, steps - 1, steps + 1}),
    )


def test_elastic_resume_on_another_world_size(dataset):
    _, manifest = dataset
    two = [loader(manifest, rank=r, world_size=2, batch_size=4) for r in range(2)]
    iters = [iter(x) for x in two]
    for _ in range(2):
        for i in iters:
            next(i)
    state = two[0].state_dict()
    following = [key for i in iters for key in next(i)["ids"]]  # global batch 2, in rank order
    four = [loader(manifest, rank=r, world_size=4, batch_size=2) for r in range(4)]
    for x in four:
        x.load_state_dict(state)
    assert [key for x in four for key in next(iter(x))["ids"]] == following
    with pytest.raises(StateError, match=r"world_size 2 x batch_size 4 = 8; this loader has 4 x 4 = 16"):
        loader(manifest, rank=0, world_size=4, batch_size=4).load_state_dict(state)
    with pytest.raises(StateError, match="seed=3, this loader has seed=4"):
        loader(manifest, rank=0, world_size=2, seed=4).load_state_dict(state)


DEVICE_DECODERS = [
    ("cpu", "dali"),
    ("cpu", "pillow"),
    ("cpu", "opencv"),
    pytest.param("gpu", "dali", marks=pytest.mark.gpu),
    pytest.param("gpu", "opencv", marks=pytest.mark.gpu),  # CPU workers decode, uint8 crosses, GPU normalises
]


@pytest.mark.parametrize(("device", "decoder"), DEVICE_DECODERS)
def test_bad_files_after_indexing_are_replaced_and_nothing_else_is_lost(fresh_dataset, device, decoder):
    work, manifest = fresh_dataset
    # after indexing: one truncated, one deleted, one replaced by text, one with a broken frame header
    data = (work / "img001.jpg").read_bytes()
    (work / "img001.jpg").write_bytes(data[: len(data) // 2])
    os.remove(work / "img002.jpg")
    (work / "img004.jpg").write_text("not an image any more")
    broken = bytearray((work / "img005.jpg").read_bytes())  # markers intact, a header no decoder accepts
    broken[broken.find(b"\xff\xc0") + 9] = 0  # its frame claims 0 colour components
    before = (work / "img005.jpg").stat()
    (work / "img005.jpg").write_bytes(bytes(broken))
    # its mtime set back: the size and mtime the loader checks are the indexed ones, the decoders must refuse it
    os.utime(work / "img005.jpg", ns=(before.st_atime_ns, before.st_mtime_ns))
    bad = {"img001", "img002", "img004", "img005"}
    it = loader(manifest, decoder=decoder, device=device)
    for epoch in range(2):
        it.set_epoch(epoch)
        served = []
        for batch in it:
            assert batch["images"].shape[0] == 4 and len(batch["ids"]) == 4
            served += batch["ids"]
        assert not bad & set(served)
        total = len(SIZES) * 2
        kept = total - total % 4
        assert len(served) == kept
        # every good sample of the epoch is still served; stand-ins only repeat good ones
        planned = {k for k in it._planner.epoch(epoch).rows.ravel().tolist()}
        good_planned = {it.manifest.keys_at(np.array([r]))[0] for r in planned} - bad
        assert good_planned <= set(served)
    assert set(it.failed) == bad & {
        it.manifest.keys_at(np.array([r]))[0] for e in (0, 1) for r in it._planner.epoch(e).rows.ravel()
    }
    assert "changed since indexing" in it.state_dict()["failed"]["img001"]
    assert "cannot open" in it.state_dict()["failed"]["img002"]
    assert "cannot be decoded" in it.state_dict()["failed"]["img005"]
    if decoder == "dali":  # went through DALI's critical error, the rebuild and the probe
        assert "by DALI" in it.state_dict()["failed"]["img005"]


def test_errors_name_the_value(dataset, tmp_path):
    _, manifest = dataset
    with pytest.raises(ConfigError, match=r"dtype must be one of .* got 'int7'"):
        loader(manifest, dtype="int7")
    with pytest.raises(ConfigError, match="crop must be 'random' or 'center', got 'edge'"):
        loader(manifest, crop="edge")
    with pytest.raises(ConfigError, match=r"flip must be a probability in \[0, 1\], got 2"):
        loader(manifest, flip=2)
    with pytest.raises(ConfigError, match="device must be 'auto', 'gpu' or 'cpu', got 'tpu'"):
        loader(manifest, device="tpu")
    with pytest.raises(ConfigError, match="decoder must be 'auto', 'dali', 'pillow' or 'opencv', got 'tiff'"):
        loader(manifest, decoder="tiff")
    with pytest.raises(StateError):
        loader(manifest).load_state_dict({"epoch": 1})
    from .conftest import gpu_available, write_size_manifest

    if not gpu_available():
        with pytest.raises(DeviceError, match="DALI sees no CUDA GPU"):
            loader(manifest, device="gpu")
    sizes_only = write_size_manifest(tmp_path / "s.parquet", np.array([100] * 8), np.array([100] * 8))
    with pytest.raises(ManifestError, match="has no image files to read"):
        loader(sizes_only)


@pytest.mark.gpu
def test_gpu_matches_cpu(dataset):
    _, manifest = dataset
    cpu = loader(manifest, flip=0.5, device="cpu", decoder="dali")
    gpu = loader(manifest, flip=0.5, device="gpu")
    for a, b in zip(cpu, gpu):
        assert b["images"].device.type == "cuda" and b["images"].dtype == torch.uint8
        assert a["ids"] == b["ids"] and torch.equal(a["crop_top_left"], b["crop_top_left"])
        assert a["images"].shape == b["images"].shape
        diff = (a["images"].float() - b["images"].cpu().float()).abs().mean().item()
        assert diff < 2, f"mean absolute difference {diff:.2f}"
    fp = next(iter(loader(manifest, device="gpu", dtype="bfloat16")))
    assert fp["images"].dtype == torch.bfloat16 and fp["images"].device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("batching", [{"batch_size": 2}, {"batch_pixels": 3 * 160 * 160, "batch_size": None}])
def test_gpu_memory_stays_flat_across_bucket_changes(dataset, batching):
    """Also with batch sizes by bucket (issue 20): each step its own batch size, one pipeline built for the largest."""
    _, manifest = dataset
    batching = {k: v for k, v in batching.items() if v is not None}
    options = {"device": "gpu", "dtype": "float16", **batching}
    it = loader(manifest, **options) if "batch_size" in batching else _budget(manifest, **options)
    from nvidia.dali.backend import ReleaseUnusedMemory

    for _ in it:  # warm-up epoch: step 0 serves the largest bucket
        pass
    torch.cuda.synchronize()
    ReleaseUnusedMemory()
    free, total = torch.cuda.mem_get_info()
    warm = total - free
    for _ in range(3):  # three more epochs, every step a different bucket order
        for _ in it:
            pass
    torch.cuda.synchronize()
    ReleaseUnusedMemory()
    free, total = torch.cuda.mem_get_info()
    assert (total - free) - warm < 64 * 2**20, f"GPU memory grew by {((total - free) - warm) / 2**20:.0f} MiB"


@pytest.mark.parametrize(("device", "decoder"), DEVICE_DECODERS)
def test_tar_shards_metadata_paths_and_every_format(tmp_path, device, decoder):
    """Positioned reads from shards, whole-file reads from metadata paths, and PNG (gray, RGBA), WebP,
    CMYK and progressive JPEG: every sample decodes to RGB at its bucket and matches the Pillow reference
    (on the GPU, CMYK and progressive JPEGs take nvJPEG's CUDA decoder, not the hardware one)."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .images import photo_like

    def encoded(i: int) -> tuple[str, bytes]:
        img = photo_like(*SIZES[i % len(SIZES)], seed=i)
        buf = io.BytesIO()
        kind = i % 6
        if kind == 5:
            img.save(buf, "JPEG", quality=92, progressive=True)
        elif kind == 0:
            img.save(buf, "JPEG", quality=92)
        elif kind == 1:
            img.convert("L").save(buf, "PNG")
        elif kind == 2:
            img.convert("RGBA").save(buf, "PNG")
        elif kind == 3:
            img.save(buf, "WEBP", quality=95)
        else:
            img.convert("CMYK").save(buf, "JPEG", quality=92)
        return ("jpg", "png", "png", "webp", "jpg", "jpg")[kind], buf.getvalue()

    samples = {f"{i:04d}": encoded(i) for i in range(20)}
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for key, (ext, data) in list(samples.items())[:12]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = tmp_path / "files"
    folder.mkdir()
    rows = []
    for key, (ext, data) in list(samples.items())[12:]:
        (folder / f"{key}.{ext}").write_bytes(data)
        w, h = Image.open(io.BytesIO(data)).size
        rows.append({"key": key, "width": w, "height": h, "path": f"files/{key}.{ext}"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "meta.parquet")
    manifest = tmp_path / "m.parquet"
    build_index([str(tmp_path / "shard-0.tar"), str(tmp_path / "meta.parquet")], manifest, progress=False)
    it = loader(manifest, decoder=decoder, device=device, batch_size=2)
    seen = []
    for batch in it:
        for i, key in enumerate(batch["ids"]):
            ref_img = Image.open(io.BytesIO(samples[key][1]))
            path = tmp_path / f"ref-{key}.{samples[key][0]}"
            path.write_bytes(samples[key][1])
            top, left = batch["crop_top_left"][i].tolist()
            ref, _ = pillow_reference(path, batch["target_size"], top, left, bool(batch["flipped"][i]))
            ours = batch["images"][i].permute(1, 2, 0).cpu().numpy()
            assert psnr(ours, ref) > 30, (key, ref_img.mode, psnr(ours, ref))
            seen.append(key)
    assert len(seen) == 20 and not it.failed


class _FailingPipeline:
    """Stands in for a DALI pipeline whose every run fails with ``message`` (a device, not a file)."""

    def __init__(self, message):
        self.message = message

    def run(self):
        raise RuntimeError(self.message)


@pytest.mark.parametrize(
    ("message", "error", "match"),
    [
        ("Critical error in pipeline: CUDA error (2): out of memory", ResourceError, "ran out of memory .* lower batch_size"),
        ("Error in CPU operator `nvidia.dali.fn.decoders.image`\nencountered:\nsomething broke", DeviceError,
         "every sample of it fails alone too: the decoder or device failed, not the files"),
    ],
)  # fmt: skip
def test_a_failing_device_is_one_clear_error_and_blocklists_nothing(dataset, monkeypatch, message, error, match):
    """Out of memory, or a decoder that fails on every sample, is not a bad file: nothing good is blocklisted."""
    import dali_arb.loader.pipeline

    _, manifest = dataset
    it = loader(manifest, decoder="dali")
    monkeypatch.setattr(dali_arb.loader.pipeline, "build_pipeline", lambda *a, **k: _FailingPipeline(message))
    with pytest.raises(error, match=match):
        next(iter(it))
    assert it.failed == [] and it.state_dict()["failed"] == {}


def test_loader_options_are_validated(dataset):
    _, manifest = dataset
    with pytest.raises(ConfigError, match="num_threads must be a positive integer, got 0"):
        loader(manifest, num_threads=0)
    with pytest.raises(ConfigError, match=r"hw_decoder_load must be a share in \[0, 1\], got 1.5"):
        loader(manifest, decoder="dali", hw_decoder_load=1.5)


def test_a_small_dev_shm_lowers_the_prefetch_or_says_what_to_do(dataset, monkeypatch):
    import dali_arb.loader.resources as module

    _, manifest = dataset
    roomy = loader(manifest, workers=2, worker_kind="process")
    per_batch = roomy._read_ahead_plan["bytes_per_sample"] * 4
    assert roomy._read_ahead_plan["source_prefetch"] == 4  # 2 per worker
    # DALI's pool holds one chunk per batch ahead, shared by the workers, plus the pipeline's prefetch (2)
    assert roomy.read_ahead_bytes() == (4 + 2) * per_batch
    monkeypatch.setattr(module, "free_shared_memory", lambda: per_batch * (3 + 2))
    assert loader(manifest, workers=2, worker_kind="process")._read_ahead_plan["source_prefetch"] == 3
    monkeypatch.setattr(module, "free_shared_memory", lambda: per_batch)
    with pytest.raises(
        ResourceError,
        match=r"^/dev/shm has 0 MiB free, but the 2 loader worker\(s\) need .*--ipc=host.*worker_kind='thread'",
    ):
        loader(manifest, workers=2, worker_kind="process")
    # worker threads hand batches over in the process's memory: /dev/shm plays no part, the depth stays
    threads = loader(manifest, workers=2)
    assert threads._read_ahead_plan["source_prefetch"] == 4 and threads.read_ahead_bytes() == 4 * per_batch
    assert len(list(threads)) == len(threads)
    assert loader(manifest, workers=0)._read_ahead_plan["source_prefetch"] == 0  # no workers, no read-ahead


def test_the_ranks_of_a_node_share_its_cores(dataset, monkeypatch):
    """Eight ranks on a 16-core node: each starts 2 decoding workers by default, not 16 (128 in all)."""
    import dali_arb.loader.session as module

    _, manifest = dataset
    monkeypatch.setattr(module, "cpu_count", lambda: 16)
    assert loader(manifest, decoder="opencv", workers=None).workers == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader(manifest, decoder="opencv", workers=None).workers == 2
    assert loader(manifest, decoder="opencv", workers=5).workers == 5  # given: as given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")
    with pytest.raises(ConfigError, match="local_world_size must be at least 1, got 0"):
        loader(manifest)


def test_every_worker_has_a_batch_in_flight(dataset, monkeypatch):
    """DALI gives each batch to one worker: with fewer batches ahead than workers, workers sit idle (16 workers
    ran with 8 batches ahead, 0.78x the OpenCV peer on 16 cores)."""
    import dali_arb.loader.resources as module

    _, manifest = dataset
    monkeypatch.setattr(module, "free_shared_memory", lambda: 64 << 30)
    for workers in (1, 4, 16, 24):
        for kind in ("thread", "process"):
            plan = loader(manifest, workers=workers, worker_kind=kind)._read_ahead_plan
            assert plan["source_prefetch"] >= max(2, workers + 1)


def test_gpu_preallocation_follows_the_served_images_not_the_longest_side(dataset):
    """One rejected 20000x800 panorama must not make the GPU decoder reserve 20000x20000 per sample."""
    import pyarrow as pa

    _, manifest = dataset
    table = Manifest.read(manifest).table
    panorama = table.slice(0, 1).set_column(1, "width", pa.array([20000], pa.int32()))
    panorama = panorama.set_column(2, "height", pa.array([800], pa.int32())).set_column(
        0, "key", pa.array(["panorama"])
    )
    it = loader(Manifest(pa.concat_tables([table, panorama])))
    h, w = it._preallocation()
    served = it._planner.assignment.bucket >= 0
    assert not served[-1] and served[:-1].sum() > 30  # the panorama is rejected for its aspect
    heights, widths = it.manifest.heights[:-1][served[:-1]], it.manifest.widths[:-1][served[:-1]]
    assert (h, w) == (int(np.ceil(np.percentile(heights, 99))), int(np.ceil(np.percentile(widths, 99))))
    assert max(h, w) <= 500  # not 20000: the rejected panorama is not served
