"""Where one image goes in a batch: the cover resize and the crop window. Pure arithmetic."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Geometry", "cover_crop"]


class Geometry(NamedTuple):
    """Where one image goes: source size, size after the cover resize, crop corner, bucket size."""

    height: int
    width: int
    resized_h: int
    resized_w: int
    top: int
    left: int
    bucket_h: int
    bucket_w: int

    def source_window(self) -> tuple[float, float, float, float]:
        """The crop window in source pixels: ``(top, left, bottom, right)`` as floats."""
        y_scale, x_scale = self.height / self.resized_h, self.width / self.resized_w
        return (
            self.top * y_scale,
            self.left * x_scale,
            (self.top + self.bucket_h) * y_scale,
            (self.left + self.bucket_w) * x_scale,
        )


def cover_crop(
    height: int, width: int, bucket_h: int, bucket_w: int, u_y: float, u_x: float, *, center: bool
) -> tuple[int, int, int, int]:
    """Resize ``(height, width)`` to cover the bucket (aspect kept, one side exact), then place the crop.

    Returns ``(resized_h, resized_w, top, left)``; ``u_y``, ``u_x`` in [0, 1) pick a random crop.
    """
    scale = max(bucket_h / height, bucket_w / width)
    resized_h = max(bucket_h, round(height * scale))
    resized_w = max(bucket_w, round(width * scale))
    if center:
        return resized_h, resized_w, (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    top = min(int(u_y * (resized_h - bucket_h + 1)), resized_h - bucket_h)
    left = min(int(u_x * (resized_w - bucket_w + 1)), resized_w - bucket_w)
    return resized_h, resized_w, top, left
