"""JPEG DCT scaling in the CPU workers: full-resolution quality by default, the fastest peers' speed on request."""

from __future__ import annotations

import pytest

from dali_arb import BucketSpec, ConfigError, DALIBucketIterator
from dali_arb.index import build_index
from dali_arb.loader.decoders import QUALITY_MARGIN, OpenCVDecoder, PillowDecoder, choose_decoder, jpeg_reduction
from dali_arb.tools.photos import make_photo_jpegs, psnr, reference_image

#: buckets of about a quarter megapixel: the 0.9-1.3 MP photos shrink by 1.9-2.3x, where the fast scaling
#: decodes at 1/2 scale and the DCT's own low-pass is the whole antialiasing
SPEC = BucketSpec(max_area=512 * 512, min_dim=256, max_dim=1024, step=64, base=(512, 512))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos") / "jpegs"
    make_photo_jpegs(folder, 8, min_mp=0.9, max_mp=1.3, seed=11)
    manifest = folder.parent / "m.parquet"
    build_index([str(folder)], manifest, progress=False)
    return manifest


def scores(manifest, decoder: str, jpeg_scaling: str | None) -> list[float]:
    """PSNR of every served image against a full-resolution decode resized by Pillow (antialiased bilinear)."""
    loader = DALIBucketIterator(str(manifest), batch_size=1, buckets=SPEC, device="cpu", workers=0, dtype="uint8",
                                crop="center", flip=0.0, rank=0, world_size=1, decoder=decoder,
                                jpeg_scaling=jpeg_scaling)  # fmt: skip
    table = loader.manifest.table
    sources = dict(zip(table.column("key").to_pylist(), table.column("source").to_pylist()))
    out = []
    for batch in loader:
        bh, bw = batch["target_size"]
        for i, key in enumerate(batch["ids"]):
            out.append(psnr(batch["images"][i].permute(1, 2, 0).numpy(), reference_image(sources[key], bh, bw)))
    return out


@pytest.mark.parametrize("decoder", ["opencv", "pillow"])
def test_default_scaling_keeps_full_resolution_quality_where_fast_scaling_does_not(photos, decoder):
    """The CPU default decoded at the largest DCT reduction covering the bucket: on detailed photos that
    came out 29-31 dB from a full-resolution antialiased resize (the quality goal is 35)."""
    quality = scores(photos, decoder, None)
    fast = scores(photos, decoder, "fast")
    assert len(quality) == len(fast) == 8
    assert min(quality) >= 35, sorted(quality)
    assert min(fast) < 34, sorted(fast)  # the photos do exercise the reduced decode


def test_reduction_keeps_the_margin():
    assert jpeg_reduction(2000, 3000, 500, 750) == 4
    assert jpeg_reduction(2000, 3000, 500, 750, margin=QUALITY_MARGIN) == 1
    assert jpeg_reduction(6000, 9000, 500, 750, margin=QUALITY_MARGIN) == 4  # 1500x2250 keeps 3x
    assert jpeg_reduction(1000, 1000, 600, 300) == 1


def test_scaling_is_validated_and_belongs_to_the_worker_decoders():
    assert choose_decoder("auto", "cpu") == OpenCVDecoder(jpeg_scaling="quality")
    assert choose_decoder("pillow", "cpu", jpeg_scaling="fast") == PillowDecoder(jpeg_scaling="fast")
    assert choose_decoder("auto", "gpu", jpeg_scaling="fast").name == "dali"  # DALI decodes at full resolution
    with pytest.raises(ConfigError, match=r"jpeg_scaling must be 'quality' or 'fast', got 'fastest'"):
        choose_decoder("opencv", "cpu", jpeg_scaling="fastest")
    with pytest.raises(ConfigError, match=r"decoder 'dali' always decodes at full resolution.*'fast'"):
        choose_decoder("dali", "cpu", jpeg_scaling="fast")
    with pytest.raises(ConfigError, match="give it to the Decoder instance"):
        choose_decoder(OpenCVDecoder(), "cpu", jpeg_scaling="fast")
