"""Process hygiene shared by the indexer's and the loader's worker processes."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["describe_exit", "die_with_parent", "signals_deferred", "spawn_without_main", "stop_pool"]


def die_with_parent() -> None:
    """In a worker process: end when the parent process ends (Linux ``PR_SET_PDEATHSIG``), so a killed
    ``dali-arb index`` or training process leaves no orphaned workers behind."""
    import ctypes
    import multiprocessing
    import signal

    parent_process = multiprocessing.parent_process()
    parent = parent_process.pid if parent_process is not None else os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to set
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def describe_exit(exitcode: int | None) -> str:
    """A worker's end in words: ``killed by signal 9 (SIGKILL: the out-of-memory killer, or kill -9)``."""
    import signal

    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ": the out-of-memory killer, or kill -9" if name == "SIGKILL" else ""
        return f"killed by signal {-exitcode} ({name}{hint})"
    return f"exited with status {exitcode}"


@contextlib.contextmanager
def spawn_without_main():
    """Start "spawn" worker processes without re-importing the program's ``__main__``.

    Spawned workers normally import the main script again: that fails for stdin and notebooks, and re-runs a
    script that lacks an ``if __name__ == "__main__"`` guard in every worker (a training script, or a script
    that builds an index). The workers' code lives in dali_arb's modules, so they never need ``__main__``. Keep
    every start of a worker inside this block.
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        for name in saved:
            if name == "__spec__":
                main.__spec__ = None
            else:
                delattr(main, name)
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def stop_pool(pool: object) -> None:
    """Stop a ``ProcessPoolExecutor`` on the way out of an error, Ctrl-C or SIGTERM, whatever state the
    interruption left it in, and never raise or wait on a task: the exception that brought us here is the one
    to report. The workers are killed (they only read files; nothing of theirs is kept).

    A SIGTERM landing inside ``submit`` left the pool's manager thread created but not started, and
    ``shutdown(wait=True)`` then raised ``cannot join thread before it is started``; hence no waiting here, and
    ``submit`` itself runs under :func:`signals_deferred` so that no worker is started unregistered.
    """
    workers = list((getattr(pool, "_processes", None) or {}).values())
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[attr-defined]
    for process in workers:
        with contextlib.suppress(Exception):
            process.kill()
    for process in workers:
        with contextlib.suppress(Exception):
            process.join(timeout=10)


@contextlib.contextmanager
def signals_deferred(*signums: int) -> Iterator[None]:
    """Hold ``signums`` (default SIGINT and SIGTERM) for the duration of a short critical section, then deliver
    what arrived to the handlers in place before. A ``ProcessPoolExecutor.submit`` interrupted between starting a
    worker and registering it leaves a worker nobody stops, and the interpreter's exit then waits on it forever
    (3 runs in 25 of the SIGTERM test). Outside the main thread (no signal handlers there) it does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = signums or (signal.SIGINT, signal.SIGTERM)
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
