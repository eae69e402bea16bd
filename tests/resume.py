"""One reusable resume check (torchdata's ``run_test_save_load_state`` is the model)."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

BATCH_FIELDS = ("ids", "captions", "target_size", "epoch", "step")
TENSOR_FIELDS = ("images", "original_size", "crop_top_left", "flipped")  # and every other tensor (pairs, dataset)


def run_epochs(loader, epochs: int) -> tuple[list[dict], list[dict]]:
    """Every batch of ``epochs`` epochs and the JSON round-tripped state after each, with the README's loop."""
    batches, states = [], []
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            batches.append(batch)
            states.append(json.loads(json.dumps(loader.state_dict())))
    return batches, states


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want), f"{len(got)} batches after the cut, expected {len(want)}"
    for a, b in zip(got, want):
        where = f"epoch {b['epoch']} step {b['step']}"
        assert a.keys() == b.keys(), f"batch keys differ at {where}"
        for name in BATCH_FIELDS:
            assert a[name] == b[name], f"{name} differs at {where}"
        for name in a:
            if isinstance(a[name], torch.Tensor) or name in TENSOR_FIELDS:
                assert torch.equal(a[name], b[name]), f"{name} differs at {where}"


def check_save_load_state(make_loader: Callable[[], object], cuts: list[int], *, epochs: int = 2) -> None:
    """Stop after batch ``k`` (for each ``k`` in ``cuts``, counted over all epochs), restore the state into a
    fresh loader, and compare every following batch up to the end of ``epochs`` with an uninterrupted run."""
    batches, states = run_epochs(make_loader(), epochs)
    for k in cuts:
        fresh = make_loader()
        fresh.load_state_dict(states[k])
        following, _ = run_epochs(fresh, epochs)
        assert_same_batches(following, batches[k + 1 :])
