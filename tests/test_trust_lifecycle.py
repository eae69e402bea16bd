"""The loader's lifecycle (issue 18): Ctrl-C and going on, pipeline starts that leak nothing, the read-ahead
folder's life, the world from launchers' variables, temporary files, and the epochs and states it accepts."""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

from dali_arb import DALIBucketIterator
from dali_arb.source import BatchSource

from .conftest import SMALL
from .resume import assert_same_batches

KINDS = [(0, "thread"), (2, "thread"), pytest.param(1, "process", marks=pytest.mark.slow)]


def loader(manifest, **kw):
    options = {"batch_size": 4, "buckets": SMALL, "device": "cpu", "workers": 0, "dtype": "uint8", "seed": 3,
               "rank": 0, "world_size": 1, "flip": 0.5}  # fmt: skip
    return DALIBucketIterator(str(manifest), **{**options, **kw})


def served(it, total: int, *, body=lambda n: None) -> tuple[list[dict], int]:
    """``total`` batches from ``it``, iterated again after every KeyboardInterrupt (raised in the loader, or by
    ``body(n)`` after the ``n``-th batch was handed out) and at each epoch's end; the batches and the interrupts."""
    got, interrupts = [], 0
    while len(got) < total:
        try:
            for batch in it:
                got.append(batch)
                position = (batch["epoch"], batch["step"] + 1)
                state = it.state_dict()
                assert (state["epoch"], state["step"]) in (position, (batch["epoch"] + 1, 0))
                body(len(got))
                if len(got) == total:
                    break
        except KeyboardInterrupt:
            interrupts += 1
    return got, interrupts


def _sigint_main_thread() -> None:
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # what Ctrl-C does to the training loop


@pytest.mark.parametrize(("workers", "kind"), KINDS)
def test_f12_ctrl_c_while_the_loader_waits_then_going_on_loses_nothing(dataset, monkeypatch, workers, kind):
    """A SIGINT lands while the loader waits for a batch (at several moments of the wait); going on gave
    ``AssertionError: pipeline out of step`` (and under -O, batches of the wrong step)."""
    _, manifest = dataset
    total = 2 * len(loader(manifest)) + 2
    want, _ = served(loader(manifest, workers=workers, worker_kind=kind), total)
    run = DALIBucketIterator._run_pipeline
    delays = iter([0.0, None, 0.05, None, None, 0.3, 0.0, None, 0.01, None, 0.1, None, None, 0.0])

    def interrupted(self):
        delay = next(delays, None)
        if delay is None:
            return run(self)
        timer = threading.Timer(delay, _sigint_main_thread)
        timer.start()
        try:
            return run(self)
        finally:
            timer.join()  # the signal lands inside the loader: in the wait, or just after it

    monkeypatch.setattr(DALIBucketIterator, "_run_pipeline", interrupted)
    got, interrupts = served(loader(manifest, workers=workers, worker_kind=kind), total)
    assert interrupts >= 5
    assert_same_batches(got, want)


@pytest.mark.parametrize(("workers", "kind"), KINDS[:2])
def test_f12_a_source_that_raises_keyboard_interrupt_then_going_on_loses_nothing(dataset, monkeypatch, workers, kind):
    """The interrupt is raised by the source itself (where DALI calls back into Python), at three steps."""
    _, manifest = dataset
    steps = len(loader(manifest))
    total = 2 * steps + 1
    want, _ = served(loader(manifest, workers=workers, worker_kind=kind), total)
    batch = BatchSource.batch
    pending = {(0, 1), (0, steps - 1), (1, 2)}
    lock = threading.Lock()

    def interrupting(self, epoch, step):
        with lock:
            hit = (epoch, step) in pending
            pending.discard((epoch, step))
        if hit:
            raise KeyboardInterrupt
        return batch(self, epoch, step)

    monkeypatch.setattr(BatchSource, "batch", interrupting)
    got, interrupts = served(loader(manifest, workers=workers, worker_kind=kind), total)
    assert not pending and (interrupts == 3 if workers == 0 else interrupts >= 1)  # threads drop batches computed ahead
    assert_same_batches(got, want)


@pytest.mark.parametrize(("workers", "kind"), KINDS)
def test_f12_ctrl_c_in_the_training_body_then_a_checkpoint_and_going_on(dataset, workers, kind):
    """Interrupted in the body after batches 1, 3 and the epoch's last; the state taken then resumes a fresh loader
    at the next batch, and the interrupted loader itself goes on with it."""
    _, manifest = dataset
    steps = len(loader(manifest))
    total = 2 * steps
    want, _ = served(loader(manifest, workers=workers, worker_kind=kind), total)
    states = {}
    it = loader(manifest, workers=workers, worker_kind=kind)

    def body(n: int) -> None:
        if n in (1, 3, steps):
            states[n] = it.state_dict()
            raise KeyboardInterrupt

    got, interrupts = served(it, total, body=body)
    assert interrupts == 3
    assert_same_batches(got, want)
    fresh = loader(manifest, workers=workers, worker_kind=kind)
    fresh.load_state_dict(states[3])
    assert_same_batches(served(fresh, total - 3)[0], want[3:])


def test_f12_a_pipeline_out_of_step_is_a_loud_error_even_under_python_O(dataset):
    """``_to_batch`` checked the step with ``assert``: under -O a batch of another step went out as this one."""
    _, manifest = dataset
    it = loader(manifest)
    it._open_pipeline(0, 0)
    outputs = it._run_pipeline()
    with pytest.raises(RuntimeError, match=r"pipeline produced epoch 0 step 0 .* expected epoch 0 step 1") as caught:
        it._to_batch(outputs, 0, 1)
    assert not isinstance(caught.value, AssertionError)
    assert np.array_equal(next(iter(it))["images"].numpy(), loader(manifest).__iter__().__next__()["images"].numpy())
