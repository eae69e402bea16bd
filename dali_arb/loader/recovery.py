"""Keeping a run alive: watching DALI's worker processes while a batch is made, leaving a pipeline whose
worker died without waiting on it, and finding which samples of a failed batch DALI cannot decode.

Imports the standard library, NumPy, ``errors``, ``processes`` and (lazily) ``contracts``; DALI's backend only to
hand unused memory back after a failed run (:func:`release_unused_memory`).
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import DeviceError, ResourceError, Translation, is_out_of_memory
from ..processes import describe_exit

__all__ = ["MAX_WORKER_DEATHS", "OneAtATime", "Runner", "WorkerDied", "abandon", "culprits", "finalize_in_background",
           "first_dead", "probe", "run_watched", "worker_processes"]  # fmt: skip

#: A dead worker is noticed within WATCH_INTERVAL_S; the run gets WORKER_DEATH_GRACE_S more to end by itself.
WATCH_INTERVAL_S = 0.25
WORKER_DEATH_GRACE_S = 2.0
#: Worker deaths one loader restarts from before it stops with a ResourceError.
MAX_WORKER_DEATHS = 2


class WorkerDied(Exception):
    """A worker process of the running pipeline has ended."""

    def __init__(self, process: Any) -> None:
        super().__init__(f"worker {process.pid} {describe_exit(process.exitcode)}")
        self.process = process


def worker_processes(pipe: Any) -> list:
    """The ``multiprocessing.Process`` objects of a pipeline's parallel external source (DALI 1.x-2.x keep
    them at ``pipe._py_pool.pool._processes``), or ``[]``."""
    pool = getattr(getattr(pipe, "_py_pool", None), "pool", None)
    return list(getattr(pool, "_processes", None) or [])


def finalize_in_background(obj: Any) -> None:
    """Run ``obj``'s ``weakref.finalize`` callbacks now, on a daemon thread, instead of wherever it is collected.

    DALI closes a pipeline's worker pool in such a callback, and that close waits for its observer thread, which
    takes the lock of the pool's result queue: a worker killed while it held that lock (the OOM killer, or the
    loader ending the others after a death) leaves the close waiting forever. The training loop must not wait
    with it; the daemon thread ends with the process."""
    registry = getattr(weakref.finalize, "_registry", {})
    detached = [f.detach() for f in list(registry) if (f.peek() or (None,))[0] is obj]
    callbacks = [(func, args, kwargs) for _, func, args, kwargs in filter(None, detached)]  # not obj itself
    del detached

    def run() -> None:
        for func, args, kwargs in callbacks:
            with contextlib.suppress(Exception):
                func(*args, **(kwargs or {}))

    threading.Thread(target=run, name="dali_arb-closing-pipeline", daemon=True).start()


def first_dead(processes: list) -> Any:
    """The first of ``processes`` that has ended, or ``None``."""
    return next((p for p in processes if p.exitcode is not None), None)


def _serve_jobs(jobs: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
    """A runner thread's loop: run each job, hand back ``(ok, value)``; ``None`` ends it."""
    while (job := jobs.get()) is not None:
        try:
            results.put((True, job()))
        except BaseException as exc:
            results.put((False, exc))
        del job


class Runner:
    """A daemon thread that runs one callable at a time, so the caller can wait with a watch."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        # the thread holds the queues, not the runner, so the runner can be collected; its thread then ends
        thread = threading.Thread(target=_serve_jobs, args=(self._jobs, self._results), name="dali_arb-pipeline",
                                  daemon=True)  # fmt: skip
        thread.start()
        weakref.finalize(self, self._jobs.put, None)
        #: Jobs whose result was not taken (a wait interrupted by Ctrl-C): their results come first.
        self.owed = 0

    def run(self, job: Any, dead: Any, *, grace: float) -> Any:
        """``job()``'s result (or its exception); :class:`WorkerDied` when ``dead()`` names a process and
        no result comes within ``grace`` seconds after that."""
        self.owed += 1
        self._jobs.put(job)
        deadline = None
        while True:
            try:
                ok, value = self._results.get(timeout=WATCH_INTERVAL_S)
                self.owed -= 1
            except queue.Empty:
                corpse = dead()
                if corpse is not None:
                    deadline = deadline or time.monotonic() + grace
                    if time.monotonic() >= deadline:
                        raise WorkerDied(corpse) from None
                continue
            if ok:
                return value
            raise value


class OneAtATime:
    """An external source serving prepared samples one per run, from position ``start`` (for probing)."""

    def __init__(self, samples: tuple[list, ...], start: int) -> None:
        self.samples = samples
        self.start = start

    def __call__(self, batch_info) -> tuple[list, ...]:
        position = min(self.start + batch_info.iteration, len(self.samples[0]) - 1)
        return tuple([output[position]] for output in self.samples)


def probe(build: Callable[..., Any], samples: tuple[list, ...], *, device: str) -> list[int]:
    """Positions of ``samples`` (the source's outputs of one batch, each a list of B) that DALI's decoder on
    ``device`` cannot decode, each tried alone in one pipeline (``build(source, device=...)``) that is rebuilt
    only after a failure."""
    failed: list[int] = []
    count = len(samples[0])
    start = 0
    while start < count:
        done = 0
        try:
            pipe = build(OneAtATime(samples, start), device=device)
            while start + done < count:
                pipe.run()
                done += 1
            break
        except Exception as exc:
            if is_out_of_memory(exc):
                raise ResourceError(
                    f"the {device.upper()} ran out of memory while probing a failed batch; lower batch_size or prefetch"
                ) from None
            failed.append(start + done)
            start += done + 1
        finally:
            pipe = None
    return failed


def run_watched(run: Callable[[], Any], runner: Runner, processes: list) -> Any:
    """``run()`` (a pipeline's ``run``) on ``runner``'s thread while the worker ``processes`` are watched: one
    that dies (the OOM killer, ``kill -9``) can leave DALI blocked forever on a lock it held. Raises
    :class:`WorkerDied` when one has died."""

    def dead() -> Any:
        return first_dead(processes)

    try:
        return runner.run(run, dead, grace=WORKER_DEATH_GRACE_S)
    except WorkerDied:
        raise
    except Exception:
        corpse = dead()
        if corpse is not None:  # DALI noticed first ("Worker data receiving interrupted")
            raise WorkerDied(corpse) from None
        raise


def abandon(pipe: Any) -> None:
    """Leave a pipeline whose worker died: kill its other workers and close it on a daemon thread."""
    for process in worker_processes(pipe):
        if process.exitcode is None:
            process.kill()
    finalize_in_background(pipe)


def culprits(
    said: Translation,
    samples: tuple[list, ...],
    build: Callable[..., Any],
    *,
    device: str,
    decodes_in_dali: bool,
    cpu_probe: bool = True,
) -> list[int]:
    """Manifest rows of the samples (the source's outputs of the failed batch) that DALI cannot decode, found by
    :func:`probe`. ``said``: the failure's row of :data:`~dali_arb.errors.TABLE`; its error is raised when the
    files are not what failed (out of memory; the workers decode, so DALI only normalised), and a DeviceError when
    every sample fails alone too, or none does. ``cpu_probe``: probe on the CPU first (False for video on the GPU:
    the CPU video decoder refuses H.264 whatever the file)."""
    from .contracts import META

    if said.kind == "out_of_memory" or not decodes_in_dali:
        raise said.error
    rows = META.unpack(np.stack(samples[-1])).row  # (B, F): the source's outputs end with meta
    # the CPU decoder shares nvJPEG's parsers' verdict on broken files and costs far less to probe
    found = probe(build, samples, device="cpu") if cpu_probe or device != "gpu" else []
    if not found and device == "gpu":
        found = probe(build, samples, device="gpu")
    if not found or (len(found) == len(rows) > 1):
        what = "every sample of it fails alone too" if found else "each of its samples decodes alone"
        error = said.error
        raise DeviceError(
            f"the DALI pipeline failed in batch {error.step} of epoch {error.epoch} ({said.facts.summary}) and {what}: "
            "the decoder or device failed, not the files, so nothing was blocklisted; check the GPU (nvidia-smi) and "
            "restart from your checkpoint",
            epoch=error.epoch,
            step=error.step,
            cause=said.facts.summary,
            kind="device",
        ) from None
    return [int(rows[i]) for i in found]


def release_unused_memory(*, gpu: bool) -> None:
    """After a pipeline that hit a critical error was dropped: collect it now and, on a GPU, hand DALI's unused
    memory back, before anything else runs."""
    gc.collect()
    if gpu:
        with contextlib.suppress(Exception):
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()
