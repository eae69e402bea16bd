"""Captions from anywhere at index time (issue 23): kohya's caption_extension, the file name (SimpleTuner), a JSONL
file (Hugging Face's metadata.jsonl), a Parquet or CSV column; they land in the manifest's caption column."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb.errors import ConfigError, IndexingError
from dali_arb.index import CaptionSource, build_index
from dali_arb.index.captions import caption_from_filename

from .images import save_jpeg


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(("a_red_car", "blue_sky", "old_house")):
        save_jpeg(folder / f"{name}.jpg", 64, 48, seed=i)
    (folder / "a_red_car.txt").write_text("from the txt")
    (folder / "a_red_car.tags").write_text("car, red\nsecond line")
    (folder / "blue_sky.caption").write_text("from the caption file")
    return folder


def captions_of(manifest) -> dict[str, str | None]:
    table = pq.read_table(manifest)
    return dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))


def test_the_default_sidecars_stay_as_they_were(photos, tmp_path):
    build_index([str(photos)], tmp_path / "m.parquet", progress=False)
    assert captions_of(tmp_path / "m.parquet") == {"a_red_car": "from the txt", "blue_sky": "from the caption file",
                                                   "old_house": None}  # fmt: skip


def test_caption_extension_reads_only_that_extension_any_name(photos, tmp_path):
    build_index([str(photos)], tmp_path / "m.parquet", progress=False, captions=CaptionSource(extension=".tags"))
    assert captions_of(tmp_path / "m.parquet") == {"a_red_car": "car, red\nsecond line", "blue_sky": None,
                                                   "old_house": None}  # fmt: skip
    build_index([str(photos)], tmp_path / "k.parquet", progress=False,
                captions=CaptionSource(extension="caption", first_line=True))  # fmt: skip
    assert captions_of(tmp_path / "k.parquet")["blue_sky"] == "from the caption file"
    build_index([str(photos)], tmp_path / "f.parquet", progress=False,
                captions=CaptionSource(extension=".tags", first_line=True))  # fmt: skip
    assert captions_of(tmp_path / "f.parquet")["a_red_car"] == "car, red"


def test_captions_from_the_file_name_as_simpletuner_makes_them(photos, tmp_path):
    build_index([str(photos)], tmp_path / "m.parquet", progress=False, captions=CaptionSource(filename=True))
    assert captions_of(tmp_path / "m.parquet") == {"a_red_car": "a red car", "blue_sky": "blue sky",
                                                   "old_house": "old house"}  # fmt: skip
    assert caption_from_filename("/x/y/a_b.c_d.png") == "a b.c d"  # Path.stem, as SimpleTuner


def test_captions_from_a_metadata_jsonl_matched_by_file_name(photos, tmp_path):
    lines = [{"file_name": "a_red_car.jpg", "text": "jsonl car"}, {"file_name": "old_house.jpg", "text": "jsonl house"}]
    (photos / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    build_index([str(photos)], tmp_path / "m.parquet", progress=False,
                captions=CaptionSource(file=photos / "metadata.jsonl"))  # fmt: skip
    assert captions_of(tmp_path / "m.parquet") == {
        "a_red_car": "jsonl car",
        "blue_sky": None,
        "old_house": "jsonl house",
    }


def test_captions_from_a_parquet_or_csv_column_by_key(photos, tmp_path):
    pq.write_table(pa.table({"key": ["blue_sky"], "prompt": ["p"], "long": ["the long one"]}), tmp_path / "c.parquet")
    build_index([str(photos)], tmp_path / "m.parquet", progress=False,
                captions=CaptionSource(file=tmp_path / "c.parquet", column="long"))  # fmt: skip
    assert captions_of(tmp_path / "m.parquet")["blue_sky"] == "the long one"
    (tmp_path / "c.csv").write_text("file_name,caption\nold_house.jpg,from csv\n")
    build_index([str(photos)], tmp_path / "n.parquet", progress=False, captions=CaptionSource(file=tmp_path / "c.csv"))
    assert captions_of(tmp_path / "n.parquet")["old_house"] == "from csv"


def test_bad_caption_sources_are_one_line(photos, tmp_path):
    with pytest.raises(ConfigError, match="one source of captions"):
        CaptionSource(extension=".txt", filename=True)
    with pytest.raises(ConfigError, match="from --captions FILE or from the Parquet/CSV metadata"):
        build_index([str(photos)], tmp_path / "m.parquet", progress=False, captions=CaptionSource(column="text"))
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a.jpg", "text": "x"}\nnot json\n')
    with pytest.raises(IndexingError, match="line 2 is not JSON"):
        build_index(
            [str(photos)], tmp_path / "m.parquet", progress=False, captions=CaptionSource(file=tmp_path / "bad.jsonl")
        )
    (tmp_path / "c.csv").write_text("file_name,words\na.jpg,x\n")
    with pytest.raises(IndexingError, match="--caption-column"):
        build_index(
            [str(photos)], tmp_path / "m.parquet", progress=False, captions=CaptionSource(file=tmp_path / "c.csv")
        )


def test_cli_caption_flags(photos, tmp_path):
    out = tmp_path / "m.parquet"
    run = subprocess.run([sys.executable, "-m", "dali_arb", "index", str(photos), "-o", str(out), "-q",
                          "--captions-from-filename"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert captions_of(out)["old_house"] == "old house"
    run = subprocess.run([sys.executable, "-m", "dali_arb", "index", str(photos), "-o", str(out), "-q",
                          "--caption-column", "x"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr and "--captions FILE" in run.stderr


def test_members_of_a_tar_shard_never_take_the_shards_own_sidecar_and_are_named_by_key(tmp_path):
    import io
    import tarfile

    from .images import jpeg_bytes

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("a_red_car", "blue_sky"):
            data = jpeg_bytes(64, 48)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shard.tags").write_text("the shard's own file, no member's caption")
    build_index([str(shard)], tmp_path / "m.parquet", progress=False, captions=CaptionSource(extension=".tags"))
    assert captions_of(tmp_path / "m.parquet") == {"a_red_car": None, "blue_sky": None}
    build_index([str(shard)], tmp_path / "n.parquet", progress=False, captions=CaptionSource(filename=True))
    assert captions_of(tmp_path / "n.parquet") == {"a_red_car": "a red car", "blue_sky": "blue sky"}


def test_caption_column_of_the_metadata_being_indexed(tmp_path):
    """img2dataset's Parquet has its text in a column of its own choosing: --caption-column NAME reads it."""
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"key": ["000", "001"], "width": [64, 48], "height": [48, 64], "caption": ["short", None],
                             "TEXT": ["the long text", "another"], "status": ["success", "success"]}), meta)  # fmt: skip
    build_index([str(meta)], tmp_path / "m.parquet", progress=False)
    assert captions_of(tmp_path / "m.parquet") == {"000": "short", "001": None}
    build_index([str(meta)], tmp_path / "n.parquet", progress=False, captions=CaptionSource(column="TEXT"))
    assert captions_of(tmp_path / "n.parquet") == {"000": "the long text", "001": "another"}
