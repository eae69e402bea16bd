"""Run benchmark cases: ``python -m benchmarks [CASE ...] [--json FILE] [--quick]``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from . import (  # noqa: F401  (register cases)
    CASES,
    bench_budget,
    bench_captions,
    bench_clips,
    bench_dataplane,
    bench_gpu,
    bench_index,
    bench_loader,
    bench_planner,
    bench_ray,
    bench_scale,
    bench_scaling,
    bench_storage,
    bench_video,
    bench_workers,
)


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="dali_arb benchmarks, side by side")
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    parser.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, not for RESULTS.md)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="loader device (default cpu)")
    parser.add_argument(
        "--images", type=int, default=None, help="JPEGs the loader case makes (default 256, --quick 64)"
    )
    parser.add_argument("--min-mp", type=float, default=0.8, help="smallest JPEG the loader cases make, MP (0.8)")
    parser.add_argument("--max-mp", type=float, default=3.0, help="largest JPEG the loader cases make, MP (3.0)")
    parser.add_argument(
        "--photos", metavar="DIR", default=None,
        help="make the loader cases' JPEGs once under DIR and reuse them (default: a temporary folder per case)",
    )  # fmt: skip
    parser.add_argument(
        "--rows", default=None, help="row counts of the scale case, comma-separated (default 10000000,100000000)"
    )
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cases": {}}
    for name in args.cases or list(CASES):
        print(f"== {name}", flush=True)
        figures = CASES[name](args)
        results["cases"][name] = figures
        for key, value in figures.items():
            print(f"  {key:<42} {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
