"""Global rows: several datasets' rows numbered as one, and back.

Dataset ``d``'s row ``r`` is global row ``offsets[d] + r``; a global row's dataset is found by
``np.searchsorted`` on ``offsets``. The one mapping used by the manifests (:class:`~dali_arb.data.manifest.ManifestSet`),
the planner's mixture (:class:`~dali_arb.plan.mixture.MixedIndex`) and the external source
(:class:`~dali_arb.loader.source.BatchSource`).

Imports only the standard library and NumPy (and ``errors``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["GlobalRows"]


class GlobalRows:
    """The global row space of ``D`` datasets of ``counts[d]`` rows each.

    Attributes:
        offsets: ``int64 (D + 1,)`` first global row of each dataset; ``offsets[-1]`` rows in all.
    """

    def __init__(self, counts: Sequence[int]) -> None:
        sizes = list(counts)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in sizes):
            raise ConfigError(f"counts must be one non-negative row count per dataset (at least one), got {counts!r}")
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._one = len(sizes) == 1

    @property
    def num_datasets(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def dataset_of(self, rows: np.ndarray) -> np.ndarray:
        """``int64`` dataset of each global row in ``rows`` (any shape; the same shape)."""
        return np.searchsorted(self.offsets, np.asarray(rows, np.int64), side="right") - 1

    def split(self, row: int) -> tuple[int, int]:
        """``(dataset, local row)`` of one global ``row`` (no search when there is one dataset: called per sample)."""
        if self._one:
            return 0, int(row)
        d = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return d, int(row - self.offsets[d])

    def to_global(self, d: int, local: np.ndarray) -> np.ndarray:
        """``int64`` global rows of dataset ``d``'s rows ``local`` (any shape; the same shape)."""
        return self.offsets[d] + np.asarray(local, np.int64)

    def by_dataset(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """For each dataset holding some of ``rows`` (flattened to ``(n,)``), in order: ``(d, at, local)``, where
        ``at`` is ``int64 (m,)`` the positions in the flattened ``rows`` of that dataset's and ``local`` ``int64
        (m,)`` their rows in it."""
        flat = np.asarray(rows, np.int64).reshape(-1)
        if self._one:
            yield 0, np.arange(len(flat)), flat
            return
        d = self.dataset_of(flat)
        for k in np.unique(d).tolist():
            at = np.flatnonzero(d == k)
            yield k, at, flat[at] - self.offsets[k]
