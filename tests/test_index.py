import io
import json
import os
import tarfile
import time

import pytest
from PIL import Image

from dali_arb import IndexingError, Manifest
from dali_arb.cli import main
from dali_arb.index import build_index

from .images import animated_gif, jpeg_bytes, photo_like, png_claiming, save_jpeg


def rejects_of(manifest) -> dict[str, str]:
    lines = (manifest.parent / (manifest.name + ".rejects.jsonl")).read_text(encoding="utf-8").splitlines()
    return {os.path.basename(r["source"]): r["reason"] for r in map(json.loads, lines)}


def rows_of(manifest) -> dict[str, dict]:
    return {r["key"]: r for r in Manifest.read(manifest).table.to_pylist()}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    save_jpeg(root / "baseline.jpg", 120, 80)
    (root / "baseline.txt").write_text("a red fox über the snow, 狐狸\n", encoding="utf-8")
    save_jpeg(root / "progressive.jpg", 90, 160, progressive=True)
    (root / "progressive.caption").write_text("progressive caption", encoding="utf-8")
    photo_like(70, 50).save(root / "sub" / "rgb.png")
    photo_like(50, 70).convert("RGBA").save(root / "sub" / "rgba.png")
    photo_like(64, 40).convert("L").save(root / "sub" / "gray.png")
    photo_like(100, 60).save(root / "sub" / "deeper" / "pic.webp", "WEBP")
    for o in (3, 6, 8):
        save_jpeg(root / f"orient{o}.jpg", 200, 100, orientation=o)
    # bad files
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    (root / "mystery.bin").write_text("not an image either")
    whole = (root / "baseline.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    png = io.BytesIO()
    photo_like(60, 60).save(png, "PNG")
    (root / "cutpng.png").write_bytes(png.getvalue()[:-20])
    animated_gif(root / "anim.gif")
    png_claiming(root / "bomb.png", 60000, 60000)
    save_jpeg(root / "sub" / "rgb.jpg", 30, 30)  # same key as sub/rgb.png
    # not samples and not rejects
    (root / "meta.json").write_text("{}")
    (root / "orphan.txt").write_text("caption without an image")
    (root / ".hidden.jpg").write_bytes(b"")
    return root


def test_folder_rows_sizes_captions_and_keys(folder, tmp_path):
    out = tmp_path / "m.parquet"
    summary = build_index([str(folder)], out, workers=2, progress=False)
    rows = rows_of(out)
    assert set(rows) == {
        "baseline", "progressive", "sub/rgb", "sub/rgba", "sub/gray", "sub/deeper/pic",
        "orient3", "orient6", "orient8",
    }  # fmt: skip
    assert (rows["baseline"]["width"], rows["baseline"]["height"]) == (120, 80)
    assert (rows["progressive"]["width"], rows["progressive"]["height"]) == (90, 160)
    assert (rows["sub/gray"]["width"], rows["sub/gray"]["height"]) == (64, 40)
    assert (rows["sub/deeper/pic"]["width"], rows["sub/deeper/pic"]["height"]) == (100, 60)
    # EXIF: 3 is upside down (same size), 6 and 8 are rotated: displayed portrait
    assert (rows["orient3"]["width"], rows["orient3"]["height"]) == (200, 100)
    assert (rows["orient6"]["width"], rows["orient6"]["height"]) == (100, 200)
    assert (rows["orient8"]["width"], rows["orient8"]["height"]) == (100, 200)
    assert rows["baseline"]["caption"] == "a red fox über the snow, 狐狸"
    assert rows["progressive"]["caption"] == "progressive caption"
    assert rows["sub/rgba"]["caption"] is None
    assert rows["baseline"]["source"] == str(folder / "baseline.jpg")
    assert rows["baseline"]["length"] == (folder / "baseline.jpg").stat().st_size
    assert summary.rows == 9 and summary.rejected == 8


def test_folder_rejects_have_reasons(folder, tmp_path):
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, workers=1, progress=False)
    reasons = rejects_of(out)
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["mystery.bin"].startswith("not an image")
    assert reasons["cut.jpg"].startswith("truncated JPEG")
    assert reasons["cutpng.png"].startswith("truncated PNG")
    assert reasons["anim.gif"].startswith("animated GIF: not decodable by DALI")
    assert reasons["bomb.png"].startswith("too large: 60000x60000 is over --max-pixels 89478485")
    assert reasons["rgb.png"] == f"duplicate key 'sub/rgb' (kept {folder / 'sub' / 'rgb.jpg'})"
    assert len(reasons) == 8  # .json, orphan .txt and hidden files are neither samples nor rejects


def test_max_pixels_option(folder, tmp_path):
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, max_pixels=90 * 90, progress=False)
    assert "baseline" not in rows_of(out)
    assert rejects_of(out)["baseline.jpg"].startswith("too large: 120x80")


def write_shard(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = time.time()
                tar.addfile(info, io.BytesIO(data))


def test_tar_shards_index_offsets_that_read_back_byte_exact(tmp_path):
    images = {f"{i:09d}": jpeg_bytes(40 + 8 * i, 64, seed=i) for i in range(5)}
    write_shard(
        tmp_path / "shard-00000.tar",
        [
            ("000000000", {"jpg": images["000000000"], "txt": "the first one, ça va".encode()}),
            ("000000001", {"jpg": images["000000001"], "json": json.dumps({"caption": "from json"}).encode()}),
            ("000000002", {"jpg": images["000000002"]}),
            ("000000009", {"json": b"{}"}),  # metadata only: not a sample
            ("000000010", {"jpg": b"nonsense"}),
        ],
    )
    write_shard(tmp_path / "shard-00001.tar", [(k, {"jpg": images[k]}) for k in ("000000003", "000000004")])
    out = tmp_path / "m.parquet"
    code = main(["index", str(tmp_path / "shard-00000.tar"), str(tmp_path / "shard-00001.tar"), "-o", str(out), "-q"])
    assert code == 0
    rows = rows_of(out)
    assert sorted(rows) == [f"{i:09d}" for i in range(5)]
    for key, row in rows.items():
        with open(row["source"], "rb") as fh:
            fh.seek(row["offset"])
            assert fh.read(row["length"]) == images[key]
        assert (row["width"], row["height"]) == Image.open(io.BytesIO(images[key])).size
    assert rows["000000000"]["caption"] == "the first one, ça va"
    assert rows["000000001"]["caption"] == "from json"
    assert rows["000000002"]["caption"] is None
    assert rejects_of(out) == {"shard-00000.tar:000000010.jpg": "not an image (no known image format)"}


def test_metadata_with_paths_points_at_files(tmp_path):
    save_jpeg(tmp_path / "x.jpg", 64, 32)
    meta = tmp_path / "meta.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"key": ["x", "y"], "width": [64, 10], "height": [32, 10], "path": ["x.jpg", "gone.jpg"]}), meta
    )
    out = tmp_path / "m.parquet"
    build_index([str(meta)], out, progress=False)
    rows = rows_of(out)
    assert list(rows) == ["x"] and rows["x"]["source"] == str(tmp_path / "x.jpg")
    assert rejects_of(out) == {"gone.jpg": "file named in metadata does not exist"}


def test_keys_clashing_across_sources_keep_the_first(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_jpeg(tmp_path / name / "same.jpg", 32, 32)
    out = tmp_path / "m.parquet"
    summary = build_index([str(tmp_path / "a"), str(tmp_path / "b")], out, progress=False)
    rows = rows_of(out)
    assert rows["same"]["source"] == str(tmp_path / "a" / "same.jpg")
    assert summary.rows == 1 and summary.rejected == 1
    assert rejects_of(out)["same.jpg"].startswith("duplicate key 'same'")


def test_update_rereads_only_new_or_changed_files(folder, tmp_path, monkeypatch):
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, progress=False)
    save_jpeg(folder / "new.jpg", 48, 96)
    save_jpeg(folder / "baseline.jpg", 300, 100, seed=5)  # changed: new size and mtime
    summary = build_index([str(folder)], out, update=True, workers=1, progress=False)
    rows = rows_of(out)
    assert (rows["new"]["width"], rows["new"]["height"]) == (48, 96)
    assert (rows["baseline"]["width"], rows["baseline"]["height"]) == (300, 100)
    assert summary.reused == 8  # the other eight images were not opened again
    assert summary.rows == 10


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: str(p / "nope"), "source not found"),
        (
            lambda p: (p / "empty").mkdir() or str(p / "empty"),
            "(searched with its subfolders); give the folder that holds them",
        ),
        (lambda p: (p / "d.tar.gz").write_bytes(b"x") and str(p / "d.tar.gz"), "is a compressed tar"),
        (lambda p: (p / "x.zip").write_bytes(b"x") and str(p / "x.zip"), "don't know how to index"),
    ],
)
def test_bad_sources_give_one_line(tmp_path, capsys, make, message):
    source = make(tmp_path)
    code = main(["index", source, "-o", str(tmp_path / "m.parquet"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "m.parquet").exists()


def test_folder_of_only_bad_files_is_an_error_with_the_rejects_kept(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    with pytest.raises(IndexingError, match="no usable images"):
        build_index([str(tmp_path / "bad")], tmp_path / "m.parquet", progress=False)
    assert rejects_of(tmp_path / "m.parquet") == {"x.jpg": "empty file (0 bytes)"}
