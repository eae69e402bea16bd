"""Real image files made on the spot for tests: formats, orientations and every kind of bad file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus shapes: it compresses and resizes like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.28)
        channels.append(127 + 60 * np.sin(x / width * fx + phase) + 60 * np.cos(y / height * fy + c))
    arr = np.stack(channels, axis=-1)
    for _ in range(4):  # a few soft discs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        arr[mask] = arr[mask] * 0.5 + rng.uniform(0, 255, 3) * 0.5
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save_jpeg(path: Path, width: int, height: int, *, seed: int = 0, orientation: int | None = None, **kw) -> Path:
    img = photo_like(width, height, seed)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(path, "JPEG", quality=90, **kw)
    return path


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    photo_like(width, height, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def animated_gif(path: Path) -> Path:
    frames = [photo_like(32, 32, seed=i) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path
