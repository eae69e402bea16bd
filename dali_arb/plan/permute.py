"""Keyed pseudo-random permutations of ``[0, n)``, evaluated at any position in O(1) time and memory.

A balanced Feistel network on the smallest even number of bits that covers ``n`` (so the network's
domain is less than ``4 n``), with cycle walking: a value that lands outside ``[0, n)`` is encrypted
again until it lands inside, which keeps the map a bijection of ``[0, n)``. The round function is the
splitmix64 finaliser of the half-word xor-ed with a 64-bit round key. This is what lets the planner
shuffle a bucket of 100M images without materialising the shuffle: position ``p`` of the shuffled
bucket is ``Permutation(n, keys)(p)``.

Imports only NumPy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ROUNDS", "Permutation", "moving_round", "round_keys"]

#: Feistel rounds (Luby-Rackoff: 4 make a pseudo-random permutation from a pseudo-random function;
#: 6 leave a margin for the narrow half-words of small buckets). See benchmarks/RESULTS.md for the
#: measured randomness.
ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def round_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """``uint64 (count, ROUNDS)`` round keys for ``count`` permutations, drawn from ``rng``."""
    return rng.integers(0, 2**64, size=(count, ROUNDS), dtype=np.uint64, endpoint=False)


def moving_round(rate: np.ndarray | float, phase: np.ndarray | float, epoch: int) -> np.ndarray:
    """``int64`` share of epoch ``epoch`` of a ``rate`` per epoch (any shape, with ``phase`` in ``[0, 1)``):
    ``floor(rate * (epoch + 1) + phase) - floor(rate * epoch + phase)``, floor or ceil of ``rate``. The shares of
    epochs ``0..e`` add up to ``rate * (e + 1)`` within one, so a seeded phase rounds without bias."""
    rate, phase = np.asarray(rate, np.float64), np.asarray(phase, np.float64)
    return (np.floor(rate * (epoch + 1) + phase) - np.floor(rate * epoch + phase)).astype(np.int64)


def _round(half: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
    """The round function: splitmix64's finaliser (a bijective avalanche) of ``half ^ key``, masked."""
    x = half ^ key
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    x &= mask
    return x


class Permutation:
    """A bijection of ``[0, n)`` chosen by ``keys`` (``uint64 (ROUNDS,)``, see :func:`round_keys`).

    ``perm(positions)`` maps an integer array of positions in ``[0, n)`` to their values (any shape);
    ``perm.inverse(values)`` maps back.
    """

    def __init__(self, n: int, keys: np.ndarray) -> None:
        if n < 0:
            raise ValueError(f"a permutation needs n >= 0, got {n}")
        self.n = int(n)
        bits = max(2, (max(self.n - 1, 1)).bit_length())
        bits += bits % 2
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        self._keys = np.asarray(keys, np.uint64).reshape(-1)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            mixed = _round(right, key, self._mask)
            mixed ^= left
            left, right = right, mixed
        left <<= self._half
        left |= right
        return left

    def _decrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys[::-1]:
            mixed = _round(left, key, self._mask)
            mixed ^= right
            left, right = mixed, left
        left <<= self._half
        left |= right
        return left

    def _walk(self, positions: np.ndarray, step) -> np.ndarray:
        x = np.asarray(positions)
        shape = x.shape
        x = x.astype(np.uint64).reshape(-1)
        if x.size and (int(x.max()) >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n}), got {int(x.max())}")
        n = np.uint64(self.n)
        y = step(x)
        outside = np.flatnonzero(y >= n)
        while outside.size:  # cycle walking: each pass keeps about a quarter or fewer of the values
            walked = step(y[outside])
            y[outside] = walked
            outside = outside[walked >= n]
        return y.astype(np.int64).reshape(shape)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """``int64`` values at ``positions`` (same shape)."""
        return self._walk(positions, self._encrypt)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """``int64`` positions of ``values`` (same shape)."""
        return self._walk(values, self._decrypt)
