"""Pictures for people: the bucket histogram (matplotlib) and the contact sheet of batches (Pillow)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["contact_sheet", "plot_buckets"]


def plot_buckets(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Images per bucket, portrait to landscape, split into served-in-full-batches and leftovers,
    with the totals (trimmed, dropped, duplicated, rejected) in the title. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    buckets = report["buckets"]
    totals, options = report["totals"], report["options"]
    labels = [b["resolution"] for b in buckets]
    unit = options["batch_size"] * (options["world_size"] if options["sync_ranks"] else 1)
    full = np.array([b["full_batches"] * unit for b in buckets])
    left = np.array([b["leftovers"] for b in buckets])
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(labels) + 3), 4.8), dpi=120)
    x = np.arange(len(labels))
    ax.bar(x, full, color="#3b75af", label="in full batches at their own bucket")
    ax.bar(x, left, bottom=full, color="#ef8636", label=f"leftovers (policy: {options['leftover']})")
    for xi, b in zip(x, buckets):
        ax.text(xi, b["images"], f"{b['images']}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("bucket (width x height), portrait → landscape")
    ax.set_ylabel("images")
    ax.set_title(
        f"{totals['usable']} images in {len(buckets)} buckets · batch {options['batch_size']} x {options['world_size']} ranks · "
        f"{totals['steps_per_epoch']} steps/epoch\n"
        f"per epoch: trimmed {totals['trimmed_per_epoch']}, dropped {totals['dropped_per_epoch']}, "
        f"duplicated {totals['duplicated_per_epoch']} · rejected (aspect) {totals['rejected_aspect']}"
        + (f", too small {totals['rejected_too_small']}" if options["no_upscale"] else ""),
        fontsize=9,
    )
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.margins(y=0.12)
    fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def printable(text: str) -> str:
    """``text`` on one line: control characters (a newline in a key) shown escaped, as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def contact_sheet(batches: Iterable[dict[str, Any]], path: str | os.PathLike, *, row_height: int = 160) -> int:
    """One row per batch: the images exactly as the loader made them (uint8 ``[B, 3, H, W]``),
    scaled to ``row_height``, labelled with step, bucket and each key. Returns the rows drawn."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=14)
    gap, label_h, head_w = 8, 16, 150
    rows = []
    for batch in batches:
        images = batch["images"]
        if images.dtype.is_floating_point:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
        arr = images.to("cpu").to(dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
        height, width = batch["target_size"]
        scaled_w = max(1, round(width * row_height / height))
        tiles = []
        for i, key in enumerate(batch["ids"]):
            tile = Image.fromarray(arr[i]).resize((scaled_w, row_height), Image.BILINEAR)
            label = str(key) + (" (flipped)" if "flipped" in batch and bool(batch["flipped"][i]) else "")
            tiles.append((tile, label))
        rows.append((f"step {batch['step']}", f"{width}x{height}", tiles))
    if not rows:
        raise ValueError("no batches to draw")
    sheet_w = max(head_w + sum(t.width + gap for t, _ in tiles) for _, _, tiles in rows) + gap
    sheet_h = len(rows) * (row_height + label_h + gap) + gap
    sheet = Image.new("RGB", (sheet_w, sheet_h), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    y = gap
    for step_label, size_label, tiles in rows:
        draw.text((gap, y + row_height // 2 - 16), step_label, fill=(40, 40, 40), font=title_font)
        draw.text((gap, y + row_height // 2 + 2), size_label, fill=(59, 117, 175), font=title_font)
        x = head_w
        for tile, label in tiles:
            sheet.paste(tile, (x, y))
            draw.rectangle([x, y, x + tile.width - 1, y + row_height - 1], outline=(200, 200, 200))
            text = printable(label)
            while draw.textlength(text, font=font) > tile.width and len(text) > 2:
                text = text.removesuffix("…")[:-1] + "…"
            draw.text((x, y + row_height + 1), text, fill=(60, 60, 60), font=font)
            x += tile.width + gap
        y += row_height + label_h + gap
    sheet.save(path)
    return len(rows)
