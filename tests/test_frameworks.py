"""accelerate and Lightning on the CPU (issue 23): ``Accelerator.prepare`` passes the loader through and
``register_for_checkpointing`` resumes it mid-epoch bit-exact; :class:`dali_arb.lightning.BucketDataModule`
checkpoints resume at the right batch; :func:`dali_arb.sdxl.add_time_ids`."""

from __future__ import annotations

import pytest
import torch

from dali_arb import DALIBucketIterator
from dali_arb.sdxl import add_time_ids

from .conftest import SMALL
from .resume import assert_same_batches


def make_loader(manifest, batch_size: int = 4) -> DALIBucketIterator:
    return DALIBucketIterator(
        str(manifest), batch_size=batch_size, buckets=SMALL, device="cpu", leftover="nearest", seed=5, flip=0.5,
        workers=0,
    )  # fmt: skip


# -- add_time_ids ---------------------------------------------------------------------------------------------------
def test_add_time_ids_is_original_crop_target_per_sample(dataset):
    with make_loader(dataset[1], batch_size=3) as loader:
        batch = next(iter(loader))
    ids = add_time_ids(batch)
    assert ids.dtype == torch.float32 and ids.shape == (3, 6)
    h, w = batch["target_size"]
    for i in range(3):
        by_hand = [*batch["original_size"][i].tolist(), *batch["crop_top_left"][i].tolist(), h, w]
        assert ids[i].tolist() == [float(v) for v in by_hand]
    assert add_time_ids(batch, dtype=torch.float16).dtype == torch.float16


def test_add_time_ids_names_what_is_missing():
    with pytest.raises(KeyError, match="crop_top_left"):
        add_time_ids({"original_size": torch.zeros(2, 2), "target_size": (64, 64)})
    with pytest.raises(ValueError, match=r"target_size must be one \(height, width\), got \(64, 64, 3\)"):
        add_time_ids(
            {"original_size": torch.zeros(2, 2), "crop_top_left": torch.zeros(2, 2), "target_size": (64, 64, 3)}
        )


# -- accelerate -----------------------------------------------------------------------------------------------------
def _accelerate_run(manifest, project, *, stop_after: int | None = None, resume: bool = False, steps: int = 12):
    """Batches of ``steps`` steps (over epochs) with accelerate's README loop; ``stop_after`` saves the state after
    that many batches and stops; ``resume`` loads it into this fresh loader first."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, project_dir=str(project))
    loader = make_loader(manifest)
    prepared = accelerator.prepare(loader)
    assert prepared is loader, f"accelerate wrapped the loader in a {type(prepared).__name__}"
    accelerator.register_for_checkpointing(loader)
    if resume:
        accelerator.load_state(str(project / "state"))
    batches = []
    while len(batches) < steps:
        for batch in prepared:
            batches.append(batch)
            if len(batches) == stop_after:
                accelerator.save_state(str(project / "state"))
                loader.close()
                return batches
            if len(batches) == steps:
                break
    loader.close()
    return batches


def test_accelerate_prepare_and_checkpoint_resume_mid_epoch_bit_exact(dataset, tmp_path):
    whole = _accelerate_run(dataset[1], tmp_path / "a", steps=14)
    steps_per_epoch = len(make_loader(dataset[1]))
    assert 5 < steps_per_epoch < 14, f"{steps_per_epoch} steps per epoch: the run should cross an epoch"
    first = _accelerate_run(dataset[1], tmp_path / "b", stop_after=5)
    assert_same_batches(first, whole[:5])
    following = _accelerate_run(dataset[1], tmp_path / "b", resume=True, steps=9)
    assert following[0]["step"] == 5
    assert_same_batches(following, whole[5:])


# -- Lightning ------------------------------------------------------------------------------------------------------
def _lightning_fit(manifest, root, *, max_steps: int, every: int | None = None, ckpt_path=None, limit=1.0) -> list:
    """The ids of every batch a tiny LightningModule trains on, through :class:`BucketDataModule`; ``every``:
    a checkpoint every that many steps (in ``root``); ``ckpt_path``: resume from it."""
    import lightning.pytorch as pl

    from dali_arb.lightning import BucketDataModule

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(6, 1)
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(list(batch["ids"]) if limit == 1.0 else (batch["epoch"], batch["step"]))
            return self.layer(add_time_ids(batch) / 1024).mean() + batch["images"].float().mean() * 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(every), default_root_dir=root, limit_train_batches=limit,
    )  # fmt: skip
    model = Tiny()
    data = BucketDataModule(lambda: make_loader(manifest))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    data.batches.loader.close()
    return model.seen


def test_lightning_datamodule_checkpoint_resumes_mid_epoch_at_the_right_batch(dataset, tmp_path):
    steps_per_epoch = len(make_loader(dataset[1]))
    whole = _lightning_fit(dataset[1], tmp_path / "whole", max_steps=14)
    assert len(whole) == 14 and 5 < steps_per_epoch < 14, "the run should cross an epoch"
    first = _lightning_fit(dataset[1], tmp_path / "cut", max_steps=7, every=5)
    assert first == whole[:7]
    (checkpoint,) = (tmp_path / "cut").glob("*step=5.ckpt")
    state = torch.load(checkpoint, weights_only=False)["BucketDataModule"]["loader"]
    assert (state["epoch"], state["step"]) == (0, 5), "the checkpoint after 5 batches must resume at the 6th"
    following = _lightning_fit(dataset[1], tmp_path / "resumed", max_steps=14, ckpt_path=checkpoint)
    assert following == whole[5:]


def test_lightning_each_trainer_epoch_is_a_loader_epoch(dataset, tmp_path):
    """With ``limit_train_batches`` an epoch of the trainer ends before the loader's: the next one starts the
    loader's next epoch at its first step (``set_epoch``), not where the last one stopped."""
    positions = _lightning_fit(dataset[1], tmp_path, max_steps=6, limit=3)
    assert positions == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
