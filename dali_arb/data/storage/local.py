"""``file:///absolute/path``: local files as one more backend (obstore's ``LocalStore`` rooted at ``/``), so that
a byte range of a local file is read with the same calls, retries and errors as an object in a store
(``get_range(file_url(path), start, end)``). The loader still reads plain local paths itself (``os.pread`` with its
own identity checks); this backend is for code that wants one interface for both.

Imports: the standard library and ``.base``; obstore when a store is made.
"""

from __future__ import annotations

import os
from typing import Any

from .base import Backend


class Local(Backend):
    """Local files, addressed as ``file:///absolute/path`` (no host)."""

    scheme = "file"
    label = "the local file system"
    container = ""
    help = "a local file, file:///absolute/path (or give the path itself)"

    def store(self, bucket: str, options: dict[str, Any], retry: dict[str, Any]) -> Any:
        from obstore.store import LocalStore

        return LocalStore("/")

    def store_name(self, bucket: str) -> str:
        return "the local file system"


def file_url(path: str | os.PathLike) -> str:
    """The ``file://`` URL of the local ``path`` (made absolute; not percent-encoded: the key is the path)."""
    return "file://" + os.path.abspath(os.fspath(path))
