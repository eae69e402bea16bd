"""Paired images and masks: indexed beside their images (folders, tar side members), rejected with a reason
naming the pair, and served cut, resized and flipped exactly as the image, by every decoder."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dali_arb import Manifest
from dali_arb.cli import main
from dali_arb.data.pairs import PairSpec, pair_columns
from dali_arb.errors import ConfigError
from dali_arb.index import build_index

from .conftest import SIZES, small_loader
from .images import save_jpeg
from .resume import check_save_load_state


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def upright(path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def depth_of(img: Image.Image) -> Image.Image:
    """The stand-in condition image: the photo's negative (so alignment is checkable pixel by pixel)."""
    return Image.fromarray(255 - np.asarray(img))


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """Photos (some EXIF-rotated) with a depth pair each (PNG; every third at half size, same aspect) and a
    mask each (grayscale PNG), indexed with --pair/--mask: ``(root, manifest)``."""
    root = tmp_path_factory.mktemp("paired")
    for sub in ("photos", "depth", "hole"):
        (root / sub).mkdir()
    for i, (w, h) in enumerate(SIZES):
        orientation = 6 if i % 5 == 2 else None
        stored = (h, w) if orientation else (w, h)
        path = save_jpeg(root / "photos" / f"img{i:03d}.jpg", *stored, seed=i, orientation=orientation)
        img = upright(path)
        depth = depth_of(img)
        if i % 3 == 1:
            depth = depth.resize((img.width // 2, img.height // 2), Image.LANCZOS)  # a smaller pair, same aspect
        depth.save(root / "depth" / f"img{i:03d}.png")
        img.convert("L").save(root / "hole" / f"img{i:03d}.png")
    manifest = root / "m.parquet"
    pairs = [PairSpec("depth", "pair", str(root / "depth")), PairSpec("hole", "mask", str(root / "hole"))]
    build_index([str(root / "photos")], manifest, progress=False, pairs=pairs)
    return root, manifest


def loader(manifest, **kw):
    return small_loader(manifest, **kw)


def test_pairs_are_indexed_with_their_own_sizes(paired):
    root, manifest = paired
    m = Manifest.read(manifest)
    assert m.pairs == {"depth": "pair", "hole": "mask"}
    assert len(m) == len(SIZES)
    table = m.table.to_pydict()
    for i, key in enumerate(table["key"]):
        source, offset, length, width, height = (table[c][i] for c in pair_columns("depth"))
        assert source == str(root / "depth" / f"{key}.png") and offset == 0 and length == os.path.getsize(source)
        scale = 2 if int(key[3:]) % 3 == 1 else 1
        assert (width, height) == (table["width"][i] // scale, table["height"][i] // scale)
        assert table["hole.width"][i] == table["width"][i]
    cached = Manifest.open(manifest)  # the memory-mapped cache carries them too
    assert cached.pairs == m.pairs and cached.pinned == m.pinned
    assert cached.table.column("depth.source").to_pylist() == table["depth.source"]


def test_a_missing_unreadable_or_misshapen_pair_rejects_its_sample_naming_the_pair(tmp_path):
    for sub in ("photos", "depth"):
        (tmp_path / sub).mkdir()
    for i in range(5):
        img = upright(save_jpeg(tmp_path / "photos" / f"p{i}.jpg", 120, 90, seed=i))
        depth_of(img).save(tmp_path / "depth" / f"p{i}.png")
    os.remove(tmp_path / "depth" / "p1.png")
    (tmp_path / "depth" / "p2.png").write_text("not an image")
    Image.new("RGB", (90, 90)).save(tmp_path / "depth" / "p3.png")  # square: not the photo's 4:3
    Image.new("RGB", (121, 90)).save(tmp_path / "depth" / "p4.png")  # 0.8% wider: within 1%, kept
    out = tmp_path / "m.parquet"
    summary = build_index([str(tmp_path / "photos")], out, progress=False, pairs=[PairSpec("depth", "pair", str(tmp_path / "depth"))])  # fmt: skip
    assert summary.rows == 2 and Manifest.read(out).keys.to_pylist() == ["p0", "p4"]
    reasons = {r["key"]: r["reason"] for r in map(json.loads, open(str(out) + ".rejects.jsonl"))}
    assert reasons["p1"].startswith("pair 'depth' missing: no ") and "p1.*" in reasons["p1"]
    assert reasons["p2"].startswith("pair 'depth' ") and "p2.png" in reasons["p2"]
    assert "is 90x90, not the aspect of the image (120x90)" in reasons["p3"]


@pytest.mark.parametrize("decoder", ["dali", "opencv", "pillow"])
def test_pairs_and_masks_stay_aligned_under_random_crops_and_flips(paired, decoder):
    _, manifest = paired
    it = loader(manifest, flip=0.5, decoder=decoder, crop="random")
    flips = set()
    worst_pair = worst_mask = math.inf
    for epoch in range(2):
        it.set_epoch(epoch)
        for batch in it:
            images, depth, hole = batch["images"], batch["depth"], batch["hole"]
            assert depth.shape == images.shape and depth.dtype == torch.uint8
            assert hole.shape == (images.shape[0], 1, *images.shape[2:]) and hole.dtype == torch.uint8
            flips |= set(batch["flipped"].tolist())
            for i in range(images.shape[0]):
                image = images[i].permute(1, 2, 0).numpy()
                worst_pair = min(worst_pair, psnr(255 - depth[i].permute(1, 2, 0).numpy(), image))
                gray = np.asarray(Image.fromarray(image).convert("L"))
                worst_mask = min(worst_mask, psnr(hole[i, 0].numpy(), gray))
    assert flips == {True, False} and it.failed == []  # every sample served with its own pairs
    # the half-size pairs are resampled from a quarter of the pixels: aligned, not identical
    assert worst_pair > 27 and worst_mask > 30, (worst_pair, worst_mask)


def test_masks_are_in_zero_one_and_pairs_scaled_like_images_for_float_dtypes(paired):
    _, manifest = paired
    raw = next(iter(loader(manifest, crop="center")))
    batch = next(iter(loader(manifest, crop="center", dtype="float32")))
    assert batch["hole"].min() >= 0 and batch["hole"].max() <= 1
    assert torch.allclose(batch["hole"], raw["hole"].float() / 255, atol=1e-6)
    assert torch.allclose(batch["depth"], (raw["depth"].float() - 127.5) / 127.5, atol=1e-6)
    assert next(iter(loader(manifest, dtype="bfloat16")))["hole"].dtype == torch.bfloat16


def test_resume_reproduces_pairs(paired):
    _, manifest = paired
    steps = len(loader(manifest))
    check_save_load_state(lambda: loader(manifest, flip=0.5, workers=1), [0, steps - 1])


def test_a_pair_gone_after_indexing_replaces_its_sample_and_names_the_pair(tmp_path, paired):
    root, _ = paired
    import shutil

    for sub in ("photos", "depth", "hole"):
        shutil.copytree(root / sub, tmp_path / sub)
    manifest = tmp_path / "m.parquet"
    pairs = [PairSpec("depth", "pair", str(tmp_path / "depth")), PairSpec("hole", "mask", str(tmp_path / "hole"))]
    build_index([str(tmp_path / "photos")], manifest, progress=False, pairs=pairs)
    os.remove(tmp_path / "depth" / "img004.png")
    (tmp_path / "hole" / "img007.png").write_bytes(b"\x89PNG broken")
    it = loader(manifest, decoder="opencv")
    served = [k for batch in it for k in batch["ids"]]
    assert "img004" not in served and "img007" not in served and len(served) == len(SIZES) // 4 * 4
    failed = it.state_dict()["failed"]
    assert failed["img004"].startswith("cannot open pair 'depth' ") and "img004.png" in failed["img004"]
    assert failed["img007"].startswith("mask 'hole' ") and "img007.png" in failed["img007"]


def test_tar_side_members_are_pairs(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (w, h) in enumerate(SIZES[:8]):
            path = save_jpeg(tmp_path / f"{i}.jpg", w, h, seed=i)
            members = {f"{i:04d}.jpg": path.read_bytes()}
            if i != 5:  # sample 5 has no depth member
                buf = io.BytesIO()
                depth_of(upright(path)).save(buf, "PNG")
                members[f"{i:04d}.depth.png"] = buf.getvalue()
            for name, data in sorted(members.items(), reverse=i % 2 == 0):  # the pair before its image, at times
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = tmp_path / "m.parquet"
    summary = build_index([str(shard)], manifest, progress=False, pairs=[PairSpec("depth")])
    assert summary.rows == 7
    reasons = [json.loads(line)["reason"] for line in open(str(manifest) + ".rejects.jsonl")]
    assert reasons == ["pair 'depth' missing: no 0005.depth.<ext> member in the shard"]
    for batch in loader(manifest, flip=0.5, batch_size=2):
        for i in range(2):
            image = batch["images"][i].permute(1, 2, 0).numpy()
            assert psnr(255 - batch["depth"][i].permute(1, 2, 0).numpy(), image) > 30


@pytest.mark.gpu
def test_pairs_and_masks_stay_aligned_on_the_gpu(paired):
    _, manifest = paired
    cpu = loader(manifest, flip=0.5, decoder="dali")
    gpu = loader(manifest, flip=0.5, device="gpu")
    for a, b in zip(cpu, gpu):
        assert b["depth"].device.type == "cuda" and b["hole"].shape[1] == 1
        for name in ("images", "depth", "hole"):
            diff = (a[name].float() - b[name].cpu().float()).abs().mean().item()
            assert diff < 2, f"{name}: mean absolute difference {diff:.2f} between the CPU and GPU decoders"


def test_pair_options_are_checked_in_one_line(tmp_path, capsys, paired):
    root, _ = paired
    photos = str(root / "photos")
    for args, message in [
        (["--pair", "depth"], "--pair depth has no folder: for image folders give --pair depth=DIR"),
        (["--pair", f"images={root / 'depth'}"], "pair name 'images' is taken by a batch key"),
        (["--mask", "Hole=x"], "pair name must be lower-case letters"),
        (["--pair", f"depth={tmp_path / 'nowhere'}"], "no such folder"),
        (["--pair", "depth="], "names no folder after '='"),
        (["--pair", f"d={root / 'depth'}", "--mask", f"d={root / 'hole'}"], "pair name 'd' is given twice"),
    ]:
        code = main(["index", photos, "-o", str(tmp_path / "m.parquet"), *args])
        err = capsys.readouterr().err.strip()
        assert code != 0 and message in err and "\n" not in err and "Traceback" not in err, err
    assert main(["index", photos, "-o", str(tmp_path / "ok.parquet"), "--pair", f"depth={root / 'depth'}", "-q"]) == 0
    assert Manifest.read(tmp_path / "ok.parquet").pairs == {"depth": "pair"}
    with pytest.raises(ConfigError, match="a pair's kind must be 'pair' or 'mask', got 'seg'"):
        PairSpec("x", "seg")
