"""Pictures for people: the bucket histogram (matplotlib; for clips one panel per frame bucket) and the contact sheet
of batches (Pillow)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from .report import policy_words

__all__ = ["bucket_bars", "clip_bars", "contact_sheet", "plot_buckets", "plot_clip_buckets"]


#: A bar segment that holds images is drawn at least this share of the tallest bar, so that 1 image beside
#: 2,000 still shows (its number is written above the bar).
MIN_VISIBLE = 0.015

#: The stacked segments of a bucket's bar, bottom to top: (key, colour, hatch, legend).
SEGMENTS = (
    ("full", "#3b75af", None, "in full batches at their own bucket"),
    ("leftovers", "#ef8636", None, "leftovers served (policy: {leftover})"),
    ("dropped", "#b0b0b0", "//", "dropped this epoch"),
    ("trimmed", "#ffffff", "xx", "trimmed this epoch"),
    ("duplicated", "#6aa84f", None, "served a second time (padding)"),
)


def bucket_bars(report: dict[str, Any]) -> dict[str, np.ndarray]:
    """What :func:`plot_buckets` draws, per bucket of ``report["buckets"]`` (portrait to landscape), each
    ``int64 (K,)``: ``full``, ``leftovers`` (served), ``dropped``, ``trimmed`` and ``duplicated`` images, their
    drawn heights ``height_<name>`` (``float64``: a non-zero segment at least :data:`MIN_VISIBLE` of the tallest
    bar), ``top`` (``float64``, where the label goes), ``images`` and ``served`` (samples served AT the bucket, as
    served, pooled leftovers included); ``labels`` is a list of ``WxH``."""
    buckets = report["buckets"]
    take = lambda key: np.array([int(b.get(key, 0)) for b in buckets], np.int64)
    dropped, leftovers = take("dropped"), take("leftovers")
    values = {
        "full": take("in_full_batches"),
        "leftovers": np.maximum(leftovers - dropped, 0),
        "dropped": dropped,
        "trimmed": take("trimmed"),
        "duplicated": take("duplicated"),
    }
    total = sum(values.values())
    floor = MIN_VISIBLE * float(max(total.max(initial=0), take("served").max(initial=0), 1))
    bars: dict[str, Any] = {"labels": [b["resolution"] for b in buckets], **values}
    top = np.zeros(len(buckets))
    for name, value in values.items():
        bars[f"height_{name}"] = np.where(value > 0, np.maximum(value, floor), 0.0)
        top = top + bars[f"height_{name}"]
    bars.update(top=top, images=take("images"), served=take("served"))
    return bars


def plot_buckets(report: dict[str, Any], path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Images per bucket, portrait to landscape, stacked: in full batches, leftovers served, dropped, trimmed and
    duplicated (:func:`bucket_bars`; small segments drawn tall enough to see), with a mark for the samples served
    AT each bucket (leftovers pooled in included) and the totals in the title. Writes a PNG; returns the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bars = bucket_bars(report)
    totals, options = report["totals"], report["options"]
    labels = bars["labels"]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(labels) + 3), 5.2), dpi=120)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for name, colour, hatch, legend in SEGMENTS:
        heights = bars[f"height_{name}"]
        if heights.any() or name in ("full", "leftovers"):
            ax.bar(x, heights, bottom=bottom, color=colour, hatch=hatch, edgecolor="#c0392b" if name == "trimmed"
                   else None, linewidth=0.6, label=legend.format(leftover=policy_words(options)))  # fmt: skip
        bottom = bottom + heights
    serving = bars["served"] > 0
    ax.scatter(x[serving], bars["served"][serving], marker="_", s=160, color="black", zorder=3,
               label=f"served at this bucket in epoch {totals.get('epoch', 0)} (leftovers included)")  # fmt: skip
    for xi, top, n, t in zip(x, bars["top"], bars["images"].tolist(), bars["trimmed"].tolist()):
        ax.text(xi, top, f"{n}" + (f"\n-{t}" if t else ""), ha="center", va="bottom", fontsize=7,
                color="#c0392b" if t else "black")  # fmt: skip
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("bucket (width x height), portrait → landscape")
    ax.set_ylabel("images")
    ax.set_title(_title(report), fontsize=9)
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.margins(y=0.15)
    fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return bars


def _title(report: dict[str, Any]) -> str:
    totals, options = report["totals"], report["options"]
    batch = options.get("batch") or {"batch_size": options["batch_size"]}
    if batch.get("batch_size") is not None:
        size = f"batch {batch['batch_size']}"
    else:
        size = f"{totals.get('images_per_step_min', '?')}-{totals.get('images_per_step_max', '?')} images/step"
    rejected = ", ".join(f"{reason} {n}" for reason, n in totals.get("rejected", {}).items()) or "none"
    served = totals.get("served_crop_loss")
    crops = (
        "" if served is None else f" · crop loss {100 * totals['mean_crop_loss']:.1f}% own, {100 * served:.1f}% served"
    )
    return (
        f"{totals['usable']} images in {totals['buckets_used']} buckets · {size} x {options['world_size']} ranks · "
        f"{totals['steps_per_epoch']} steps/epoch\n"
        f"epoch {totals.get('epoch', 0)}: trimmed {totals['trimmed_per_epoch']}, dropped {totals['dropped_per_epoch']}, "
        f"duplicated {totals['duplicated_per_epoch']} · rejected: {rejected}{crops}"
    )


def clip_bars(report: dict[str, Any]) -> dict[str, Any]:
    """What :func:`plot_clip_buckets` draws from a ``buckets --frames`` report (its ``buckets`` rows: ``frames``,
    ``width``, ``height``, ``clips``, ``leftover``): ``frames`` the frame buckets with clips (ascending), ``labels``
    the spatial buckets (``WxH``, portrait to landscape), and ``int64 (J, K)`` arrays ``full`` (clips in full batches
    at their own bucket) and ``leftover`` (clips left over), per frame bucket ``j`` and spatial bucket ``k``."""
    rows = report["buckets"]
    frames = sorted({int(r["frames"]) for r in rows})
    sizes = sorted({(int(r["width"]), int(r["height"])) for r in rows}, key=lambda s: (s[0] / s[1], s[0]))
    full = np.zeros((len(frames), len(sizes)), np.int64)
    leftover = np.zeros_like(full)
    for r in rows:
        j, k = frames.index(int(r["frames"])), sizes.index((int(r["width"]), int(r["height"])))
        leftover[j, k] += int(r["leftover"])
        full[j, k] += int(r["clips"]) - int(r["leftover"])
    return {"frames": frames, "labels": [f"{w}x{h}" for w, h in sizes], "full": full, "leftover": leftover}


def plot_clip_buckets(report: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Clips per (frames, width, height) bucket: one panel per frame bucket (the same spatial buckets on every
    panel's x axis, portrait to landscape), stacked bars of clips in full batches and clips left over, the count
    above each bar; the totals of the epoch in the title. Writes a PNG; returns :func:`clip_bars`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bars = clip_bars(report)
    labels, frames = bars["labels"], bars["frames"]
    panels = max(1, len(frames))
    fig, axes = plt.subplots(panels, 1, sharex=True, squeeze=False, dpi=120,
                             figsize=(max(7.0, 0.5 * len(labels) + 3), 1.0 + 1.9 * panels))  # fmt: skip
    x = np.arange(len(labels))
    leftover_words = f"left over (policy: {report.get('leftover', '?')})"
    for j, ax in enumerate(axes[:, 0]):
        full, rest = bars["full"][j] if frames else x * 0, bars["leftover"][j] if frames else x * 0
        ax.bar(x, full, color=SEGMENTS[0][1], label="in full batches at their own bucket" if j == 0 else None)
        ax.bar(x, rest, bottom=full, color=SEGMENTS[1][1], label=leftover_words if j == 0 else None)
        for xi, n in zip(x, (full + rest).tolist()):
            if n:
                ax.text(xi, n, str(n), ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(f"{frames[j]} frame{'s' if frames[j] != 1 else ''}" if frames else "clips", fontsize=8)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(0, max(1.0, float((full + rest).max(initial=0)) * 1.3))  # room for the counts
    bottom = axes[-1, 0]
    bottom.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    bottom.set_xlabel("bucket (width x height), portrait → landscape; one panel per frame bucket (clips)")
    axes[0, 0].set_title(_clip_title(report), fontsize=9)
    fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return bars


def _clip_title(report: dict[str, Any]) -> str:
    spec = report.get("frames", {})
    return (
        f"{report.get('rows', '?')} rows ({report.get('videos', '?')} videos) -> {report.get('clips', '?')} clips · "
        f"fps {spec.get('fps') or 'own'}, clip {spec.get('clip', '?')} · {report.get('steps_per_epoch', '?')} "
        f"steps/epoch\nepoch {report.get('epoch', 0)}: trimmed {report.get('trimmed', 0)}, dropped "
        f"{report.get('dropped', 0)}, duplicated {report.get('duplicated', 0)}"
    )


def printable(text: str) -> str:
    """``text`` on one line: control characters (a newline in a key) shown escaped, as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def tile_labels(batch: dict[str, Any], i: int) -> list[str]:
    """What a contact sheet writes under sample ``i`` of ``batch``: its key (and whether it was flipped), its
    original size (``WxH``, EXIF-upright) and its caption as the loader drew it."""
    key = str(batch["ids"][i]) + (" (flipped)" if "flipped" in batch and bool(batch["flipped"][i]) else "")
    lines = [key]
    if "original_size" in batch:
        oh, ow = (int(v) for v in batch["original_size"][i])
        lines.append(f"{ow}x{oh} original")
    if batch.get("captions"):
        lines.append(str(batch["captions"][i]) or "(no caption)")
    return lines


def contact_sheet(batches: Iterable[dict[str, Any]], path: str | os.PathLike, *, row_height: int = 160) -> int:
    """One row per batch: the images exactly as the loader made them (uint8 ``[B, 3, H, W]``), scaled to
    ``row_height``, labelled with step and bucket, and under each image its key, original size and caption
    (:func:`tile_labels`; a narrow bucket's column is widened so that the labels fit). Returns the rows drawn."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=14)
    gap, line_h, head_w, min_column = 8, 14, 150, 120
    rows = []
    for batch in batches:
        images = batch["images"]
        if images.dtype.is_floating_point:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
        arr = images.to("cpu").to(dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
        height, width = batch["target_size"]
        scaled_w = max(1, round(width * row_height / height))
        tiles = [(Image.fromarray(arr[i]).resize((scaled_w, row_height), Image.BILINEAR), tile_labels(batch, i))
                 for i in range(len(batch["ids"]))]  # fmt: skip
        rows.append((f"step {batch['step']}", f"{width}x{height}", tiles))
    if not rows:
        raise ValueError("no batches to draw")
    label_h = line_h * max(len(labels) for _, _, tiles in rows for _, labels in tiles)
    sheet_w = max(head_w + sum(max(t.width, min_column) + gap for t, _ in tiles) for _, _, tiles in rows) + gap
    sheet_h = len(rows) * (row_height + label_h + gap) + gap
    sheet = Image.new("RGB", (sheet_w, sheet_h), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    y = gap
    for step_label, size_label, tiles in rows:
        draw.text((gap, y + row_height // 2 - 16), step_label, fill=(40, 40, 40), font=title_font)
        draw.text((gap, y + row_height // 2 + 2), size_label, fill=(59, 117, 175), font=title_font)
        x = head_w
        for tile, labels in tiles:
            column = max(tile.width, min_column)
            left = x + (column - tile.width) // 2
            sheet.paste(tile, (left, y))
            draw.rectangle([left, y, left + tile.width - 1, y + row_height - 1], outline=(200, 200, 200))
            for n, label in enumerate(labels):
                text = printable(label)
                while draw.textlength(text, font=font) > column and len(text) > 2:
                    text = text.removesuffix("…")[:-1] + "…"
                draw.text((x, y + row_height + 1 + n * line_h), text, fill=(60, 60, 60), font=font)
            x += column + gap
        y += row_height + label_h + gap
    sheet.save(path)
    return len(rows)
