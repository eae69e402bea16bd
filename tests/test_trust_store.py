"""A failing store or OS stops the run fast and never blocklists (issue 18: findings 4, 13, 17, 18, 23, 25b, 25c).

Everything runs against real servers on loopback (moto's S3 in its own process, the fault proxy, HTTP servers)
and real files; the loader runs in real worker threads and processes."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dali_arb import Manifest
from dali_arb.cli import main
from dali_arb.data.storage import Fetcher, IOStats, Request, get_bytes
from dali_arb.errors import StorageError
from dali_arb.index import build_index
from dali_arb.loader.contracts import Failure
from support.loopback import FaultProxy, RangeHTTPServer, moto_s3, put_object

from .conftest import SMALL, small_loader

BUCKET = "trust"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def put(key: str, data: bytes) -> None:
    put_object(BUCKET, key, data)


@pytest.fixture(scope="module")
def s3(dataset, tmp_path_factory):
    """moto's S3 with the photo dataset under ``photos/``; yields ``(server, folder, remote manifest)``."""
    import boto3

    folder = dataset[0]
    root = tmp_path_factory.mktemp("trust")
    with moto_s3() as server:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        for f in sorted(folder.iterdir()):
            put(f"photos/{f.name}", f.read_bytes())
        build_index([f"s3://{BUCKET}/photos/"], root / "remote.parquet", progress=False)
        yield server, folder, root / "remote.parquet"


def loader(manifest, **kw):
    return small_loader(manifest, **kw)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -- 4: a short outage never blocklists good samples --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("workers", "kind"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_f4_a_503_burst_stops_the_loader_blocklists_nothing_and_a_resume_serves_everything(
    s3, monkeypatch, workers, kind
):
    """Finding 4: a 503 burst longer than the retries raised out of the loader as one StorageError line naming the
    store and the cause; ``loader.failed`` stays empty; a new loader resumed from the last state serves the rest."""
    server, _, manifest = s3
    everything = [k for batch in loader(str(manifest)) for k in batch["ids"]]
    monkeypatch.setattr("dali_arb.data.storage.base.BACKOFF_S", 0.01)
    with FaultProxy(server.port, skip=10, slow_down=10**9) as proxy:  # after 10 GETs every GET is a 503
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        it = loader(str(manifest), workers=workers, worker_kind=kind)
        served, state = [], it.state_dict()
        with pytest.raises(StorageError) as caught:
            for batch in it:
                served += batch["ids"]
                state = it.state_dict()
        text = one_line(caught.value)
        assert f"s3://{BUCKET}/photos/" in text and "503" in text and "SlowDown" in text, text
        assert it.failed == [] and state["failed"] == {}
        proxy.slow_down = 0  # the store is healthy again
        resumed = loader(str(manifest), workers=workers, worker_kind=kind)
        resumed.load_state_dict(state)
        served += [k for batch in resumed for k in batch["ids"]]
        assert resumed.failed == []
    assert sorted(served) == sorted(everything) and len(served) == len(everything)


def test_f4_local_os_failures_raise_and_a_missing_file_is_the_samples_own(fresh_dataset):
    """Finding 4, local files: EMFILE (the process ran out of file descriptors) is the OS failing, raised as a
    StorageError naming the file and errno; ENOENT is the sample's own (gone) and replaced."""
    from dali_arb.loader.decoders import PillowDecoder
    from dali_arb.loader.planning import LoaderConfig
    from dali_arb.loader.source import BatchSource

    _, manifest = fresh_dataset
    config = LoaderConfig(4, SMALL, 0, 0, 1, "nearest", True, "random", 0.0)
    source = BatchSource(Manifest.read(manifest), config, PillowDecoder())
    data, failure = source.read(0)
    assert data is not None and failure == Failure.NONE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 1, hard))
    taken = []
    try:
        with contextlib.suppress(OSError):  # every descriptor is taken
            while len(taken) < 4096:
                taken.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(StorageError) as caught:
            source.read(0)
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    text = one_line(caught.value)
    assert "EMFILE" in text and source.location(0) in text, text
    os.unlink(source.location(0))
    assert source.read(0) == (None, Failure.MISSING)


# -- 13: an unreachable store stops the run within a bound ---------------------------------------------------
@contextlib.contextmanager
def unreachable(kind: str):
    """A loopback endpoint that never answers: ``closed`` (nothing listens), ``silent`` (connections are accepted
    by the kernel, nothing is ever sent back) or ``blackhole`` (its accept queue is full: SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held = []
    try:
        if kind == "closed":
            listener.close()
        else:
            listener.listen(0)
            if kind == "blackhole":  # fill the accept queue: further connection attempts hang
                for _ in range(8):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    held.append(s)
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in held:
            s.close()
        listener.close()


LOAD = textwrap.dedent(
    """
    import sys, time
    from dali_arb import DALIBucketIterator, BucketSpec
    from dali_arb.errors import StorageError
    spec = BucketSpec(max_area=160 * 240, min_dim=64, max_dim=320, step=32, base=(160, 160))
    it = DALIBucketIterator(sys.argv[1], batch_size=4, buckets=spec, device="cpu", workers=1, dtype="uint8")
    start = time.monotonic()
    try:
        next(iter(it))
    except StorageError as exc:
        print(f"{time.monotonic() - start:.1f} {exc}")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["closed", "silent", "blackhole"])
def test_f13_an_unreachable_store_stops_the_loader_and_the_indexer_within_the_deadline(s3, tmp_path, kind):
    """Finding 13: with the store unreachable, the loader's first batch and ``dali-arb index`` end within the
    store deadline (set low here) plus a request's timeout, with one line naming the store and the cause."""
    _, _, manifest = s3
    bound = 25.0
    with unreachable(kind) as endpoint:
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "DALI_ARB_STORE_DEADLINE_S": "2", "PYTHONPATH": ROOT}
        start = time.monotonic()
        try:
            run = subprocess.run([sys.executable, "-c", LOAD, str(manifest)], env=env, capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"the loader was still trying after 120 s ({kind} endpoint)")
        took = time.monotonic() - start
        lines = run.stdout.strip().splitlines()
        assert len(lines) == 1 and took < bound + 15, (took, run.stdout, run.stderr[-2000:])
        seconds, _, text = lines[0].partition(" ")
        assert float(seconds) < bound and f"s3://{BUCKET}" in text, text
        assert any(cause in text for cause in ("timed out", "refused", "answered nothing")), text
        start = time.monotonic()
        try:
            run = subprocess.run([sys.executable, "-m", "dali_arb", "index", f"s3://{BUCKET}/photos/", "-o",
                                  str(tmp_path / "m.parquet"), "-q"], env=env, capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"dali-arb index was still trying after 120 s ({kind} endpoint)")
        took = time.monotonic() - start
        err = run.stderr.strip()
        assert run.returncode != 0 and "\n" not in err and f"s3://{BUCKET}" in err, err
        assert took < bound + 10, (took, err)


def test_f13_past_the_deadline_requests_fail_at_once_and_one_per_deadline_finds_the_store_back(tmp_path, monkeypatch):
    """Finding 13: once a store has answered nothing for the deadline, a request fails at once without being sent;
    one request per further deadline goes through, so a store that is back is used again."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    monkeypatch.setenv("DALI_ARB_STORE_DEADLINE_S", "1")
    monkeypatch.setattr("dali_arb.data.storage.base.BACKOFF_S", 0.01)
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.jpg"
    with pytest.raises(StorageError, match="refused"):
        get_bytes(url)  # nothing listens: refused, retried
    time.sleep(1.1)
    stats, start = IOStats(), time.monotonic()
    with pytest.raises(StorageError) as caught:
        get_bytes(url, stats)
    assert stats.requests == 0 and time.monotonic() - start < 0.5
    assert f"http://127.0.0.1:{port} answered nothing for 1 s" in one_line(caught.value)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        time.sleep(1.1)
        assert get_bytes(url) == b"\xff\xd8\xff\xd9"
    finally:
        server.shutdown()
        server.server_close()


# -- 17: what one sample may cost ------------------------------------------------------------------------------
def _padded_metadata(tmp_path, dataset, paths) -> str:
    """img2dataset-style metadata (no lengths) naming ``paths`` (one per photo of the dataset manifest)."""
    table = Manifest.read(dataset[1]).table
    meta = tmp_path / "meta.parquet"
    keys = table.column("key").to_pylist()[: len(paths)]
    pq.write_table(pa.table({"key": keys, "width": table.column("width").to_pylist()[: len(paths)],
                             "height": table.column("height").to_pylist()[: len(paths)], "path": paths}), meta)  # fmt: skip
    build_index([str(meta)], tmp_path / "m.parquet", progress=False)
    # unknown lengths, as manifests written before the indexer recorded objects' sizes (f3) hold them: the size
    # is learnt from the GET (or fstat) alone
    indexed = pq.read_table(tmp_path / "m.parquet")
    unknown = pa.array([-1] * indexed.num_rows, pa.int64())
    indexed = indexed.set_column(indexed.schema.get_field_index("length"), "length", unknown)
    pq.write_table(indexed.drop_columns([c for c in ("source_size", "etag") if c in indexed.column_names]),
                   tmp_path / "m.parquet")  # fmt: skip
    assert Manifest.read(tmp_path / "m.parquet").int_column("length", -1)[0] == -1
    return str(tmp_path / "m.parquet")


def test_f17_a_sample_over_the_size_cap_is_a_too_large_failure_never_read_whole(tmp_path, dataset, monkeypatch):
    """Finding 17, local files: a row of unknown length naming a file over MAX_SAMPLE_BYTES (lowered here) is
    replaced with the reason "too large", read never (its size comes from fstat)."""
    from dali_arb.data import storage

    assert storage.MAX_SAMPLE_BYTES == 256 << 20
    photos = sorted(dataset[0].glob("*.jpg"))[:12]
    big = tmp_path / "big.jpg"
    big.write_bytes(photos[0].read_bytes() + bytes(3 << 20))  # a real JPEG followed by 3 MiB
    manifest = _padded_metadata(tmp_path, dataset, [str(big)] + [str(p) for p in photos[1:]])
    monkeypatch.setenv("DALI_ARB_MAX_SAMPLE_BYTES", str(2 << 20))
    it = loader(manifest)
    served = [k for batch in it for k in batch["ids"]]
    key = Manifest.read(manifest).table.column("key")[0].as_py()
    assert key not in served and len(served) == 12
    reason = it.state_dict()["failed"][key]
    assert "too large" in reason and str(big) in reason and "DALI_ARB_MAX_SAMPLE_BYTES" in reason, reason


def test_f17_an_object_over_the_size_cap_is_too_large_from_its_meta(s3, tmp_path, dataset, monkeypatch):
    """Finding 17, object storage: an object of unknown length over the cap is "too large" from the GET's meta
    (its body never read); the others of unknown length are served (not "changed since indexing")."""
    _, folder, _ = s3
    photos = sorted(folder.glob("*.jpg"))[:12]
    put("big/big.jpg", photos[0].read_bytes() + bytes(3 << 20))
    urls = [f"s3://{BUCKET}/big/big.jpg"] + [f"s3://{BUCKET}/photos/{p.name}" for p in photos[1:]]
    manifest = _padded_metadata(tmp_path, dataset, urls)
    monkeypatch.setenv("DALI_ARB_MAX_SAMPLE_BYTES", str(2 << 20))
    it = loader(manifest)
    served = [k for batch in it for k in batch["ids"]]
    key = Manifest.read(manifest).table.column("key")[0].as_py()
    assert key not in served and len(served) == 12
    assert list(it.state_dict()["failed"]) == [key]
    assert "too large" in it.state_dict()["failed"][key]
    assert it.stats["bytes_read"] < 2 << 20  # the big body was never read


# -- 18: a server without ranges, credentials rejected mid-run -------------------------------------------------
def test_f18_a_server_that_ignores_range_requests_is_named_not_blamed_on_the_files(s3, tmp_path):
    """Finding 18: shards on an HTTP server that answers 200 with the whole body to a Range request index (whole
    downloads), then the loader stops with one line saying the server ignores Range requests; nothing blocklisted."""
    _, folder, _ = s3
    site = tmp_path / "site"
    site.mkdir()
    photos = sorted(folder.glob("*.jpg"))
    for s in range(2):
        with tarfile.open(site / f"{s:05d}.tar", "w") as tar:
            for p in photos[s::2]:
                tar.add(p, arcname=p.name)
    with RangeHTTPServer(site, ranges=False) as http:
        build_index([f"{http.url}/{s:05d}.tar" for s in range(2)], tmp_path / "m.parquet", progress=False)
        it = loader(str(tmp_path / "m.parquet"))
        with pytest.raises(StorageError) as caught:
            list(it)
    text = one_line(caught.value)
    assert "ignores Range requests" in text and http.url in text, text
    assert it.failed == []


@pytest.mark.slow
def test_f18_credentials_revoked_mid_run_stop_the_loader_and_blame_the_credentials(tmp_path, dataset, monkeypatch):
    """Finding 18: credentials rejected mid-run (the access key deleted) raise "credentials rejected" out of the
    loader; nothing blocklisted."""
    import boto3

    folder = dataset[0]
    with moto_s3(auth_after=3):
        iam = boto3.client("iam", region_name="us-east-1")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument='{"Version": "2012-10-17", '
                            '"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}')  # fmt: skip
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        trainer = boto3.session.Session(key["AccessKeyId"], key["SecretAccessKey"], region_name="us-east-1")
        trainer.client("s3").create_bucket(Bucket=BUCKET)
        for f in sorted(folder.glob("*.jpg"))[:16]:
            put(f"photos/{f.name}", f.read_bytes())
        build_index([f"s3://{BUCKET}/photos/"], tmp_path / "m.parquet", progress=False)
        it = loader(str(tmp_path / "m.parquet"), read_ahead=0)
        batches = iter(it)
        next(batches)
        trainer.client("iam").delete_access_key(UserName="trainer", AccessKeyId=key["AccessKeyId"])
        with pytest.raises(StorageError) as caught:
            list(batches)
    text = one_line(caught.value)
    assert "credentials rejected" in text and f"s3://{BUCKET}/photos/" in text, text
    assert it.failed == []


# -- 23: redirects to another origin ----------------------------------------------------------------------------
@contextlib.contextmanager
def redirecting():
    """``(origin URL, seen)``: a server on 127.0.0.1 answering every GET with 302 to another origin
    (``localhost``, another host name, and another port) whose server records the headers it receives."""
    seen: list[dict] = []

    class Target(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            body = b"\xff\xd8\xff\xd9"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")
            self.end_headers()
            self.wfile.write(body)

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Origin(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{target.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    for server in (target, origin):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{origin.server_address[1]}", seen
    finally:
        for server in (target, origin):
            server.shutdown()
            server.server_close()


def test_f23_redirects_to_another_origin_are_refused_and_the_session_token_stays_home(monkeypatch):
    """Finding 23: a 302 to another origin is not followed, for http(s):// and s3:// alike (the session token never
    reaches the other host); one line says so and how to allow it; DALI_ARB_FOLLOW_REDIRECTS=1 follows them."""
    with redirecting() as (origin, seen):
        with pytest.raises(StorageError) as caught:
            get_bytes(f"{origin}/x.jpg")
        text = one_line(caught.value)
        assert "redirected" in text and "DALI_ARB_FOLLOW_REDIRECTS" in text and f"{origin}/x.jpg" in text, text
        monkeypatch.setenv("AWS_ENDPOINT_URL", origin)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET")
        monkeypatch.setenv("AWS_SESSION_TOKEN", "SESSION-TOKEN-1234")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        with pytest.raises(StorageError) as caught:
            get_bytes("s3://bucket/x.jpg")
        assert "redirected" in one_line(caught.value)
        fetcher = Fetcher()  # the loader's reader
        (result,) = fetcher.fetch([Request("s3://bucket/x.jpg", 0, 4, whole=True)])
        fetcher.close()
        assert isinstance(result, StorageError) and "redirected" in str(result), result
        assert seen == []  # nothing, and no token, reached the other origin
        monkeypatch.setenv("DALI_ARB_FOLLOW_REDIRECTS", "1")
        assert get_bytes(f"{origin}/x.jpg") == b"\xff\xd8\xff\xd9" and len(seen) == 1


# -- 25b, 25c -------------------------------------------------------------------------------------------------
def test_f25b_a_client_error_on_a_key_with_50x_in_its_name_is_not_retried(s3, tmp_path):
    """Finding 25b: the store's answer decides, not words in the URL: a range past the end of ``img-503.jpg`` (416,
    the object is shorter than indexed: the sample's own) fails at once, not retried six times because the URL in
    the message holds "503" (or "connection", "timeout"); a missing one is a 404 at once."""
    from dali_arb.data.storage import get_range
    from dali_arb.errors import ObjectChanged, ObjectMissing

    site = tmp_path / "site"
    site.mkdir()
    for name in ("img-503.jpg", "connection-reset.jpg"):
        (site / name).write_bytes(b"\xff\xd8" + bytes(8))
    with RangeHTTPServer(site) as http:
        for name in ("img-503.jpg", "connection-reset.jpg"):
            stats = IOStats()
            with pytest.raises(StorageError) as caught:
                get_range(f"{http.url}/{name}", 20, 30, stats)
            assert stats.requests == 1 and stats.retries == 0, (name, stats)
            assert isinstance(caught.value, ObjectChanged), caught.value
    stats = IOStats()
    with pytest.raises(ObjectMissing):
        get_bytes(f"s3://{BUCKET}/photos/img_503.jpg", stats)
    assert stats.requests == 1 and stats.retries == 0, stats


def test_f25c_a_manifest_with_urls_after_its_first_rows_reads_from_storage(s3, dataset):
    """Finding 25c: ``has_urls`` looks at every row: 100 local rows then URLs is a manifest with URLs."""
    from dali_arb.loader.source import has_urls

    local = Manifest.read(dataset[1]).table
    remote = Manifest.read(s3[2]).table
    rows = pa.concat_tables([local] * 3 + [remote.cast(local.schema)])
    assert len(local) * 3 >= 64
    mixed = Manifest(rows)
    assert has_urls(mixed) and not has_urls(Manifest(local))
    encoded = rows.set_column(rows.schema.get_field_index("source"), "source", pc.dictionary_encode(rows["source"]))
    assert has_urls(Manifest(encoded))  # a dictionary column: its distinct values are looked at


@pytest.mark.slow
def test_f4_a_503_burst_while_indexing_stops_the_index_instead_of_rejecting_good_images(
    s3, tmp_path, monkeypatch, capsys
):
    """Finding 4, indexing: images whose header reads meet a 503 burst are not rejected as "unreadable" (lost from
    the manifest): the indexing stops with one line naming the store's answer."""
    server, _, _ = s3
    monkeypatch.setattr("dali_arb.data.storage.base.BACKOFF_S", 0.01)
    with FaultProxy(server.port, skip=4, slow_down=10**9) as proxy:  # the listing and a few headers pass
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        code = main(["index", f"s3://{BUCKET}/photos/", "-o", str(tmp_path / "m.parquet"), "-q", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not (tmp_path / "m.parquet").exists(), err
    assert "\n" not in err and "503" in err and "SlowDown" in err, err
