"""The loader's lifecycle (issue 18): Ctrl-C and going on, pipeline starts that leak nothing, the read-ahead
folder's life, the world from launchers' variables, temporary files, and the epochs and states it accepts."""

from __future__ import annotations

import collections
import gc
import os
import signal
import tempfile
import threading
import time

import numpy as np
import pytest

from dali_arb import ConfigError, DALIBucketIterator, StateError
from dali_arb.loader.source import BatchSource

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


# -- 14: pipeline starts leak nothing; the read-ahead folder dies with its loader --------------------------------
BUCKET = "lifecycle"


@pytest.fixture(scope="module")
def s3_manifest(dataset, tmp_path_factory):
    """moto's S3 (loopback) holding the photos, and a manifest of them indexed from there: ``(server, manifest)``."""
    import boto3
    import obstore
    from obstore.store import S3Store

    from dali_arb.index import build_index
    from support.loopback import moto_s3

    folder, _ = dataset
    manifest = tmp_path_factory.mktemp("s3m") / "m.parquet"
    with moto_s3() as server:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        store = S3Store(BUCKET, client_options={"allow_http": True})
        for f in sorted(folder.iterdir()):
            obstore.put(store, f"photos/{f.name}", f.read_bytes())
        build_index([f"s3://{BUCKET}/photos/"], manifest, progress=False)
        yield server, manifest


def _fetcher_threads() -> int:
    return sum(t.name == "dali_arb-fetcher" for t in threading.enumerate())


def _open_fds() -> list[str]:
    """What this process's descriptors point at (sockets and pipes by kind only: their inodes change)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}").split(":")[0])
        except OSError:
            pass  # the listing's own descriptor
    return sorted(out)


def _read_ahead_folders() -> set[str]:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return {p for p in os.listdir(base) if p.startswith(f"dali_arb-readahead-{os.getpid()}-")}


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "kind"), KINDS[:2])
def test_f14_twenty_pipeline_starts_leak_no_fetcher_thread_and_no_descriptor(s3_manifest, workers, kind):
    """Every start (set_epoch after a break, load_state_dict, a recovery) left one fetcher thread with its event
    loop and descriptors per worker behind."""
    _, manifest = s3_manifest
    it = loader(manifest, workers=workers, worker_kind=kind)
    state = it.state_dict()
    for start in range(22):
        if start == 2:
            gc.collect()
            threads, fds = _fetcher_threads(), _open_fds()
        if start % 2:
            it.load_state_dict(state)
        else:
            it.set_epoch(start)
        next(iter(it))
    gc.collect()
    assert _fetcher_threads() == threads
    deadline = time.monotonic() + 3  # a read-ahead file being written right now holds a descriptor a moment
    while True:
        grown = collections.Counter(_open_fds()) - collections.Counter(fds)
        grown["socket"] -= 2  # the process's one connection pool to the store may hold a connection or two more
        if not +grown or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not +grown, grown  # (each start left an event loop's epoll and self-pipe behind, and its sockets)
    it.close()
    assert _fetcher_threads() == 0 and not _read_ahead_folders()


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "kind"), KINDS)
def test_f14_the_read_ahead_folder_is_gone_with_its_loader_and_stays_gone(s3_manifest, workers, kind):
    """In-flight read-ahead wrote into (and so recreated) the folder after the loader removed it: it outlived the
    process in /dev/shm. Fetches are slowed by a proxy so that they are in flight when the loader goes."""
    from support.loopback import FaultProxy

    server, manifest = s3_manifest
    saved = os.environ["AWS_ENDPOINT_URL"]
    with FaultProxy(server.port, latency_s=0.4) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        try:
            for ending in ("collect", "close"):
                before = _read_ahead_folders()
                it = loader(manifest, workers=workers, worker_kind=kind, read_ahead=4)
                next(iter(it))  # read-ahead of the next steps is now in flight
                mine = _read_ahead_folders() - before
                assert mine  # the folder (and its lock)
                if ending == "close":
                    it.close()
                    it.close()  # twice is fine
                    with pytest.raises(ConfigError, match="this loader was closed"):
                        next(iter(it))
                del it
                gc.collect()
                assert not mine & _read_ahead_folders(), ending
                time.sleep(1.0)  # every fetch that was in flight has had its answer
                assert not mine & _read_ahead_folders(), f"{ending}: in-flight read-ahead made the folder again"
                assert _fetcher_threads() == 0, ending
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved


# -- 24: temporary files in shared folders are created exclusively ---------------------------------------------
def test_f24_a_planted_symlink_in_a_shared_sample_cache_never_redirects_a_write(tmp_path):
    """``.partial`` names were predictable (``<file>.<pid>.<thread>.partial``) and opened through symlinks: a link
    planted in a shared sample_cache made the loader overwrite the link's target with fetched bytes."""
    from dali_arb.data.readahead import RemoteReads
    from dali_arb.data.storage import Request

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = tmp_path / "cache"
    cache.mkdir()
    reads = RemoteReads(str(cache), keep=True)
    r = Request(f"s3://{BUCKET}/photos/img000.jpg", 0, 5)
    path = reads._path(r)
    os.makedirs(os.path.dirname(path))
    os.symlink(victim, f"{path}.{os.getpid()}.{threading.get_ident()}.partial")  # the name it would write
    reads._write(r, b"fetch")
    assert victim.read_text() == "precious"
    assert open(path, "rb").read() == b"fetch" and not os.path.islink(path)
    os.unlink(path)
    os.symlink(victim, path)  # a link at the sample's own name is replaced, never written through
    reads._write(r, b"again")
    assert victim.read_text() == "precious" and not os.path.islink(path) and open(path, "rb").read() == b"again"
    os.unlink(path)
    os.symlink(victim, path)
    assert reads.take(r) != b"precious"  # a planted link is not read as the sample either (it is fetched)


def test_f24_a_planted_symlink_beside_a_download_is_never_written_through(s3_manifest, tmp_path):
    """``storage.download`` wrote ``<file>.<pid>.partial`` through a symlink (the node cache's manifest copies)."""
    from dali_arb.data.storage import download

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "copy.jpg"
    os.symlink(victim, f"{target}.{os.getpid()}.partial")
    size = download(f"s3://{BUCKET}/photos/img000.jpg", target)
    assert victim.read_text() == "precious" and target.stat().st_size == size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial") and not p.is_symlink()] == []


# -- 25d: stale read-ahead cleanup never removes a live loader's folder, whatever its PID namespace ------------
HOLDER = """
import os, sys, time
from dali_arb.data import readahead as remote
os.getpid = lambda: int(sys.argv[2])  # a loader in another PID namespace: its pid means nothing here
folder = remote.ReadAheadFolder(sys.argv[1])
open(os.path.join(folder.path, "sample"), "wb").write(b"x" * 100)
print(folder.path, flush=True)
time.sleep(60)
"""


def test_f25d_cleanup_keeps_a_live_loaders_folder_from_another_pid_namespace(tmp_path):
    """``remove_stale_read_ahead`` judged folders by ``kill(pid, 0)``: with ``/dev/shm`` shared between containers
    (``--ipc=host``), a live loader whose pid does not exist here lost its folder. Now its flock keeps it."""
    import subprocess
    import sys

    from dali_arb.data.readahead import remove_stale_read_ahead

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = gone.stdout.strip()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), dead_pid], stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    try:
        folder = holder.stdout.readline().strip()
        assert os.path.basename(folder).startswith(f"dali_arb-readahead-{dead_pid}-")
        assert remove_stale_read_ahead(str(tmp_path)) == []
        assert os.path.exists(os.path.join(folder, "sample"))  # the other container's loader keeps its samples
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_read_ahead(str(tmp_path)) == [folder]  # killed: its lock is free, its folder stale
    assert os.listdir(tmp_path) == []


# -- 22: the world from launchers' variables, never a silent rank 0 ----------------------------------------------
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                    "MPI_LOCALNRANKS", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
                    "SLURM_NTASKS_PER_NODE")  # fmt: skip


@pytest.fixture
def launch(monkeypatch):
    """Set a launcher's environment (and nothing else of any launcher)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def setenv(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))

    return setenv


@pytest.mark.parametrize(
    ("variables", "fragment"),
    [
        ({"WORLD_SIZE": 8}, "WORLD_SIZE=8 is set but RANK is not"),
        ({"RANK": 3}, "RANK=3 is set but WORLD_SIZE is not"),
        ({"OMPI_COMM_WORLD_SIZE": 4}, "OMPI_COMM_WORLD_SIZE=4 is set but OMPI_COMM_WORLD_RANK is not"),
        ({"PMI_RANK": 1}, "PMI_RANK=1 is set but PMI_SIZE is not"),
        ({"SLURM_STEP_NUM_TASKS": 4}, "SLURM_STEP_NUM_TASKS=4 is set but SLURM_PROCID is not"),
        # torchrun's partial set is refused even where another launcher's is whole: which one is meant is unknown
        ({"WORLD_SIZE": 2, "SLURM_PROCID": 1, "SLURM_STEP_NUM_TASKS": 2}, "WORLD_SIZE=2 is set but RANK is not"),
    ],
)
def test_f22_a_world_size_without_a_rank_is_refused_in_one_line(dataset, launch, variables, fragment):
    """WORLD_SIZE without RANK made every process rank 0: half the data twice, half never."""
    from dali_arb.plan.world import World

    launch(**variables)
    with pytest.raises(ConfigError, match=fragment) as caught:
        World.detect()
    assert "pass rank= and world_size=" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=fragment):
        loader(dataset[1], rank=None, world_size=None)


@pytest.mark.parametrize(
    ("variables", "world"),
    [
        (
            {
                "OMPI_COMM_WORLD_RANK": 5,
                "OMPI_COMM_WORLD_SIZE": 8,
                "OMPI_COMM_WORLD_LOCAL_RANK": 1,
                "OMPI_COMM_WORLD_LOCAL_SIZE": 4,
            },
            (5, 8, 1, 4),
        ),
        ({"PMI_RANK": 2, "PMI_SIZE": 3, "MPI_LOCALRANKID": 2, "MPI_LOCALNRANKS": 3}, (2, 3, 2, 3)),
        (
            {"SLURM_PROCID": 6, "SLURM_STEP_NUM_TASKS": 16, "SLURM_LOCALID": 2, "SLURM_NTASKS_PER_NODE": 8},
            (6, 16, 2, 8),
        ),
        ({"SLURM_PROCID": 0, "SLURM_NTASKS": 8}, (0, 1, 0, 1)),  # a batch script without srun: one process
        # rank and size come from one launcher: torchrun's whole set wins over SLURM's (torchrun under srun)
        ({"RANK": 1, "WORLD_SIZE": 2, "SLURM_PROCID": 0, "SLURM_STEP_NUM_TASKS": 1}, (1, 2, 0, 1)),
        # mpirun inside a SLURM allocation: Open MPI's ranks, not the batch step's
        (
            {"OMPI_COMM_WORLD_RANK": 3, "OMPI_COMM_WORLD_SIZE": 4, "SLURM_PROCID": 0, "SLURM_STEP_NUM_TASKS": 1},
            (3, 4, 0, 1),
        ),
    ],
)
def test_f22_launchers_ranks_are_read_whole_from_one_launcher(launch, variables, world):
    from dali_arb.plan.world import World

    launch(**variables)
    assert World.detect() == World(*world)


# -- 25e, 25f: epochs and states that cannot work are refused in one line --------------------------------------
@pytest.mark.parametrize(
    ("epoch", "message"),
    [
        (2**63, "epoch must be at most 2**62, got 9223372036854775808"),
        (np.uint64(2**63), "epoch must be at most 2**62, got"),
        (-1, "epoch must be a non-negative integer, got -1"),
        (1.0, "epoch must be a non-negative integer, got 1.0"),
        ("3", "epoch must be a non-negative integer, got '3'"),
    ],
)
def test_f25e_an_epoch_out_of_range_is_a_config_error_naming_it(dataset, epoch, message):
    """An epoch >= 2**63 passed set_epoch's check and failed later, in NumPy or DALI, as their error."""
    it = loader(dataset[1])
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        it.set_epoch(epoch)
    state = it.state_dict()
    state["epoch"] = 2**63
    with pytest.raises(
        StateError, match=r"state field 'epoch' is out of range \(at most 2\*\*62\), got 9223372036854775808"
    ):
        loader(dataset[1]).load_state_dict(state)
    it.set_epoch(2**62)  # the largest serves
    assert next(iter(it))["epoch"] == 2**62


@pytest.mark.parametrize("name", ["manifest", "buckets", "captions", "repeats", "failed", "failed_rows", "crop"])
def test_f25f_a_state_without_a_required_field_is_refused_naming_it(dataset, name):
    """A state without ``"manifest"`` skipped the manifest check: another manifest of the same size was served."""
    it = loader(dataset[1])
    state = it.state_dict()
    del state[name]
    with pytest.raises(StateError, match=f"state has no '{name}' field, which every state of this version holds"):
        loader(dataset[1]).load_state_dict(state)
    from dali_arb.loader.state import STATE_FIELDS

    assert set(it.state_dict()) == set(STATE_FIELDS)


def test_f22_a_world_size_given_without_a_rank_is_refused(launch):
    from dali_arb.plan.world import World

    with pytest.raises(ConfigError, match="world_size 4 is given but no rank: pass rank= too"):
        World.detect(world_size=4)
    assert World.detect(world_size=1) == World() and World.detect(rank=2, world_size=4) == World(2, 4)
