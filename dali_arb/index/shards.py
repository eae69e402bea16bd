"""Webdataset tar shards: every sample's image member (its byte offset and length), caption, and header."""

from __future__ import annotations

import json
import os
import tarfile

from ..imagefacts import inspect_image
from .folders import NOT_IMAGES
from .records import Reject, Row

__all__ = ["member_key", "shard_task"]


def member_key(name: str) -> tuple[str, str]:
    """webdataset convention: key is the path up to the first dot of the base name."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ("." + ext.lower() if dot else "")


def shard_task(args: tuple) -> tuple[list[Row], list[Reject]]:
    """Inspect every sample of one tar shard: ``(shard path, max_pixels)``."""
    shard, max_pixels = args
    rows: list[Row] = []
    rejects: list[dict] = []
    samples: dict[str, dict] = {}
    try:
        with open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = member_key(member.name)
                if key.startswith(".") or os.path.basename(key).startswith("._"):
                    continue
                sample = samples.setdefault(key, {})
                if ext in (".txt", ".caption", ".json"):
                    data = tar.extractfile(member).read()
                    sample[ext] = data.decode("utf-8", errors="replace")
                elif ext in NOT_IMAGES:
                    continue
                elif "image" in sample:
                    rejects.append(
                        {
                            "source": f"{shard}:{member.name}",
                            "reason": f"duplicate key {key!r} (kept {sample['image'][0]})",
                            "key": key,
                        }
                    )
                else:
                    raw.seek(member.offset_data)
                    data = raw.read(member.size)
                    sample["image"] = (member.name, member.offset_data, member.size, data)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [], [{"source": shard, "reason": f"unreadable tar shard ({exc})"}]
    mtime = os.stat(shard).st_mtime_ns
    for key, sample in samples.items():
        if "image" not in sample:
            continue
        name, offset, length, data = sample.pop("image")
        result = inspect_image(data, max_pixels=max_pixels)
        if isinstance(result, str):
            rejects.append({"source": f"{shard}:{name}", "reason": result, "key": key})
            continue
        caption = sample.get(".txt", sample.get(".caption"))
        if caption is None and ".json" in sample:
            try:
                meta = json.loads(sample[".json"])
                caption = meta.get("caption") if isinstance(meta, dict) else None
            except ValueError:
                caption = None
        rows.append(
            Row(key, result[0], result[1], caption.strip() if caption else caption, shard, offset, length, mtime)
        )
    return rows, rejects
