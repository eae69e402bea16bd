"""dali_arb's benchmark suite: ``python -m benchmarks [CASE ...] [--json FILE]``.

Each case compares side by side in one run and returns a dict of figures; the runner prints a
table and writes JSON. Cases register with :func:`case`.
"""

from __future__ import annotations

from collections.abc import Callable

CASES: dict[str, Callable] = {}


def case(name: str):
    """Register a benchmark case: a function ``(args) -> dict`` of figures."""

    def register(fn: Callable) -> Callable:
        CASES[name] = fn
        return fn

    return register
