"""Lightning: a DataModule whose checkpoints hold the loader's state, so ``trainer.fit(..., ckpt_path=...)`` resumes
mid-epoch at the batch that would have come next.

    from dali_arb.lightning import BucketDataModule
    data = BucketDataModule(lambda: DALIBucketIterator("m.parquet", batch_size=16, buckets=BucketSpec()))
    trainer.fit(model, datamodule=data)                      # checkpoints hold data.state_dict()
    trainer.fit(model, datamodule=data, ckpt_path="last.ckpt")  # continues at the next batch

The checkpoint holds the loader's state under the DataModule's name (``checkpoint["BucketDataModule"]["loader"]``),
restored before the first batch. (Lightning 2.3+ also saves the state of any training iterable with
``state_dict``/``load_state_dict`` in its fit loop, and does not fetch ahead of a sized one, so the position is the
batch after the last one trained on.) Each epoch of the trainer is the loader's epoch
(``set_epoch(trainer.current_epoch)``, as Lightning does for a ``DistributedSampler``): with ``limit_train_batches``
every trainer epoch starts a new loader epoch.

``BucketDataModule`` is ``LoaderStateMixin`` + ``LightningDataModule`` (from ``lightning.pytorch``, else
``pytorch_lightning``), built when first asked for: ``import dali_arb.lightning`` does not import Lightning. Mix
:class:`LoaderStateMixin` into your own DataModule instead, before ``LightningDataModule``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["BucketDataModule", "LoaderStateMixin", "ResumableBatches"]  # noqa: F822 (BucketDataModule: __getattr__)


class ResumableBatches:
    """The iterable handed to Lightning: ``loader``'s batches, each epoch the trainer's (``epoch_of()``, ``None``
    outside a trainer, is set on the loader at each ``iter``); ``state_dict``/``load_state_dict`` are the loader's."""

    def __init__(self, loader: Any, epoch_of: Callable[[], int | None] = lambda: None) -> None:
        self.loader = loader
        self._epoch_of = epoch_of

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch_of()
        if epoch is not None:
            self.loader.set_epoch(epoch)
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class LoaderStateMixin:
    """``train_dataloader`` and ``state_dict``/``load_state_dict`` for a
    ``LightningDataModule`` whose training batches come from ``make_loader()`` (a ``DALIBucketIterator``, built once,
    in the training process). Mix it in before ``LightningDataModule``; call ``super().__init__()``."""

    def __init__(self, make_loader: Callable[[], Any], *args: Any, **kwargs: Any) -> None:
        if not callable(make_loader):
            raise TypeError(
                f"make_loader must be a function that builds the loader, got {type(make_loader).__name__}; "
                "pass e.g. lambda: DALIBucketIterator(...)"
            )
        super().__init__(*args, **kwargs)
        self._make_loader = make_loader
        self._batches: ResumableBatches | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def batches(self) -> ResumableBatches:
        """The training batches (the loader is built at the first call)."""
        if self._batches is None:
            self._batches = ResumableBatches(self._make_loader(), self._trainer_epoch)
            if self._pending is not None:
                self._batches.load_state_dict(self._pending)
                self._pending = None
        return self._batches

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else int(trainer.current_epoch)

    def train_dataloader(self) -> ResumableBatches:
        return self.batches

    def state_dict(self) -> dict[str, Any]:
        if self._batches is None:
            return {} if self._pending is None else {"loader": self._pending}
        return {"loader": self._batches.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loader_state = state_dict.get("loader")
        if loader_state is None:
            return
        if self._batches is None:
            self._pending = loader_state  # applied when the loader is built
        else:
            self._batches.load_state_dict(loader_state)


def _lightning_data_module() -> type:
    try:
        from lightning.pytorch import LightningDataModule
    except ImportError:
        try:
            from pytorch_lightning import LightningDataModule
        except ImportError:
            raise ImportError(
                "dali_arb.lightning.BucketDataModule needs Lightning: pip install 'dali-arb[frameworks]' "
                "(or pip install lightning)"
            ) from None
    return LightningDataModule


_built: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name != "BucketDataModule":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        cls = type(name, (LoaderStateMixin, _lightning_data_module()), {"__module__": __name__})
        cls.__doc__ = (
            "A LightningDataModule of ``make_loader()``'s batches whose checkpoints resume mid-epoch "
            "(:class:`LoaderStateMixin`)."
        )
        _built[name] = cls
    return _built[name]
