"""Finding and checking a sample's paired images (``--pair`` / ``--mask``): in a folder (``DIR/K.<ext>``)
or among a tar sample's side members (``K.NAME.<ext>``)."""

from __future__ import annotations

import os
import stat as stat_module
from collections.abc import Callable

from ..data.imagefacts import inspect_image
from ..data.pairs import PairSpec, same_aspect
from .records import NOT_IMAGES, PairFacts

__all__ = ["FolderListings", "find_pairs", "pair_problem"]


class FolderListings:
    """``{stem: [file names]}`` of the folders pairs are looked up in, each listed once per task."""

    def __init__(self) -> None:
        self._listings: dict[str, dict[str, list[str]]] = {}

    def candidates(self, directory: str, stem: str) -> list[str]:
        if directory not in self._listings:
            found: dict[str, list[str]] = {}
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        base, ext = os.path.splitext(entry.name)
                        if not entry.name.startswith(".") and ext.lower() not in NOT_IMAGES:
                            found.setdefault(base, []).append(entry.name)
            except OSError:
                pass
            self._listings[directory] = {k: sorted(v) for k, v in found.items()}
        return self._listings[directory].get(stem, [])


def find_pairs(
    pairs: list[PairSpec],
    key: str,
    size: tuple[int, int],
    *,
    max_pixels: int,
    listings: FolderListings,
    sides: dict[str, tuple] | None = None,
    read_member: Callable[[int, int], bytes] | None = None,
    shard: str | None = None,
) -> tuple[tuple[PairFacts, ...], str | None]:
    """The facts of each of ``pairs`` for the sample ``key`` whose image is ``size`` ``(width, height)``,
    or ``((), reason)`` naming the first pair that is missing, unreadable or of another aspect.

    ``sides`` (``{"NAME.ext": (member, offset, length)}``) and ``read_member`` come with tar shard samples."""
    facts: list[PairFacts] = []
    for spec in pairs:
        what = f"{spec.kind} {spec.name!r}"
        if spec.folder is not None:
            directory, stem = os.path.split(os.path.join(spec.folder, key))
            names = listings.candidates(directory, stem)
            if not names:
                return (), f"{what} missing: no {os.path.join(spec.folder, key)}.* (an image file) for this sample"
            path = os.path.join(directory, names[0])
            try:
                info = os.stat(path)
            except OSError as exc:
                return (), f"{what} {path} is unreadable ({exc.strerror or exc})"
            if not stat_module.S_ISREG(info.st_mode):
                return (), f"{what} {path} is not a regular file"
            result = inspect_image(path, max_pixels=max_pixels)
            where: tuple = (path, 0, info.st_size)
        else:
            found = sorted(k for k in (sides or {}) if k.rpartition(".")[0] == spec.name)
            if not found or read_member is None:
                return (), f"{what} missing: no {key}.{spec.name}.<ext> member in the shard"
            member, offset, length = sides[found[0]]
            path = f"{shard}:{member}"
            result = inspect_image(read_member(offset, length), max_pixels=max_pixels)
            where = (shard, offset, length)
        problem = pair_problem(what, path, result, size)
        if problem:
            return (), problem
        facts.append((*where, *result))
    return tuple(facts), None


def pair_problem(what: str, where: str, found: tuple[int, int] | str, size: tuple[int, int]) -> str | None:
    """Why a pair found at ``where`` cannot serve an image of ``size`` ``(width, height)``: ``found`` is what
    ``inspect_image`` said of it (its size, or why it is unusable); None when it can."""
    if isinstance(found, str):
        return f"{what} {where}: {found}"
    if not same_aspect(*size, *found):
        return (
            f"{what} {where} is {found[0]}x{found[1]}, not the aspect of the image ({size[0]}x{size[1]}); "
            "a pair must show the same picture, at any scale"
        )
    return None
