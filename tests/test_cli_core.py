import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dali_arb
from dali_arb import Manifest, ManifestError
from dali_arb.cli import main

from .conftest import random_sizes, write_size_manifest
from .test_buckets import NOVELAI


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_buckets_json_without_manifest_lists_resolutions(capsys):
    code, out, _ = run(capsys, "buckets", "--json")
    assert code == 0
    listed = [f"{b['width']}x{b['height']}" for b in json.loads(out)["buckets"]]
    assert listed == NOVELAI


def test_buckets_report_json(capsys, size_manifest):
    code, out, _ = run(capsys, "buckets", size_manifest, "--batch-size", "8", "--world-size", "2", "--json")
    assert code == 0
    report = json.loads(out)
    totals = report["totals"]
    rows = report["buckets"]
    assert sum(b["images"] for b in rows) == totals["usable"]
    assert totals["usable"] + totals["rejected_aspect"] == totals["images"] == 3000
    for b in rows:
        assert 0 <= b["leftovers"] < 16 and b["full_batches"] * 16 + b["leftovers"] <= b["images"]
        assert 0 <= b["mean_crop_loss"] < 1 and 0 <= b["upscaled_share"] <= 1
    full = sum(b["full_batches"] for b in rows)
    left = sum(b["leftovers"] for b in rows)
    assert full * 16 + left + totals["trimmed_per_epoch"] == totals["usable"]
    assert totals["steps_per_epoch"] == totals["usable"] // 16 == full + left // 16
    assert totals["trimmed_per_epoch"] == totals["usable"] % 16 and totals["leftover_images"] == left
    # independent ranks: leftovers are per rank (each rank's bucket remainders), batches of 8
    solo = json.loads(
        run(capsys, "buckets", size_manifest, "-b", "8", "--world-size", "2", "--independent-ranks", "--json")[1]
    )
    full = sum(b["full_batches"] for b in solo["buckets"])
    left = sum(b["leftovers"] for b in solo["buckets"])
    assert all(b["leftovers"] < 2 * 8 for b in solo["buckets"])
    assert full * 8 + left + solo["totals"]["trimmed_per_epoch"] == solo["totals"]["usable"]
    assert full + left // 8 == 2 * solo["totals"]["steps_per_epoch"]
    text = run(capsys, "buckets", size_manifest, "--batch-size", "8")[1]
    assert "512x768" in text and "steps per epoch per rank" in text


def test_plan_prints_json_lines_that_partition_the_epoch(capsys, size_manifest):
    keys = set()
    steps = set()
    for rank in range(3):
        code, out, _ = run(
            capsys, "plan", size_manifest, "--batch-size", "4", "--world-size", "3", "--rank", str(rank), "--epoch", "1"
        )
        assert code == 0
        lines = [json.loads(line) for line in out.splitlines()]
        steps.add(len(lines))
        for i, line in enumerate(lines):
            assert line["step"] == i and len(line["ids"]) == 4 and line["width"] > 0 and line["height"] > 0
            keys.update(line["ids"])
    assert len(steps) == 1
    usable = json.loads(run(capsys, "buckets", size_manifest, "--json")[1])["totals"]["usable"]
    assert usable - len(keys) < 12
    again = run(capsys, "plan", size_manifest, "--batch-size", "4", "--world-size", "3", "--rank", "2", "--epoch", "1")[
        1
    ]
    assert again == out


def test_plan_matches_the_manifest_sizes(capsys, size_manifest):
    table = pq.read_table(size_manifest)
    size = dict(
        zip(table.column("key").to_pylist(), zip(table.column("width").to_pylist(), table.column("height").to_pylist()))
    )
    out = run(capsys, "plan", size_manifest, "-b", "2")[1]
    for line in map(json.loads, out.splitlines()[:50]):
        for key in line["ids"]:
            w, h = size[key]
            assert abs(np.log(w / h) - np.log(line["width"] / line["height"])) <= 0.6


def test_index_metadata_csv(tmp_path, capsys):
    csv = tmp_path / "meta.csv"
    csv.write_text(
        "key,width,height,caption,status\na,640,480,a cat,success\n007,480,640,,success\nc,0,5,bad,success\nd,10,10,x,failed_to_download\n"
    )
    out_path = tmp_path / "m.parquet"
    code, out, _ = run(capsys, "index", str(csv), "-o", str(out_path), "-q")
    assert code == 0 and "indexed 2 images" in out
    m = Manifest.read(out_path)
    assert m.keys.to_pylist() == ["a", "007"]  # keys stay strings
    assert m.widths.tolist() == [640, 480] and m.heights.tolist() == [480, 640]
    assert m.table.column("caption").to_pylist() == ["a cat", None]
    rejects = [json.loads(line) for line in (tmp_path / "m.parquet.rejects.jsonl").read_text().splitlines()]
    reasons = {r["key"]: r["reason"] for r in rejects}
    assert (
        reasons["c"].startswith("size is not two whole numbers between 1 and")
        and "(0 x 5)" in reasons["c"]
        and "failed_to_download" in reasons["d"]
    )


def manifest_with(tmp_path, **columns):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: manifest_with(p, key=["a"], width=[5]), "lacks column(s) height"),
        (lambda p: manifest_with(p, name=["a"], w=[5], h=[5]), "lacks column(s) key, width, height"),
        (
            lambda p: manifest_with(p, key=["a", "b"], width=[5, -1], height=[5, 5]),
            "non-positive size, first key 'b' is -1x5",
        ),
        (lambda p: manifest_with(p, key=["a"], width=["5"], height=[5]), "column 'width' must hold integers"),
        (lambda p: str(p / "missing.parquet"), "manifest not found"),
        (lambda p: (p / "text.parquet").write_text("hello") and str(p / "text.parquet"), "is not a Parquet manifest"),
        (lambda p: str(p), "is a folder"),
    ],
)
def test_bad_manifests_give_one_line(tmp_path, capsys, make, message):
    path = make(tmp_path)
    code, _, err = run(capsys, "plan", path, "-b", "1")
    assert code == 1
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_older_and_newer_manifest_formats_are_refused(tmp_path):
    table = pa.table({"key": ["a"], "width": [5], "height": [5]})
    for version, word in ((b"0", "older"), (b"99", "newer")):
        path = tmp_path / f"v{version.decode()}.parquet"
        pq.write_table(table.replace_schema_metadata({b"dali_arb.format": version}), path)
        with pytest.raises(ManifestError, match=word):
            Manifest.read(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "expected a positive integer, got 0"),
        (["--batch-size", "4", "--world-size", "0"], "expected a positive integer, got 0"),
        (
            ["--batch-size", "4", "--world-size", "2", "--rank", "2"],
            "--rank must be in [0, 1] for --world-size 2, got 2",
        ),
        (["--batch-size", "4", "--min-dim", "2000"], "min_dim (2000) must not exceed max_dim (1024)"),
        (["--batch-size", "4", "--max-area", "1000"], "max_area (1000) is smaller than min_dim**2"),
        (["--batch-size", "5000", "--leftover", "nearest"], "fewer than one global batch"),
        (["--batch-size", "4", "--base", "wide"], "'wide'"),
        (["--batch-size", "4", "--leftover", "sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_bad_options_give_one_line_and_nonzero_exit(capsys, size_manifest, argv, message):
    code, _, err = run(capsys, "plan", size_manifest, *argv)
    assert code in (1, 2)
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_console_script_has_no_traceback_on_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dali_arb", "plan", str(tmp_path / "none.parquet"), "-b", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("dali-arb plan: error: manifest not found") and "Traceback" not in result.stderr


def test_import_and_buckets_need_neither_dali_nor_torch():
    code = (
        "import sys, dali_arb, dali_arb.cli, dali_arb.index, dali_arb.tools.report\n"
        "from dali_arb.cli import main\n"
        "main(['buckets', '--json'])\n"
        "heavy = ('torch', 'nvidia', 'jax', 'jaxlib', 'obstore', 'cv2', 'PIL', 'matplotlib')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_import_dali_arb_loads_only_numpy_and_pyarrow():
    """import-linter cannot tell an eager import from a lazy one: this checks what ``import dali_arb`` loads."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import dali_arb\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before if 'cython' not in m}\n"
        "extra = new - {'dali_arb', 'numpy', 'pyarrow'} - set(sys.stdlib_module_names)\n"
        "assert not extra, extra\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_planner_core_imports_only_numpy_and_pyarrow():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import dali_arb.plan.planner, dali_arb.plan.buckets, dali_arb.plan.world, dali_arb.data.manifest\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before if 'cython' not in m}\n"
        "extra = new - {'dali_arb', 'numpy', 'pyarrow'} - set(sys.stdlib_module_names)\n"
        "assert not extra, extra\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_all_is_sorted_and_complete():
    assert dali_arb.__all__ == sorted(dali_arb.__all__)
    for name in dali_arb.__all__:
        assert getattr(dali_arb, name) is not None


def test_manifest_roundtrip(tmp_path):
    h, w = random_sizes(10)
    path = write_size_manifest(tmp_path / "r.parquet", h, w)
    m = Manifest.read(path)
    assert len(m) == 10 and m.heights.tolist() == h.tolist()
    assert m.keys_at(np.array([[3, 1]])) == ["img000003", "img000001"]


@pytest.mark.parametrize("command", ["index", "buckets", "plan", "preview", "bench", "demo"])
def test_every_command_has_help_with_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "examples:" in out and f"dali-arb {command}" in out


def test_debug_shows_the_traceback_instead(tmp_path):
    quiet = subprocess.run(
        [sys.executable, "-m", "dali_arb", "plan", str(tmp_path / "x.parquet"), "-b", "2"],
        capture_output=True,
        text=True,
    )
    loud = subprocess.run(
        [sys.executable, "-m", "dali_arb", "--debug", "plan", str(tmp_path / "x.parquet"), "-b", "2"],
        capture_output=True,
        text=True,
    )
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "ManifestError: manifest not found" in loud.stderr
