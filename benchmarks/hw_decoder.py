"""Is the hardware JPEG decoder (A100/H100 NVJPG engines) usable here? DALI silences nvImageCodec's
message when it is missing and silently decodes on CUDA cores instead, so ask nvImageCodec directly:
decode one baseline JPEG with a decoder restricted to ``Backend(HW_GPU_ONLY)``.

    python benchmarks/hw_decoder.py [JPEG]     # prints one JSON line
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys


def check(data: bytes) -> dict:
    report = {
        "NVIDIA_DRIVER_CAPABILITIES": os.environ.get("NVIDIA_DRIVER_CAPABILITIES"),
        "dev_shm_free_mib": round(shutil.disk_usage("/dev/shm").free / 2**20) if os.path.isdir("/dev/shm") else None,
    }
    try:
        from nvidia import nvimgcodec
    except Exception as exc:  # not installed
        return {**report, "hw_decoder": None, "why": f"nvImageCodec not importable: {exc}"}
    try:
        backend = nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)
        decoded = nvimgcodec.Decoder(backends=[backend]).decode(data)
        report["hw_decoder"] = decoded is not None
        if decoded is not None:
            report["hw_decoded_shape"] = list(decoded.shape)
        else:
            report["why"] = "the HW_GPU_ONLY decoder returned nothing (no NVJPG engine, or no 'video' capability)"
    except Exception as exc:
        report["hw_decoder"] = False
        report["why"] = f"{type(exc).__name__}: {exc}"[:300]
    return report


def baseline_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (120, 30, 200)).save(buf, "JPEG", quality=90)  # baseline, 4:2:0
    return buf.getvalue()


if __name__ == "__main__":
    data = open(sys.argv[1], "rb").read() if len(sys.argv) > 1 else baseline_jpeg()
    print(json.dumps(check(data)))
