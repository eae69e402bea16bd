"""Facts about one encoded image, shared by the indexer and the loader.

- :func:`inspect_image`: the displayed (EXIF-upright) size of an image from its header, or why it
  cannot be trained on (the indexer's test);
- :func:`check_encoded`: cheap checks on bytes read at run time, before a decoder sees them (the
  loader's test);
- :func:`swaps_sides` and :func:`truncation`: the two rules both tests are built from.

Pillow is imported lazily (only where a header is parsed).
"""

from __future__ import annotations

import io
import os

__all__ = ["DECODABLE", "DEFAULT_MAX_PIXELS", "check_encoded", "inspect_image", "swaps_sides", "truncation"]

#: Pillow's own decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS = 89_478_485
#: Formats DALI's image decoder reads (as Pillow names them).
DECODABLE = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM"})
#: How much of a file's end is read to look for its end marker.
TAIL_BYTES = 65536


def swaps_sides(img) -> bool:
    """True when the image's EXIF orientation turns it by 90 degrees (5-8), as DALI's decoder
    applies it: its displayed width is its stored height. JPEG, WebP and TIFF keep it in the header."""
    return img.format in ("JPEG", "MPO", "WEBP", "TIFF") and img.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def truncation(fmt: str, tail: bytes) -> str | None:
    """Why a ``fmt`` file whose last bytes (up to 64 KiB) are ``tail`` is truncated, or None."""
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail[-32:]:
        return "truncated PNG (no IEND chunk)"
    return None


def inspect_image(data_or_path: bytes | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | str:
    """The displayed ``(width, height)`` of an image, or the reason it cannot be used.

    Reads the header only (plus the last bytes, to catch truncated JPEG/PNG files).
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we apply max_pixels ourselves, with a clear reason
    if isinstance(data_or_path, bytes):
        size = len(data_or_path)
        tail = data_or_path[-TAIL_BYTES:]
        opener: io.BytesIO | str = io.BytesIO(data_or_path)
    else:
        try:
            size = os.path.getsize(data_or_path)
            with open(data_or_path, "rb") as fh:
                fh.seek(max(0, size - TAIL_BYTES))
                tail = fh.read()
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        opener = data_or_path
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(opener) as img:
            fmt = img.format or "?"
            width, height = img.size
            frames = getattr(img, "n_frames", 1)
            if width * height > max_pixels:
                return f"too large: {width}x{height} is over --max-pixels {max_pixels} (decompression bomb guard)"
            swapped = swaps_sides(img)
    except UnidentifiedImageError:
        return "not an image (no known image format)"
    except Exception as exc:  # Pillow raises many types on damaged headers
        return f"damaged image header ({type(exc).__name__}: {str(exc)[:80]})"
    if fmt not in DECODABLE:
        what = "animated GIF" if fmt == "GIF" and frames > 1 else f"{fmt} image"
        return f"{what}: not decodable by DALI (convert to JPEG or PNG)"
    if frames > 1 and fmt not in ("MPO", "TIFF"):
        return f"animated {fmt}: not decodable by DALI (convert to a still image)"
    if width < 1 or height < 1:
        return f"invalid size {width}x{height}"
    problem = truncation(fmt, tail)
    if problem:
        return problem
    if swapped:
        width, height = height, width
    return int(width), int(height)


def check_encoded(data: bytes) -> str | None:
    """Cheap checks on encoded bytes before the decoder sees them: the reason they are bad, or None."""
    if not data:
        return "empty"
    head = data[:16]
    if head[:3] == b"\xff\xd8\xff":
        return truncation("JPEG", data[-TAIL_BYTES:])
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return truncation("PNG", data[-TAIL_BYTES:])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if len(data) >= declared else "truncated WebP"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return None
    if head[:1] == b"P" and head[1:2] in b"123456":
        return None
    return "not an image (unknown format)"
