"""Issue 23's small frictions, each a test that failed before its fix: torch's spellings of the device and dtype,
quoted local brace ranges and globs, ``-o`` naming a folder or another format, ``preview -o`` into a missing folder,
``plan`` without ``-b``, and an empty manifest described as empty."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import Manifest, ManifestError
from dali_arb.cli import main
from dali_arb.errors import ConfigError
from dali_arb.loader.options import Decode, LoaderOptions

from .conftest import copy_photos
from .images import jpeg_bytes, save_jpeg


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, *fragments: str) -> None:
    """A user's mistake: a non-zero exit and one line on stderr naming what was wrong, no traceback."""
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def keys_of(manifest) -> list[str]:
    return sorted(pq.read_table(manifest, columns=["key"]).column("key").to_pylist())


def write_shard(path, keys: list[str], seed: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            data = jpeg_bytes(64 + 8 * i, 48, seed=seed + i)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# -- (1) torch's spellings: device="cuda", "cuda:N", dtype=torch.float16 ------------------------------------------


def test_decode_takes_torch_spellings_of_device_and_dtype():
    torch = pytest.importorskip("torch")
    assert Decode(device="cuda").device == "gpu" and Decode(device="cuda").device_id is None
    assert (Decode(device="cuda:1").device, Decode(device="cuda:1").device_id) == ("gpu", 1)
    second = Decode(device=torch.device("cuda", 2))
    assert (second.device, second.device_id) == ("gpu", 2)
    assert Decode(device="cuda:0", device_id=0).device_id == 0
    assert Decode(device=torch.device("cpu")).device == "cpu"
    for dtype, name in [(torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32"),
                        (torch.uint8, "uint8")]:  # fmt: skip
        decode = Decode(dtype=dtype)
        assert decode.dtype == name and decode.to_dict()["dtype"] == name
        json.dumps(decode.to_dict())  # (the state and the CLI echo hold names, never torch objects)
    options = LoaderOptions.from_keywords(batch_size=2, device="cuda:3", dtype=torch.bfloat16)
    assert (options.decode.device, options.decode.device_id, options.decode.dtype) == ("gpu", 3, "bfloat16")


@pytest.mark.parametrize(
    ("keywords", "fragments"),
    [
        ({"device": "cuda:x"}, ["'cuda:x'", "'cuda', 'cuda:N'"]),
        ({"device": "tpu"}, ["'tpu'", "'auto', 'gpu' or 'cpu'"]),
        ({"device": "cuda:1", "device_id": 0}, ["'cuda:1'", "device_id is 0"]),
        ({"dtype": "torch.float64"}, ["'torch.float64'", "torch.float16"]),
        ({"dtype": "int8"}, ["'int8'", "float16, bfloat16, float32, uint8"]),
    ],
)
def test_decode_refuses_other_devices_and_dtypes_naming_them(keywords, fragments):
    with pytest.raises(ConfigError) as caught:
        Decode(**keywords)
    assert all(f in str(caught.value) for f in fragments), caught.value


def test_the_iterator_takes_torch_dtypes_and_cuda_is_the_gpu(dataset):
    torch = pytest.importorskip("torch")
    pytest.importorskip("nvidia.dali")
    from dali_arb.loader.pipeline import gpu_count
    from dali_arb.torch import DALIBucketIterator

    _, manifest = dataset
    for dtype in (torch.float16, torch.bfloat16, torch.uint8):
        loader = DALIBucketIterator(manifest, batch_size=2, device="cpu", dtype=dtype, workers=0)
        batch = next(iter(loader))
        assert batch["images"].dtype == dtype and batch["images"].shape[0] == 2
        assert loader.state_dict() is not None
    if gpu_count() == 0:  # "cuda" is "gpu": the same clear error without one
        with pytest.raises(Exception, match="DALI sees no CUDA GPU"):
            next(iter(DALIBucketIterator(manifest, batch_size=2, device="cuda", workers=0)))
    else:  # (the GPU tier) decoded on GPU 0, in torch's spelling
        batch = next(iter(DALIBucketIterator(manifest, batch_size=2, device="cuda:0", dtype=torch.bfloat16)))
        assert batch["images"].device == torch.device("cuda", 0) and batch["images"].dtype == torch.bfloat16


@pytest.mark.parametrize("command", ["preview", "bench", "demo"])
def test_the_cli_takes_device_cuda_as_gpu(command, capsys):
    from dali_arb.cli import build_parser

    argv = {"preview": ["m.parquet", "-o", "p.png"], "bench": ["m.parquet"], "demo": []}[command]
    assert build_parser().parse_args([command, *argv, "--device", "cuda"]).device == "gpu"
    code, _, err = cli(capsys, command, *argv, "--device", "tpu")
    one_line(code, err, "--device", "'tpu'")


# -- (2) quoted local brace ranges and globs index like the expanded list -----------------------------------------


def test_quoted_local_brace_range_indexes_like_the_expanded_list(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(4):
        write_shard(shards / f"{n:05d}.tar", [f"s{n}-{i}" for i in range(2)], seed=10 * n)
    listed, braced = tmp_path / "listed.parquet", tmp_path / "braced.parquet"
    assert cli(capsys, "index", *(shards / f"{n:05d}.tar" for n in range(3)), "-o", listed, "-q")[0] == 0
    code, _, err = cli(capsys, "index", f"{shards}/{{00000..00002}}.tar", "-o", braced, "-q")
    assert code == 0, err
    assert keys_of(braced) == keys_of(listed) and len(keys_of(braced)) == 6
    sources = set(pq.read_table(braced, columns=["source"]).column("source").to_pylist())
    assert sources == {str(shards / f"{n:05d}.tar") for n in range(3)}
    # a shard glob too, and a range naming a shard that is not there is "not found" for that shard
    code, _, err = cli(capsys, "index", f"{shards}/0000[0-2].tar", "-o", tmp_path / "glob.parquet", "-q")
    assert code == 0 and keys_of(tmp_path / "glob.parquet") == keys_of(listed), err
    code, _, err = cli(capsys, "index", f"{shards}/{{00000..00009}}.tar", "-o", tmp_path / "x.parquet", "-q")
    one_line(code, err, "source not found", "00004.tar")


def test_quoted_local_folder_glob_indexes_every_folder_it_matches(tmp_path, dataset, capsys):
    photos = tmp_path / "photos"
    copy_photos(dataset[0], photos / "a", 3)
    (photos / "b").mkdir()
    for i in range(2):
        save_jpeg(photos / "b" / f"b{i}.jpg", 80, 60, seed=i)
    (photos / "notes.txt").write_text("not a folder", encoding="utf-8")
    listed, globbed = tmp_path / "listed.parquet", tmp_path / "globbed.parquet"
    assert cli(capsys, "index", photos / "a", photos / "b", "-o", listed, "-q")[0] == 0
    code, _, err = cli(capsys, "index", f"{photos}/*/", "-o", globbed, "-q")
    assert code == 0, err
    assert keys_of(globbed) == keys_of(listed) and len(keys_of(globbed)) == 5
    code, _, err = cli(capsys, "index", f"{photos}/nothing-*/", "-o", tmp_path / "none.parquet", "-q")
    one_line(code, err, "no file or folder matches", "nothing-*")
    code, _, err = cli(capsys, "index", f"{photos}/{{a,b", "-o", tmp_path / "none.parquet", "-q")
    one_line(code, err, "unbalanced braces")
    assert not (tmp_path / "none.parquet").exists()


def test_a_local_path_that_exists_is_taken_as_it_is_even_with_brace_characters(tmp_path, capsys):
    odd = tmp_path / "set{1..2}"
    odd.mkdir()
    save_jpeg(odd / "x.jpg", 64, 48)
    code, _, err = cli(capsys, "index", odd, "-o", tmp_path / "m.parquet", "-q")
    assert code == 0 and keys_of(tmp_path / "m.parquet") == ["x"], err


# -- (3) -o naming a folder or another format; preview -o into a missing folder ------------------------------------


def test_index_output_that_names_a_folder_writes_parts_or_is_one_line(tmp_path, dataset, capsys):
    """Issue 22: ``-o outdir/`` used to write a file named ``outdir``; a folder now holds a manifest in parts. A folder
    holding other files is never written into."""
    from dali_arb.data.parts import is_parts

    photos = copy_photos(dataset[0], tmp_path / "photos", 2)
    code, _, err = cli(capsys, "index", photos, "-o", f"{tmp_path}/outdir/", "-q")
    assert code == 0 and is_parts(tmp_path / "outdir") and not (tmp_path / "outdir.parquet").exists(), err
    code, _, err = cli(capsys, "index", photos, "-o", tmp_path, "-q")  # an existing folder, with the photos in it
    one_line(code, err, "holds files but no manifest in parts", "manifest.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir", "photos"]


@pytest.mark.parametrize("name", ["m.csv", "m.json", "m.CSV", "m.pq"])
def test_index_output_in_another_format_is_refused(tmp_path, dataset, capsys, name):
    photos = copy_photos(dataset[0], tmp_path / "photos", 2)
    code, _, err = cli(capsys, "index", photos, "-o", tmp_path / name, "-q")
    one_line(code, err, name, "Parquet", "m.parquet")
    assert not (tmp_path / name).exists() and not list(tmp_path.glob("*.rejects.jsonl"))
    assert cli(capsys, "index", photos, "-o", tmp_path / "m.PARQUET", "-q")[0] == 0
    assert cli(capsys, "index", photos, "-o", tmp_path / "manifest", "-q")[0] == 0  # (no suffix: as named)


def test_preview_and_plot_into_a_missing_folder_say_what_to_do_before_any_work(tmp_path, capsys, size_manifest):
    code, _, err = cli(capsys, "preview", tmp_path / "m.parquet", "-o", tmp_path / "nodir" / "p.png")
    one_line(code, err, "-o", "nodir", "does not exist", "create it")
    code, _, err = cli(capsys, "preview", tmp_path / "m.parquet", "-o", f"{tmp_path}/")
    one_line(code, err, "is a folder", "preview.png")
    code, _, err = cli(capsys, "buckets", size_manifest, "--plot", tmp_path / "nodir" / "b.png")
    one_line(code, err, "--plot", "nodir", "does not exist")
    assert not (tmp_path / "nodir").exists()


# -- (4) plan's batch size defaults to 16, like buckets -------------------------------------------------------------


def test_plan_defaults_to_batches_of_16_like_buckets(capsys, size_manifest):
    code, out, err = cli(capsys, "plan", size_manifest)
    assert code == 0, err
    steps = [json.loads(line) for line in out.splitlines()]
    explicit = [json.loads(line) for line in cli(capsys, "plan", size_manifest, "-b", "16")[1].splitlines()]
    assert steps == explicit and steps and all(len(s["ids"]) <= 16 for s in steps)
    assert max(len(s["ids"]) for s in steps) == 16
    report = json.loads(cli(capsys, "buckets", size_manifest, "--json")[1])
    assert len(steps) == report["totals"]["steps_per_epoch"]


# -- (5) an empty manifest is described as empty ---------------------------------------------------------------------


def test_an_empty_manifest_is_described_as_empty(tmp_path, dataset):
    pytest.importorskip("nvidia.dali")
    from dali_arb.torch import DALIBucketIterator

    empty = Manifest.read(dataset[1]).table.slice(0, 0)
    path = tmp_path / "empty.parquet"
    pq.write_table(empty, path)
    for manifest in (path, Manifest(empty)):
        with pytest.raises(ManifestError) as caught:
            DALIBucketIterator(manifest, batch_size=2, device="cpu", workers=0)
        message = str(caught.value)
        assert "empty" in message and "no images" in message and "index a folder with images" in message, message
        assert "without a path column" not in message


def test_metadata_without_paths_is_still_described_as_such(tmp_path):
    pytest.importorskip("nvidia.dali")
    from dali_arb.torch import DALIBucketIterator

    table = pa.table({"key": ["a", "b"], "width": pa.array([64, 64], pa.int32()),
                      "height": pa.array([48, 48], pa.int32())})  # fmt: skip
    with pytest.raises(ManifestError, match="without a path column"):
        DALIBucketIterator(Manifest(table), batch_size=2, device="cpu", workers=0)
