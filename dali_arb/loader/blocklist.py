"""The one record of samples that could not be served: owned by the iterator, handed to every pipeline
(re)start as a frozen set of rows, saved in ``state_dict()`` as ``"failed"`` (``{key: reason}``) and ``"failed_rows"``."""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["Blocklist"]

log = logging.getLogger("dali_arb")


class Blocklist:
    """Keys, rows and reasons of samples replaced at run time. Each is logged once, when first added."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}  # key -> reason, in the order found
        self._rows: set[int] = set()

    def add(self, row: int, key: str, reason: str) -> bool:
        """Record ``row`` (manifest key ``key``) as bad; True if it was not known yet."""
        self._rows.add(int(row))
        if key in self._reasons:
            return False
        self._reasons[key] = reason
        log.warning("dali_arb: sample %r replaced by another of its bucket: %s", key, reason)
        return True

    @property
    def rows(self) -> frozenset[int]:
        """Manifest rows never to read again (what each pipeline start gets)."""
        return frozenset(self._rows)

    @property
    def keys(self) -> list[str]:
        return list(self._reasons)

    def reasons(self) -> dict[str, str]:
        """``{key: reason}`` (a copy; JSON-serialisable)."""
        return dict(self._reasons)

    def to_dict(self) -> dict[str, object]:
        """Its piece of ``state_dict()``: ``failed`` (``{key: reason}``) and ``failed_rows`` (sorted rows)."""
        return {"failed": self.reasons(), "failed_rows": sorted(self._rows)}

    @classmethod
    def restore(cls, reasons: dict[str, str], rows_of: Callable[[list[str]], list[int]]) -> Blocklist:
        """A blocklist from a saved ``{key: reason}``; ``rows_of`` finds the rows of keys (keys it does not
        find are kept as reasons only)."""
        restored = cls()
        restored._reasons = {str(k): str(v) for k, v in reasons.items()}
        restored._rows = set(rows_of(list(restored._reasons)))
        return restored
