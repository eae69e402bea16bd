"""Captions from anywhere (issue 23): the index-time caption pass (``index.captions.apply_captions``) over a manifest of
N rows, from file names and from a ``metadata.jsonl`` of N lines, side by side: rows per second and the peak RSS of a
fresh process doing only the pass (what it adds to ``dali-arb index``), and bytes per row."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from . import case

_CHILD = """
import resource, sys, time
from dali_arb.index.captions import CaptionSource, apply_captions
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
source = CaptionSource(filename=True) if sys.argv[2] == "filename" else CaptionSource(file=sys.argv[3])
start = time.perf_counter()
apply_captions(sys.argv[1], source)
seconds = time.perf_counter() - start
print(seconds, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _manifest(folder: Path, n: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [f"{i // 1000:04d}/img_{i:08d}" for i in range(n)]
    table = pa.table({"key": keys, "width": pa.array([512] * n, pa.int32()), "height": pa.array([512] * n, pa.int32()),
                      "caption": pa.array([None] * n, pa.string()), "source": [str(folder / f"{k}.jpg") for k in keys],
                      "offset": pa.array([0] * n, pa.int64()), "length": pa.array([1000] * n, pa.int64())})  # fmt: skip
    manifest = folder / "m.parquet"
    pq.write_table(table.replace_schema_metadata({"dali_arb.format": "1"}), manifest, row_group_size=65536)
    jsonl = folder / "metadata.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for i, key in enumerate(keys):
            fh.write(
                json.dumps({"file_name": f"{key}.jpg", "text": f"a photo of a thing, tag {i % 97}, tag {i % 89}"})
                + "\n"
            )
    return manifest, jsonl


@case("captions")
def captions(args) -> dict:
    n = 100_000 if args.quick else 1_000_000
    out: dict = {"rows": n}
    with tempfile.TemporaryDirectory() as tmp:
        manifest, jsonl = _manifest(Path(tmp), n)
        for kind in ("filename", "jsonl"):
            run = subprocess.run([sys.executable, "-c", _CHILD, str(manifest), kind, str(jsonl)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            seconds, base, peak = (float(v) for v in run.stdout.split())
            out[kind] = {"rows_per_s": round(n / seconds), "seconds": round(seconds, 2),
                         "peak_rss_mib": round(peak / 1024), "added_rss_mib": round((peak - base) / 1024),
                         "bytes_per_row": round((peak - base) * 1024 / n)}  # fmt: skip
            print(f"{kind:<9} {out[kind]['rows_per_s']:>10,} rows/s  peak RSS {out[kind]['peak_rss_mib']} MiB "
                  f"(+{out[kind]['added_rss_mib']} MiB over the import, {out[kind]['bytes_per_row']} B/row)")  # fmt: skip
    out["jsonl_vs_filename_time"] = round(out["filename"]["rows_per_s"] / out["jsonl"]["rows_per_s"], 2)
    print(f"jsonl takes {out['jsonl_vs_filename_time']}x the time of file names")
    return out
