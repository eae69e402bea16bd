"""A run that finds no usable image leaves the manifest already at its output as it was (found by the hostile test
of 2026-12-03: it replaced a good manifest with an empty one and exited 1), for a file and a manifest in parts, with
the local and the Ray engine; its rejects are listed beside, not over the manifest's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dali_arb.data.manifest import Manifest, rejects_path
from dali_arb.errors import IndexingError
from dali_arb.index import build_index

SAMPLES = Path(__file__).resolve().parents[1] / "dali_arb" / "samples"


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    good = tmp_path / "good"
    good.mkdir()
    for jpg in sorted(SAMPLES.glob("*.jpg"))[:4]:
        shutil.copy(jpg, good / jpg.name)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    return good, bad


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_manifest_file_is_left_as_it_was(tmp_path: Path) -> None:
    good, bad = _folders(tmp_path)
    out = tmp_path / "m.parquet"
    build_index([str(good)], out, workers=1, progress=False)
    before = out.read_bytes(), rejects_path(out).read_bytes()
    with pytest.raises(IndexingError, match=r"no usable images .*/m\.parquet is left as it was") as caught:
        build_index([str(bad)], out, workers=1, progress=False)
    assert (out.read_bytes(), rejects_path(out).read_bytes()) == before
    assert len(Manifest.read(out).table) == 4
    listed = tmp_path / "m.parquet.empty-run.rejects.jsonl"
    assert str(listed) in str(caught.value)
    assert [json.loads(line)["source"] for line in listed.read_text().splitlines()] == [str(bad / "broken.jpg")]


def test_a_new_output_still_says_no_usable_images(tmp_path: Path) -> None:
    _, bad = _folders(tmp_path)
    with pytest.raises(IndexingError, match="no usable images") as caught:
        build_index([str(bad)], tmp_path / "new.parquet", workers=1, progress=False)
    assert "left as it was" not in str(caught.value)


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_manifest_in_parts_is_left_as_it_was(tmp_path: Path, engine: str, request) -> None:
    if engine == "ray":
        request.getfixturevalue("s3")  # (before Ray: a later test gives its workers S3)
        request.getfixturevalue("ray_session")
    good, bad = _folders(tmp_path)
    out = tmp_path / "parts"
    build_index([str(good)], str(out) + "/", workers=1, progress=False, engine=engine)
    before = _files(out)
    with pytest.raises(IndexingError, match="left as it was"):
        build_index([str(bad)], str(out) + "/", workers=1, progress=False, engine=engine)
    assert _files(out) == before
    assert sum(pq.read_metadata(out / name).num_rows for name in before if name.endswith(".parquet")) == 4
    listed = tmp_path / "parts.empty-run.rejects.jsonl"
    assert [json.loads(line)["source"] for line in listed.read_text().splitlines()] == [str(bad / "broken.jpg")]


# -- in object storage (moto) ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto")
    from support.loopback import moto_bucket

    with moto_bucket("empty-run") as server:
        yield server


def _objects(prefix: str) -> dict[str, bytes]:
    from dali_arb.data.storage import get_bytes, list_prefix

    return {info.url: get_bytes(info.url) for info in list_prefix(prefix)}


@pytest.mark.parametrize(
    ("output", "engine", "update"),
    [
        ("s3://empty-run/one/m.parquet", "local", False),
        ("s3://empty-run/two/m.parquet", "local", True),
        ("s3://empty-run/parts/", "local", False),
        ("s3://empty-run/parts-again/", "local", True),
        pytest.param("s3://empty-run/ray/", "ray", False, marks=pytest.mark.slow),
    ],
)
def test_a_manifest_in_the_store_is_left_as_it_was(tmp_path, s3, request, output, engine, update) -> None:
    """Before: a file's rejects object was replaced by the empty run's; a manifest in parts (without --update) was
    replaced by one of no rows."""
    from dali_arb.data.storage import get_bytes

    if engine == "ray":
        request.getfixturevalue("ray_session")
    good, bad = _folders(tmp_path)
    build_index([str(good)], output, workers=1, progress=False, engine=engine)
    prefix = output.rsplit("/", 1)[0] + "/"
    before = _objects(prefix)
    with pytest.raises(IndexingError, match=f"{output} is left as it was") as caught:
        build_index([str(bad)], output, workers=1, progress=False, engine=engine, update=update)
    listed = f"{output.rstrip('/')}.empty-run.rejects.jsonl"
    after = _objects(prefix)
    after.pop(listed, None)  # (beside a manifest file, in the same folder)
    assert after == before
    assert len(Manifest.read(output).table) == 4
    assert listed in str(caught.value)
    sources = [json.loads(line)["source"] for line in get_bytes(listed).decode().splitlines()]
    assert sources == [str(bad / "broken.jpg")]
