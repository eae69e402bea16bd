"""Issue 18, indexing findings: what the indexer must never get wrong silently (URL rows of metadata, tars
appended to, captions with unusual line breaks, keys object storage cannot address, unreadable sidecars,
mistakes that ended in "internal error", symlinked folders that leave the dataset)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dali_arb import DALIBucketIterator, Manifest
from dali_arb.cli import main
from dali_arb.errors import IndexingError, StorageError
from dali_arb.index import build_index
from dali_arb.plan.captions import CaptionPolicy
from support.loopback import moto_bucket, put_object

from .conftest import SMALL
from .images import jpeg_bytes, save_jpeg


def rejects_of(manifest) -> list[dict]:
    path = f"{manifest}.rejects.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def rows_of(manifest) -> dict[str, dict]:
    return {r["key"]: r for r in Manifest.read(manifest).table.to_pylist()}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def loader(manifest, **kw):
    options = {"batch_size": 2, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3}
    return DALIBucketIterator(manifest, **{**options, **kw})


# -- f11: only \n, \r\n and \r end a caption's line ----------------------------------------------------------
ODD_BREAKS = "a cat\u2028on a mat\x85in the sun\x0cat noon"


def test_f11_the_caption_policy_splits_lines_at_newlines_only():
    policy = CaptionPolicy()
    draws = {policy.apply(ODD_BREAKS, np.random.default_rng(i)) for i in range(50)}
    assert draws == {ODD_BREAKS}
    draws = {policy.apply(f"{ODD_BREAKS}\r\nsecond\rthird\n", np.random.default_rng(i)) for i in range(200)}
    assert draws == {ODD_BREAKS, "second", "third"}


def test_f11_an_indexed_caption_with_odd_breaks_is_served_whole(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        save_jpeg(folder / f"p{i}.jpg", 120, 120, seed=i)
        (folder / f"p{i}.txt").write_text(ODD_BREAKS + "\n", encoding="utf-8")
    build_index([str(folder)], tmp_path / "m.parquet", progress=False, workers=1)
    assert {r["caption"] for r in rows_of(tmp_path / "m.parquet").values()} == {ODD_BREAKS}
    served = [c for batch in loader(str(tmp_path / "m.parquet")) for c in batch["captions"]]
    assert served == [ODD_BREAKS, ODD_BREAKS]


# -- f8: a tar appended to (tar -r / tar -u): the last copy of a member is the current one ----------------------
def png_bytes(width: int, height: int) -> bytes:
    from .images import photo_like

    out = io.BytesIO()
    photo_like(width, height).save(out, "PNG")
    return out.getvalue()


def appended_shard(path) -> None:
    """``0000`` written with a landscape picture, caption and depth, then all three appended again in portrait
    (what ``tar -rf`` / ``tar -uf`` leave); ``0001`` written once."""
    with tarfile.open(path, "w") as tar:
        add_member(tar, "0000.jpg", jpeg_bytes(120, 80, seed=1))
        add_member(tar, "0000.txt", b"old caption")
        add_member(tar, "0000.depth.png", png_bytes(120, 80))
        add_member(tar, "0001.jpg", jpeg_bytes(100, 100, seed=2))
        add_member(tar, "0001.depth.png", png_bytes(100, 100))
    with tarfile.open(path, "a") as tar:
        add_member(tar, "0000.depth.png", png_bytes(80, 120))
        add_member(tar, "0000.jpg", jpeg_bytes(80, 120, seed=3))
        add_member(tar, "0000.txt", b"new caption")


def last_copies(path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar}  # later members overwrite earlier ones


def check_last_copy_wins(manifest, shard) -> None:
    rows = rows_of(manifest)
    last = last_copies(shard)
    new = rows["0000"]
    assert (new["width"], new["height"], new["caption"]) == (80, 120, "new caption")
    assert (new["offset"], new["length"]) == last["0000.jpg"]
    assert (new["depth.offset"], new["depth.length"], new["depth.width"]) == (*last["0000.depth.png"], 80)
    assert rows["0001"]["caption"] is None and len(rows) == 2
    assert rejects_of(manifest) == []  # an older copy is no sample of its own


def test_f8_a_tar_appended_to_is_indexed_with_the_last_copy_of_every_member(tmp_path):
    from dali_arb.data.pairs import PairSpec

    shard = tmp_path / "00000.tar"
    appended_shard(shard)
    build_index([str(shard)], tmp_path / "m.parquet", progress=False, workers=1, pairs=[PairSpec("depth")])
    check_last_copy_wins(tmp_path / "m.parquet", shard)


def test_f8_two_images_of_one_key_under_different_names_stay_a_duplicate(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "0000.jpg", jpeg_bytes(120, 80))
        add_member(tar, "0000.png", png_bytes(80, 120))
        add_member(tar, "0000.jpg", jpeg_bytes(100, 100))
    build_index([str(shard)], tmp_path / "m.parquet", progress=False, workers=1)
    row = rows_of(tmp_path / "m.parquet")["0000"]
    assert (row["width"], row["height"], row["offset"]) == (100, 100, last_copies(shard)["0000.jpg"][0])
    assert [r["reason"] for r in rejects_of(tmp_path / "m.parquet")] == ["duplicate key '0000' (kept 0000.jpg)"]


# -- f21: mistakes that ended in "internal error" are one line each -------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def check_one_line(code: int, err: str, *words: str) -> None:
    assert code != 0
    assert "internal error" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_f21_metadata_with_a_column_named_twice_is_one_line(tmp_path, capsys):
    (tmp_path / "dup.csv").write_text("key,width,height,key\na,10,10,b\n", encoding="utf-8")
    code, err = run_cli(["index", str(tmp_path / "dup.csv"), "-o", str(tmp_path / "m.parquet")], capsys)
    check_one_line(code, err, "dup.csv", "'key'", "more than once")
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array([10]), pa.array([10]), pa.array([10])],
                                 names=["key", "width", "height", "width"])  # fmt: skip
    pq.write_table(table, tmp_path / "dup.parquet")
    code, err = run_cli(["index", str(tmp_path / "dup.parquet"), "-o", str(tmp_path / "m.parquet")], capsys)
    check_one_line(code, err, "dup.parquet", "'width'")


def test_f21_unbalanced_braces_in_a_source_url_are_one_line(tmp_path, capsys):
    url = "s3://bucket/shards/{00000..00002.tar"
    code, err = run_cli(["index", url, "-o", str(tmp_path / "m.parquet")], capsys)
    check_one_line(code, err, url, "unbalanced braces")
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("captions", [pa.array([b"a cat"] * 4, pa.binary()), pa.array([["a", "cat"]] * 4)])
def test_f21_a_manifest_whose_captions_are_not_text_is_one_line(tmp_path, capsys, captions):
    table = pa.table({"key": [f"k{i}" for i in range(4)], "width": pa.array([100] * 4, pa.int32()),
                      "height": pa.array([100] * 4, pa.int32()), "caption": captions})  # fmt: skip
    pq.write_table(table, tmp_path / "m.parquet")
    for command in (["plan", "-b", "2"], ["buckets", "-b", "2"]):
        code, err = run_cli([command[0], str(tmp_path / "m.parquet"), *command[1:]], capsys)
        check_one_line(code, err, "m.parquet", "'caption'", "binary" if captions.type == pa.binary() else "list<")
    with pytest.raises(Exception, match="column 'caption' holds"):
        Manifest(table)


# -- f25a: a symlinked folder never leads the walk back up (to `/`, a parent) or into /proc, /sys, /dev ----------
@pytest.mark.slow  # (a process of its own, so that a walk of / or /proc would end at the timeout)
def test_f25a_symlinked_folders_to_ancestors_or_system_folders_are_rejected_not_crawled(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_jpeg(outside / "stray.jpg", 64, 64)  # reached through `up -> ..` only if the walk leaves the dataset
    root = tmp_path / "outside" / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    save_jpeg(root / "a.jpg", 64, 64)
    save_jpeg(root / "sub" / "b.jpg", 64, 64)
    save_jpeg(root / ".hidden" / "c.jpg", 64, 64)
    links = {
        "up": "..",
        "top": "/",
        "proc": "/proc",
        "loop": ".",
        "sub/back": "..",
        "mirror": "sub",
        "shown": ".hidden",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    out = tmp_path / "m.parquet"
    command = [sys.executable, "-m", "dali_arb", "index", str(root), "-o", str(out), "--workers", "1"]
    subprocess.run(command, check=True, timeout=60, capture_output=True)  # never a crawl of / or /proc
    assert set(rows_of(out)) == {"a", "sub/b", "shown/c"}  # a link inside the dataset is followed
    reasons = {os.path.relpath(r["source"], root): r["reason"] for r in rejects_of(out)}
    for name in ("up", "top", "loop", "sub/back"):
        assert reasons.pop(name).startswith(f"symlinked folder {root / name} leads to {os.path.realpath(root / name)}")
    assert "a system folder" in reasons.pop("proc")
    assert reasons.pop("mirror") == f"symlink to {root / 'sub'}, which is indexed itself"
    assert reasons == {}


# -- f20: a sidecar caption that cannot be read is never "no caption" -----------------------------------------
def captioned_folder(tmp_path, n: int = 3):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(n):
        save_jpeg(folder / f"p{i}.jpg", 64, 64, seed=i)
        (folder / f"p{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    return folder


def failing_open(monkeypatch, name: str, code: int) -> None:
    """``open`` of any file called ``name`` fails with ``code`` (in this process and the workers it forks)."""
    real_open = builtins.open

    def patched(file, *args, **kwargs):
        if os.path.basename(str(file)) == name:
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", patched)
    # the indexer forks its workers (so they inherit the patch) unless obstore is loaded in this process, which an
    # earlier test may have done; the local folders indexed here never reach obstore in the workers
    monkeypatch.delitem(sys.modules, "obstore", raising=False)


def test_f20_an_unreadable_local_caption_rejects_its_sample_also_on_update(tmp_path, monkeypatch):
    folder = captioned_folder(tmp_path)
    out = tmp_path / "m.parquet"
    build_index([str(folder)], out, progress=False, workers=1)
    # a caption that is there but cannot be opened: a link to itself (ELOOP). (Not a patched ``open``: the index
    # workers are spawned, not forked, once obstore is imported in this process, and would not see the patch.)
    (folder / "p1.txt").unlink()
    (folder / "p1.txt").symlink_to("p1.txt")
    summary = build_index([str(folder)], out, progress=False, workers=1, update=True)
    rows = rows_of(out)
    assert {k: r["caption"] for k, r in rows.items()} == {"p0": "caption 0", "p2": "caption 2"}
    assert summary.rejected == 1
    [reject] = rejects_of(out)
    assert reject["key"] == "p1" and reject["source"] == str(folder / "p1.jpg")
    assert reject["reason"] == f"caption file {folder / 'p1.txt'} is unreadable (Too many levels of symbolic links)"


def test_f20_a_failing_disk_under_a_local_caption_stops_the_run(tmp_path, monkeypatch):
    folder = captioned_folder(tmp_path)
    out = tmp_path / "m.parquet"
    failing_open(monkeypatch, "p1.txt", errno.EIO)
    with pytest.raises(StorageError, match=r"p1\.txt: Input/output error"):
        build_index([str(folder)], out, progress=False, workers=1)
    assert not out.exists() and not os.path.exists(f"{out}.rejects.jsonl")


# -- object storage: moto's S3 server on loopback ---------------------------------------------------------------
BUCKET = "trust"


@pytest.fixture(scope="module")
def s3():
    with moto_bucket(BUCKET) as server:
        yield server


def put(key: str, data: bytes) -> None:
    put_object(BUCKET, key, data)


def delete(key: str) -> None:
    import obstore
    from obstore.store import S3Store

    obstore.delete(S3Store(BUCKET, client_options={"allow_http": True}), key)


# f3: metadata whose paths are URLs
@pytest.mark.parametrize("list_from", [64, 2])  # objects asked for one by one (HEAD), or their folder listed
def test_f3_metadata_with_object_storage_paths_serves_every_image(s3, tmp_path, monkeypatch, list_from):
    monkeypatch.setattr("dali_arb.index.metadata.LIST_FROM", list_from)
    sizes = [(300, 200), (200, 300), (240, 240)] * 2
    rows = {"key": [], "width": [], "height": [], "path": []}
    for i, (w, h) in enumerate(sizes):
        put(f"f3/imgs/{i}.jpg", jpeg_bytes(w, h, seed=i))
        path = f"s3://{BUCKET}/f3/imgs/{i}.jpg" if i % 2 else f"../imgs/./{i}.jpg"  # absolute, or relative
        for name, value in zip(rows, (f"k{i}", w, h, path)):
            rows[name].append(value)
    for name, value in zip(rows, ("gone", 100, 100, "../imgs/gone.jpg")):
        rows[name].append(value)
    meta = io.BytesIO()
    pq.write_table(pa.table(rows), meta)
    put("f3/meta/m.parquet", meta.getvalue())
    out = tmp_path / "m.parquet"
    build_index([f"s3://{BUCKET}/f3/meta/m.parquet"], out, progress=False, workers=1)
    it = loader(str(out))
    served = sorted(k for batch in it for k in batch["ids"])
    assert served == sorted(f"k{i}" for i in range(6)) and it.state_dict()["failed"] == {}
    indexed = rows_of(out)
    assert set(indexed) == {f"k{i}" for i in range(6)}
    for i in range(6):
        assert indexed[f"k{i}"]["source"] == f"s3://{BUCKET}/f3/imgs/{i}.jpg"
        assert indexed[f"k{i}"]["length"] == len(jpeg_bytes(*sizes[i], seed=i))  # the size, recorded at indexing
    [reject] = rejects_of(out)
    assert reject == {"source": f"s3://{BUCKET}/f3/imgs/gone.jpg", "key": "gone",
                      "reason": "object named in metadata does not exist"}  # fmt: skip


# f8: a shard in object storage, appended to
def test_f8_a_shard_in_object_storage_appended_to_is_indexed_with_the_last_copies(s3, tmp_path):
    from dali_arb.data.pairs import PairSpec

    shard = tmp_path / "00000.tar"
    appended_shard(shard)
    put("f8/00000.tar", shard.read_bytes())
    out = tmp_path / "m.parquet"
    build_index([f"s3://{BUCKET}/f8/00000.tar"], out, progress=False, workers=1, pairs=[PairSpec("depth")])
    check_last_copy_wins(out, shard)


# f19: keys object storage allows but paths cannot hold
def put_bad(key: str) -> None:
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=jpeg_bytes(64, 64))  # (obstore cannot write it)


@pytest.mark.parametrize(
    "bad",
    ["zz//w.jpg", "a//x.jpg", "./y.jpg", "../z.jpg", "zz/./q/v.jpg"],  # some sort after the images: the page before
)
def test_f19_one_key_with_an_empty_dot_or_dotdot_segment_is_rejected_and_the_prefix_indexed(s3, tmp_path, bad):
    prefix = f"f19-{len(bad)}-{bad.count('.')}-{bad[0]}"
    good = {f"img{i}.jpg": jpeg_bytes(64, 64, seed=i) for i in range(4)}
    good.update(
        {"zz/ok.jpg": jpeg_bytes(64, 64, seed=7), "zz/0": jpeg_bytes(64, 64, seed=8)}
    )  # "zz/0": just after "zz//"
    for name, data in good.items():
        put(f"{prefix}/{name}", data)
    put_bad(f"{prefix}/{bad}")
    out = tmp_path / "m.parquet"
    summary = build_index([f"s3://{BUCKET}/{prefix}/"], out, progress=False, workers=1)
    assert set(rows_of(out)) == {os.path.splitext(n)[0] for n in good} and summary.rows == len(good)
    [reject] = rejects_of(out)
    assert reject["source"] == f"s3://{BUCKET}/{prefix}/{bad}"
    assert reject["reason"].startswith("key has an empty, '.' or '..' path segment, which this reader cannot address")


def test_f19_several_bad_keys_in_one_folder_that_hide_images_stop_the_run_naming_them(s3, tmp_path):
    good = [f"img{i}.jpg" for i in range(4)]
    for name in good:
        put(f"f19many/{name}", jpeg_bytes(64, 64))
    bad = ["f19many/../z.jpg", "f19many/./y.jpg", "f19many/a//x.jpg", "f19many/zz//w.jpg"]
    for key in bad:
        put_bad(key)
    # the store returns the images in one page with the last bad key, and the folder's listing fails on the
    # others: the run says which key to rename instead of indexing a prefix with images missing
    with pytest.raises(IndexingError, match=r"f19many/: objects of this folder .* could not be listed"):
        build_index([f"s3://{BUCKET}/f19many/"], tmp_path / "m.parquet", progress=False, workers=1)


# f20: a sidecar caption in storage that cannot be read
def test_f20_a_caption_object_gone_before_its_read_rejects_the_sample(s3):
    from dali_arb.index.remote import prefix_tasks, remote_folder_task

    for i in range(3):
        put(f"f20gone/p{i}.jpg", jpeg_bytes(64, 64, seed=i))
        put(f"f20gone/p{i}.txt", f"caption {i}".encode())
    [task], _ = prefix_tasks(f"s3://{BUCKET}/f20gone/", 10**8)
    delete("f20gone/p1.txt")
    rows, rejects, _ = remote_folder_task(task)
    assert {r.key: r.caption for r in rows} == {"p0": "caption 0", "p2": "caption 2"}
    [reject] = rejects
    assert reject["key"] == "p1" and f"caption s3://{BUCKET}/f20gone/p1.txt was listed but is gone" in reject["reason"]


def test_f20_a_failing_store_under_a_caption_stops_the_update_instead_of_erasing_it(s3, tmp_path, monkeypatch):
    from dali_arb.index.folders import PreviousRows
    from dali_arb.index.remote import prefix_tasks, remote_folder_task
    from support.loopback import FaultProxy

    for i in range(2):
        put(f"f20fail/p{i}.jpg", jpeg_bytes(64, 64, seed=i))
        put(f"f20fail/p{i}.txt", f"caption {i}".encode())
    out = tmp_path / "m.parquet"
    build_index([f"s3://{BUCKET}/f20fail/"], out, progress=False, workers=1)
    previous = PreviousRows(Manifest.read(out).table)
    [task], _ = prefix_tasks(f"s3://{BUCKET}/f20fail/", 10**8, previous)  # unchanged images: only captions read
    monkeypatch.setattr("dali_arb.data.storage.base.BACKOFF_S", 0.001)
    with FaultProxy(s3.port, slow_down=1000) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(StorageError, match=f"s3://{BUCKET}/f20fail/p0.txt: the store .* kept failing"):
            remote_folder_task(task)


# -- the error model for local shards: a failing disk or system stops the run, never rejects good samples --------
class _FailingReads(io.FileIO):
    """A file whose reads fail with EIO after its first ``good`` bytes (a disk failing under a shard)."""

    good = 1024

    def read(self, size=-1):
        if self.tell() >= self.good:
            raise OSError(errno.EIO, os.strerror(errno.EIO), self.name)
        return super().read(size)


def test_a_failing_disk_or_system_under_a_shard_stops_the_index_and_a_missing_shard_is_a_reject(tmp_path, monkeypatch):
    """Issue 18's error model for shards (found by the review after f8 and f7 met): an OSError opening or reading a
    local shard was a reject ("unreadable tar shard"), so a disk failing or a process out of descriptors dropped
    every sample of the shard from the manifest; only the shard's own state (gone, a folder) is a reject."""
    from dali_arb.index.shards import shard_task

    shard = tmp_path / "00000.tar"
    appended_shard(shard)
    real_open = builtins.open

    def out_of_descriptors(file, *args, **kwargs):
        if str(file) == str(shard):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", out_of_descriptors)
    with pytest.raises(StorageError, match=r"00000\.tar: Too many open files; the disk or the system failed"):
        shard_task((str(shard), SMALL, []))

    def failing_reads(file, *args, **kwargs):
        return _FailingReads(str(file)) if str(file) == str(shard) else real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_reads)
    with pytest.raises(StorageError, match=r"00000\.tar: Input/output error"):
        shard_task((str(shard), SMALL, []))

    monkeypatch.setattr(builtins, "open", real_open)
    rows, rejects = shard_task((str(tmp_path / "gone.tar"), SMALL, []))
    assert rows == [] and rejects[0]["reason"].startswith("unreadable tar shard")
