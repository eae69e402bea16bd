"""The loader's reader: many ranges at once (at most ``concurrency`` in flight), ranges of one object coalesced,
on a background event loop of its own thread.

Imports: the standard library, ``dali_arb.errors``, ``.base``, ``.schemes``, ``.retries``; obstore when it reads.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ...errors import StorageError
from .base import COALESCE_GAP, RETRIES, IOStats, Request, backoff
from .retries import HEALTH, check_size, check_version, translated
from .schemes import store_of


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """A fetcher's thread: run ``loop`` until stopped, then cancel what is left, wait for it, and close the loop
    (its selector and self-pipe: the thread leaves no descriptor behind)."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


class Fetcher:
    """Fetches many ranges concurrently (at most ``concurrency`` requests in flight) on an event loop of its own
    thread, coalescing ranges of one object that lie within :data:`COALESCE_GAP` of each other. One per process
    (worker processes make their own after they start)."""

    def __init__(self, *, concurrency: int = 32, stats: IOStats | None = None) -> None:
        self.concurrency = concurrency
        self.stats = stats or IOStats()
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()  # orders every schedule before the stop that close() schedules
        self._closed = False
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="dali_arb-fetcher", daemon=True)
        self._thread.start()
        self._gate: asyncio.Semaphore | None = None

    def close(self) -> None:
        """Cancel every fetch in flight (a waiting :meth:`fetch` raises ``CancelledError``; no ``done`` callback
        runs after this), end the thread and close its event loop. Idempotent; callable from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)  # after everything scheduled before it
        if threading.current_thread() is not self._thread:  # (a finalizer may run on the fetcher's own thread)
            self._thread.join()

    def _schedule(self, coroutine: Any) -> Any:
        """``coroutine`` running on the loop: its concurrent future, or None (and the coroutine dropped) once closed."""
        with self._lock:
            if not self._closed:
                return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        coroutine.close()
        return None

    def fetch(self, requests: list[Request]) -> list[bytes | StorageError]:
        """The bytes of each request (or the StorageError that ended it), in order; blocks until all are done.
        After :meth:`close`, a RuntimeError: nothing reads through a closed fetcher."""
        future = self._schedule(self._fetch(requests))
        if future is None:
            raise RuntimeError("dali_arb: a read through a fetcher that was closed with its pipeline")
        return future.result()

    def submit(self, requests: list[Request], done) -> None:
        """Fetch in the background; ``done(requests, results)`` runs on the fetcher's thread when all are done
        (never after :meth:`close`: a closed fetcher drops the submission)."""

        async def run() -> None:
            done(requests, await self._fetch(requests))

        self._schedule(run())

    async def _fetch(self, requests: list[Request]) -> list[bytes | StorageError]:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        results: list[bytes | StorageError | None] = [None] * len(requests)
        groups: dict[tuple[str, str | None], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.url, r.version), []).append(i)  # (one request reads one version)
        jobs = []
        for (url, _), members in groups.items():
            members.sort(key=lambda i: requests[i].start)
            run: list[int] = []
            for i in members:
                r = requests[i]
                if r.whole or (
                    run and (requests[run[-1]].whole or r.start - max(requests[j].end for j in run) > COALESCE_GAP)
                ):
                    if run:
                        jobs.append(self._span(url, run, requests, results))
                    run = []
                run.append(i)
            if run:
                jobs.append(self._span(url, run, requests, results))
        await asyncio.gather(*jobs)
        return results  # type: ignore[return-value]

    async def _span(self, url: str, members: list[int], requests: list[Request], results: list) -> None:
        """One request covering ``members`` (ranges of ``url``, one expected version), split into their results."""
        start = min(requests[i].start for i in members)
        end = max(requests[i].end for i in members)
        whole = len(members) == 1 and requests[members[0]].whole
        version = requests[members[0]].version
        try:
            data = await self._get(url, start, end, whole, version)
        except StorageError as exc:
            for i in members:
                results[i] = exc
            return
        self.stats.add(bytes_read=len(data))
        for i in members:
            r = requests[i]
            results[i] = data if r.end < 0 else data[r.start - start : r.end - start]

    async def _get(self, url: str, start: int, end: int, whole: bool, version: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``url``, or the whole object when ``whole`` (whose size must be ``end``, any
        size up to :func:`max_sample_bytes` when ``end`` is -1), with retries; a StorageError when it fails, an
        ObjectChanged when the object is not the indexed ``version`` (its ETag; None: not checked)."""
        import obstore

        store, key = store_of(url)
        for attempt in range(RETRIES + 1):
            HEALTH.check(url)
            async with self._gate:
                self.stats.add(requests=1)
                try:
                    if whole or version is not None:  # the GET's meta names the object read: the indexed one?
                        options: dict[str, Any] = {} if whole else {"range": (start, end)}
                        if version is not None:
                            options["if_match"] = version  # another version: 412, not its bytes
                        got = await obstore.get_async(store, key, options=options)
                        HEALTH.answered(url)
                        if whole:  # the object's size must still be the indexed one, and affordable
                            check_size(url, int(got.meta["size"]), end)
                        check_version(url, got.meta, version)
                        return bytes(await got.bytes_async())
                    data = bytes(await obstore.get_range_async(store, key, start=start, end=end))
                    HEALTH.answered(url)
                    return data
                except StorageError:
                    raise
                except Exception as exc:  # (412 to If-Match: the store answered, the object is another version)
                    said = translated(exc, url, retried=attempt, version=version)
                    if not HEALTH.settle(url, said) or attempt == RETRIES:
                        raise said.error from exc
                    self.stats.add(retries=1)
            await asyncio.sleep(backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover
