"""Where the external source runs: threads of the training process, or DALI's worker processes.

=============  ==============================================  ==============================================
worker_kind    what runs the source                            costs and guarantees
=============  ==============================================  ==============================================
``thread``     ``workers`` threads of the training process     no process, no import, no ``/dev/shm``: the
(default)      (:class:`ThreadedSource`), each computing       rank's own libraries and mapped columns; the
               whole batches ahead of DALI                     decoding (libjpeg-turbo, OpenCV, Pillow) and
                                                               the reads release the GIL
``process``    DALI's parallel external source: ``workers``    crash isolation (a worker killed by the OOM
               spawned processes, batches handed over in       killer is restarted from), at about 100 MB
               ``/dev/shm``                                    PSS per worker (benchmarks/RESULTS.md)
=============  ==============================================  ==============================================

Either way each batch is a pure function of (epoch, step): which worker computes it changes nothing.
"""

from __future__ import annotations

import functools
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError

__all__ = ["WORKER_KINDS", "ThreadedSource", "check_worker_kind"]

WORKER_KINDS = ("thread", "process")
#: Names of the worker threads start with this.
THREAD_PREFIX = "dali_arb-worker"


def check_worker_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`WORKER_KINDS`, else a ConfigError echoing it."""
    if kind not in WORKER_KINDS:
        raise ConfigError(f"worker_kind must be 'thread' or 'process', got {kind!r}")
    return kind


class _Views:
    """The threads' views of one stream's source, closed with it: each has its own reads from object storage (a
    fetcher thread, its event loop and sockets). A view made after :meth:`close` (by a batch already running) is
    closed at once: its batch is dropped anyway."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: list[Any] = []
        self._closed = False

    def add(self, view: Any) -> Any:
        with self._lock:
            if not self._closed:
                self._views.append(view)
                return view
        _close(view)
        return view

    def close(self) -> None:
        with self._lock:
            self._closed = True
            views, self._views = self._views, []
        for view in views:
            _close(view)


def _close(view: Any) -> None:
    close = getattr(view, "close", None)
    if close is not None:
        close()


def _compute(base: Any, local: threading.local, views: _Views, iteration: int) -> tuple[list, ...]:
    """Batch ``iteration`` of ``base``'s stream, on this thread's own view of the source."""
    source = getattr(local, "source", None)
    if source is None:
        source = local.source = views.add(base.for_thread())
    return source(iteration)


class ThreadedSource:
    """A :class:`~dali_arb.loader.source.BatchSource` run on ``threads`` threads, ``depth`` batches ahead of DALI.

    DALI calls it as a plain (not parallel) external source, with iterations 0, 1, 2, ... in order: the call for
    iteration ``i`` makes sure iterations up to ``i + depth - 1`` are being computed, then waits for ``i``. Each
    thread works on whole batches with its own view of the source (:meth:`BatchSource.for_thread`: its own
    reads from object storage, the mapped arrays and the plan shared). An error raised by a batch is raised
    by the call for that iteration, as DALI's workers do.

    Args:
        source: the source; its arrays are set up here, once, before the threads share them.
        threads: threads computing batches (at least 1).
        depth: batches computed ahead (at least ``threads``, so that no thread is idle).
    """

    def __init__(self, source: Any, *, threads: int, depth: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
        _ = source.planner  # sets up the arrays and the plan, once, on this thread
        self.threads = threads
        self.depth = max(int(depth), threads)
        # the work items hold the source and a thread-local, not this object: dropping it ends the pool
        self._views = _Views()
        self._compute = functools.partial(_compute, source, threading.local(), self._views)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_PREFIX)
        self._futures: dict[int, Future] = {}
        self._next = 0  # the first iteration not submitted yet
        weakref.finalize(self, self._views.close)  # dropped without close(): the views' reads end all the same

    def __call__(self, batch_info: Any) -> tuple[list, ...]:
        iteration = int(batch_info if isinstance(batch_info, int) else batch_info.iteration)
        if iteration not in self._futures and iteration < self._next:  # asked again (never by DALI): compute it
            return self._compute(iteration)
        for stale in [i for i in self._futures if i < iteration]:  # skipped by the caller: never wanted
            self._futures.pop(stale).cancel()
        self._next = max(self._next, iteration)
        while self._next < iteration + self.depth:
            self._futures[self._next] = self._pool.submit(self._compute, self._next)
            self._next += 1
        return self._futures.pop(iteration).result()

    def close(self) -> None:
        """Cancel the batches not started and end the threads' reads from object storage (their fetcher threads
        are joined); the running batches end in the background, their results dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._futures.clear()
        self._views.close()
