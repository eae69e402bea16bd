"""Facts about one encoded image, shared by the indexer and the loader.

- :func:`inspect_image`: the displayed (EXIF-upright) size of an image from its header, or why it
  cannot be trained on (the indexer's test);
- :func:`check_encoded`: cheap checks on bytes read at run time, before a decoder sees them (the
  loader's test);
- :func:`swaps_sides` and :func:`truncation`: the two rules both tests are built from;
- :func:`jpeg_swaps_sides`: :func:`swaps_sides` from the first bytes of a JPEG alone (no Pillow).

Pillow is imported lazily (only where a header is parsed).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

__all__ = [
    "DECODABLE",
    "DEFAULT_MAX_PIXELS",
    "check_encoded",
    "displayed_size",
    "header_size",
    "inspect_image",
    "jpeg_scan_start",
    "jpeg_stored_size",
    "jpeg_swaps_sides",
    "swaps_sides",
    "truncation",
]

#: Pillow's own decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``).
DEFAULT_MAX_PIXELS = 89_478_485
#: Formats DALI's image decoder reads (as Pillow names them).
DECODABLE = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM"})
#: How much of a file's end is read to look for its end marker.
TAIL_BYTES = 65536


def swaps_sides(img) -> bool:
    """True when the image's EXIF orientation turns it by 90 degrees (5-8), as DALI's decoder applies it:
    its displayed width is its stored height. JPEG, WebP, TIFF and PNG (``eXIf`` chunk) carry it."""
    if img.format == "PNG":  # an eXIf chunk before the pixels (Pillow's getexif() would decode them to look further)
        raw = img.info.get("exif")
        if not raw:
            return False
        from PIL import Image

        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1) in (5, 6, 7, 8)
    return img.format in ("JPEG", "MPO", "WEBP", "TIFF") and img.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def jpeg_swaps_sides(head: bytes) -> bool | None:
    """:func:`swaps_sides` of a JPEG from its first bytes ``head`` (the EXIF orientation of its first ``Exif`` APP1
    segment, as Pillow's ``getexif`` takes it): True for 5-8, False for any other or none (a frame or scan header
    comes first), None where ``head`` ends before that is known or is not a JPEG's start."""
    if head[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # (fill bytes before a marker)
            at += 1
            continue
        if marker == 0xDA or (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return False  # the frame or the scan before any Exif segment: no orientation
        length = int.from_bytes(head[at + 2 : at + 4], "big")
        if marker == 0xE1 and head[at + 4 : at + 10] == b"Exif\x00\x00":
            return _tiff_swaps_sides(head, at + 10, at + 2 + length)
        at += 2 + length
    return None


def jpeg_stored_size(head: bytes) -> tuple[int, int] | None:
    """A JPEG's stored ``(width, height)`` (its frame header: EXIF orientation not applied) from its first bytes
    ``head``, or None where they end before the frame header or are not a JPEG's."""
    if head[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(head[at + 7 : at + 9], "big"), int.from_bytes(head[at + 5 : at + 7], "big")
        if marker == 0xDA:
            return None
        at += 2 + int.from_bytes(head[at + 2 : at + 4], "big")
    return None


def _tiff_swaps_sides(head: bytes, tiff: int, end: int) -> bool | None:
    """Orientation 5-8 in IFD0 of the TIFF structure at ``head[tiff:end]`` (an Exif segment); None where ``head``
    ends first. A malformed structure has no orientation (False), as for Pillow."""
    order = {b"II": "little", b"MM": "big"}.get(head[tiff : tiff + 2])
    if order is None:
        return False if len(head) >= tiff + 2 else None
    if len(head) < tiff + 8:
        return None
    ifd = tiff + int.from_bytes(head[tiff + 4 : tiff + 8], order)
    if ifd + 2 > len(head):
        return None if ifd + 2 <= end else False
    for k in range(int.from_bytes(head[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(head):
            return None if entry + 12 <= end else False
        if int.from_bytes(head[entry : entry + 2], order) == 0x0112:
            return int.from_bytes(head[entry + 8 : entry + 10], order) in (5, 6, 7, 8)
    return False


def displayed_size(img) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied, as DALI's decoder applies it), from the
    header of an opened Pillow image. For TIFF the stored size is read from its tags: some Pillow versions
    report a TIFF's size already turned."""
    width, height = img.size
    tags = getattr(img, "tag_v2", None)
    if img.format == "TIFF" and tags is not None and 256 in tags and 257 in tags:
        width, height = int(tags[256]), int(tags[257])
    return (height, width) if swaps_sides(img) else (width, height)


#: What a complete PNG ends with: the IEND chunk, empty, with its CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first start-of-scan marker of a JPEG (the header's segments walked by their lengths,
    so an EXIF thumbnail's markers are skipped), or None when the header is cut short."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:
            return i
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def truncation(fmt: str, tail: bytes, size: int, whole: Callable[[], bytes]) -> str | None:
    """Why a ``fmt`` file of ``size`` bytes is truncated, or None.

    ``tail`` holds its last bytes (up to 64 KiB); ``whole()`` reads it all, which happens only when the
    tail does not settle it: small files, and files with data after the image (phones' motion photos
    append a video to the JPEG; some tools append bytes after a PNG's IEND). A JPEG is complete when an
    end-of-image marker follows its first scan (inside scan data ``FF D9`` cannot occur); a PNG, when it
    holds the IEND chunk.
    """
    if fmt in ("JPEG", "MPO"):
        if size > 2 * TAIL_BYTES and b"\xff\xd9" in tail:
            return None  # the header is far away: the marker ends the image (or data appended after it)
        data = whole()
        start = jpeg_scan_start(data)
        if start is None or data.find(b"\xff\xd9", start) < 0:
            return "truncated JPEG (no end-of-image marker after its image data)"
        return None
    if fmt == "PNG":
        if PNG_END in tail or PNG_END in whole():
            return None
        return "truncated PNG (no IEND chunk)"
    return None


def inspect_image(data_or_path: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | str:
    """The displayed ``(width, height)`` of an image, or the reason it cannot be used.

    ``data_or_path``: the encoded bytes, a file path, or a seekable binary file object with a ``size`` attribute
    (a remote object read in blocks: ``index/remote.py``). Reads the header only (plus the last bytes, to catch
    truncated JPEG/PNG files).
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we apply max_pixels ourselves, with a clear reason
    if hasattr(data_or_path, "read"):
        handle = data_or_path
        size = int(handle.size)
        try:
            handle.seek(max(0, size - TAIL_BYTES))
            tail = handle.read()
            handle.seek(0)
        except OSError as exc:
            return f"unreadable ({exc})"
        opener = handle

        def whole() -> bytes:
            handle.seek(0)
            return handle.read()
    elif isinstance(data_or_path, bytes):
        size = len(data_or_path)
        tail = data_or_path[-TAIL_BYTES:]
        opener: io.BytesIO | str = io.BytesIO(data_or_path)

        def whole() -> bytes:
            return data_or_path
    else:
        try:
            size = os.path.getsize(data_or_path)
            with open(data_or_path, "rb") as fh:
                fh.seek(max(0, size - TAIL_BYTES))
                tail = fh.read()
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        opener = data_or_path

        def whole() -> bytes:
            with open(data_or_path, "rb") as fh:
                return fh.read()

    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(opener) as img:
            fmt = img.format or "?"
            width, height = displayed_size(img)
            frames = getattr(img, "n_frames", 1)
            if width * height > max_pixels:
                return f"too large: {width}x{height} is over --max-pixels {max_pixels} (decompression bomb guard)"
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
    try:
        problem = truncation(fmt, tail, size, whole)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if problem:
        return problem
    return int(width), int(height)


def check_encoded(data: bytes) -> str | None:
    """Cheap checks on encoded bytes before the decoder sees them: the reason they are bad, or None."""
    if not data:
        return "empty"
    head = data[:16]
    if head[:3] == b"\xff\xd8\xff":
        return truncation("JPEG", data[-TAIL_BYTES:], len(data), lambda: data)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return truncation("PNG", data[-TAIL_BYTES:], len(data), lambda: data)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if len(data) >= declared else "truncated WebP"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return None
    if head[:1] == b"P" and head[1:2] in b"123456":
        return None
    return "not an image (unknown format)"


def header_size(data: bytes) -> tuple[int, int] | None:
    """The displayed ``(width, height)`` from encoded bytes' header (no pixels decoded), or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return displayed_size(img)
    except Exception:  # Pillow raises many kinds on broken headers
        return None
