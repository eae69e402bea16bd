"""Test photographs and how close a loader's pixels are to them: JPEGs tiled from the real photographs shipped
in ``dali_arb/samples`` (:func:`make_photo_jpegs`), the full-resolution reference resize
(:func:`reference_image`) and :func:`psnr`. Imports NumPy and the plan layer; Pillow when called."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..plan.geometry import cover_crop

__all__ = ["make_photo_jpegs", "psnr", "reference_image"]


def make_photo_jpegs(
    folder: str | os.PathLike, count: int, *, min_mp: float = 0.8, max_mp: float = 3.0, seed: int = 0
) -> list[Path]:
    """``count`` JPEGs of ``min_mp``..``max_mp`` megapixels and varied aspect ratios, tiled from the
    real photographs shipped in ``dali_arb/samples`` at their native scale (photo statistics, not noise)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples_dir = Path(__file__).parent.parent / "samples"
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(samples_dir.glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        aspect = float(np.clip(np.exp(rng.normal(0, 0.45)), 1 / 3, 3))
        pixels = rng.uniform(min_mp, max_mp) * 1e6
        w, h = int(np.sqrt(pixels * aspect)), int(np.sqrt(pixels / aspect))
        canvas = np.empty((h, w, 3), np.uint8)
        y = 0
        while y < h:
            tile_h = int(rng.integers(200, 420))
            x = 0
            while x < w:
                photo = photos[int(rng.integers(len(photos)))]
                tile_w = int(rng.integers(200, 420))
                th, tw = min(tile_h, h - y, photo.shape[0]), min(tile_w, w - x, photo.shape[1])
                py, px = int(rng.integers(0, photo.shape[0] - th + 1)), int(rng.integers(0, photo.shape[1] - tw + 1))
                tile = photo[py : py + th, px : px + tw]
                canvas[y : y + th, x : x + tw] = tile[:, ::-1] if rng.random() < 0.5 else tile
                x += tw
            y += min(tile_h, h - y)
        path = folder / f"photo{i:05d}.jpg"
        Image.fromarray(canvas).save(path, quality=90)
        paths.append(path)
    return paths


def reference_image(path: str, bh: int, bw: int) -> np.ndarray:
    """The quality reference: full-resolution decode, EXIF-upright, antialiased bilinear resize to cover
    (Pillow), centre crop: ``uint8 (bh, bw, 3)``."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        rh, rw, top, left = cover_crop(img.height, img.width, bh, bw, 0.0, 0.0, center=True)
        return np.asarray(
            img.resize((rw, rh), Image.BILINEAR, reducing_gap=None).crop((left, top, left + bw, top + bh))
        )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)
