"""Worker threads (``worker_kind="thread"``, the default) against DALI's worker processes."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dali_arb import ConfigError, DALIBucketIterator, DataError
from dali_arb.loader.workers import ThreadedSource

from .conftest import SMALL, copy_photos
from .test_reliability import index


def loader(manifest, **kw):
    options = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3,
               "rank": 0, "world_size": 1}  # fmt: skip
    options.update(kw)
    return DALIBucketIterator(str(manifest), **options)


def served(it, epochs: int = 2) -> list[tuple]:
    out = []
    for _ in range(epochs):
        for batch in it:
            position = (batch["epoch"], batch["step"], batch["ids"])
            out.append((*position, batch["images"].numpy().copy(), batch["flipped"].tolist(),
                        batch["crop_top_left"].tolist()))  # fmt: skip
    return out


def test_threads_processes_and_the_main_thread_serve_identical_batches(dataset):
    _, manifest = dataset
    reference = served(loader(manifest, workers=0, flip=0.5))
    for workers, kind in ((1, "thread"), (3, "thread"), (2, "process")):
        got = served(loader(manifest, workers=workers, worker_kind=kind, flip=0.5))
        assert len(got) == len(reference) > 4
        for a, b in zip(got, reference):
            assert a[:3] == b[:3] and np.array_equal(a[3], b[3]) and a[4:] == b[4:], (workers, kind, a[:2])


def _children() -> set[int]:
    return {int(p) for path in Path("/proc/self/task").glob("*/children") for p in path.read_text().split()}


def test_worker_threads_start_no_process_and_end_with_their_pipeline(dataset):
    _, manifest = dataset
    before, threads_before = _children(), set(threading.enumerate())
    it = loader(manifest, workers=2)
    batches = iter(it)
    next(batches)
    assert _children() == before  # no worker process, no resource tracker
    workers = [t for t in set(threading.enumerate()) - threads_before if t.name.startswith("dali_arb-worker")]
    assert len(workers) == 2
    it._close_pipeline()  # what resuming, set_epoch and recoveries do
    for t in workers:
        t.join(timeout=10)
    assert not [t for t in workers if t.is_alive()]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_data_error_in_a_worker_reaches_the_training_loop_as_is(tmp_path, dataset, kind):
    """A worker process's DataError reached the loop as "DeviceError: the DALI pipeline failed ... check the GPU"
    (DALI hands it on as a plain Exception holding the traceback's text)."""
    folder, _ = dataset
    work = copy_photos(folder, tmp_path / "p")
    out = tmp_path / "m.parquet"
    index([work], out)
    for f in work.glob("*.jpg"):
        f.write_bytes(b"")
    with pytest.raises(DataError, match=r"no readable image left in bucket \d+x\d+ .*re-index"):
        next(iter(loader(out, workers=2, worker_kind=kind)))


def test_worker_kind_is_validated(dataset):
    _, manifest = dataset
    with pytest.raises(ConfigError, match="worker_kind must be 'thread' or 'process', got 'fork'"):
        loader(manifest, worker_kind="fork")


# -- ThreadedSource on its own ------------------------------------------------------------------------
class FakeSource:
    """Batch ``i`` is ``(i,)``; records which iterations were asked, and from which threads."""

    planner = None

    def __init__(self, *, barrier: threading.Barrier | None = None, fail_at: int = -1) -> None:
        self.asked: list[int] = []
        self.threads: set[str] = set()
        self.views = 0
        self.barrier, self.fail_at = barrier, fail_at
        self.lock = threading.Lock()

    def for_thread(self) -> FakeSource:
        with self.lock:
            self.views += 1
        return self

    def __call__(self, iteration: int) -> tuple[int]:
        with self.lock:
            self.asked.append(iteration)
            self.threads.add(threading.current_thread().name)
        if self.barrier is not None and iteration < self.barrier.parties:
            self.barrier.wait(timeout=10)  # passes only when that many batches are computed at once
        if iteration == self.fail_at:
            raise DataError(f"batch {iteration} cannot be served")
        return (iteration,)


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_threaded_source_computes_batches_ahead_in_parallel_and_in_order():
    fake = FakeSource(barrier=threading.Barrier(3))
    threaded = ThreadedSource(fake, threads=3, depth=5)
    try:
        assert [threaded(i) for i in range(12)] == [(i,) for i in range(12)]
        _wait_until(lambda: len(fake.asked) >= 16)
        time.sleep(0.1)
        assert sorted(fake.asked) == list(range(16))  # every batch once; 5 ahead of the last asked
        assert len(fake.threads) == 3 and fake.views == 3  # one view of the source per thread
    finally:
        threaded.close()


def test_threaded_source_raises_an_error_at_its_batch_and_goes_on():
    fake = FakeSource(fail_at=3)
    threaded = ThreadedSource(fake, threads=2, depth=4)
    try:
        assert [threaded(i) for i in range(3)] == [(0,), (1,), (2,)]  # batch 3 failed already, unseen
        with pytest.raises(DataError, match="batch 3 cannot be served"):
            threaded(3)
        assert threaded(4) == (4,)
    finally:
        threaded.close()


def test_threaded_source_close_drops_the_batches_not_started():
    gate, running = threading.Event(), threading.Event()

    class Slow(FakeSource):
        def __call__(self, iteration):
            if iteration > 0:  # batch 1 runs until the gate opens; 2-7 wait behind it
                running.set()
                gate.wait(timeout=10)
            return super().__call__(iteration)

    fake = Slow()
    threaded = ThreadedSource(fake, threads=1, depth=8)
    assert threaded(0) == (0,)
    assert running.wait(timeout=10)
    threaded.close()
    gate.set()
    _wait_until(lambda: len(fake.asked) >= 2)
    time.sleep(0.2)
    assert fake.asked == [0, 1]  # the running one ended; none of the 6 queued behind it ran


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_threaded_source_needs_a_positive_thread_count(threads):
    with pytest.raises(ConfigError, match=f"threads must be a positive integer, got {threads!r}"):
        ThreadedSource(FakeSource(), threads=threads, depth=2)


def test_views_share_the_set_up_instead_of_mapping_and_planning_again(dataset):
    """``starting_at`` and ``for_thread`` went through ``__getstate__`` (``copy.copy``), which drops the arrays and
    the planner for worker processes: every view mapped the caches again, and threads doing that at once hit
    CPython 3.11's ``AST constructor recursion depth mismatch`` inside ``np.load``."""
    _, manifest = dataset
    source = loader(manifest)._source
    restarted = source.starting_at(0, 1, frozenset())
    view = restarted.for_thread()
    for copy in (restarted, view):
        assert copy._ready and copy._planner is source._planner and copy._datasets is source._datasets
    assert view.remote is not restarted.remote  # reads from object storage are each thread's own
    assert view.first_step == 1 and view.batch(0, 1)[-1][0].tolist() == restarted.batch(0, 1)[-1][0].tolist()


def test_the_planner_serves_epochs_to_several_threads_at_once(dataset):
    """The planner's cache of recent epochs was changed in place: threads planning epochs at once deleted the
    same entry twice (KeyError) or iterated it while another changed it."""
    _, manifest = dataset
    planner = loader(manifest)._planner
    expected = {e: planner.epoch(e).rows_at(0).tolist() for e in range(6)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def hammer(offset: int) -> None:
        try:
            start.wait(timeout=10)
            for i in range(1000):
                e = (i + offset) % 6
                assert planner.epoch(e).rows_at(0).tolist() == expected[e]
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: races show within the run
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    seen = planner._cache  # and deterministically: a reader's view of the cache never changes under it
    snapshot = dict(seen)
    planner.epoch(max(expected) + 1)
    assert seen == snapshot and planner._cache is not seen


def test_abandoning_a_pipeline_never_waits_for_dali_to_close_its_pool(dataset):
    """DALI closes a pipeline's worker pool in a finalizer that joins its observer thread; a worker killed while it
    held the pool's result-queue lock leaves that join waiting forever (seen in CI: the killed-worker test hung in
    ``Observer.close``). The loader must go on; the close runs on a daemon thread."""
    import weakref

    from dali_arb.loader.recovery import WorkerDied as _WorkerDied

    _, manifest = dataset
    it = loader(manifest)
    never = threading.Event()
    closing = threading.Event()

    class Pipe:  # a pipeline whose pool close blocks, as DALI's does then
        pass

    def close(event):
        closing.set()
        event.wait()

    it._pipe = Pipe()
    weakref.finalize(it._pipe, close, never)

    class Dead:
        pid, exitcode = 12345, -9

    done = threading.Event()

    def abandon():
        it._abandon_pipeline(_WorkerDied(Dead()))
        done.set()

    threading.Thread(target=abandon, daemon=True).start()
    assert done.wait(timeout=10), "the training loop waited for the pool to close"
    assert closing.wait(timeout=10)  # the close did run, elsewhere
    never.set()
