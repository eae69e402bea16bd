"""The loader's ``state_dict``: composed from the pieces each component owns, versioned and checked here.

Pieces: the position (``epoch``, ``step``), the plan's settings (:meth:`LoaderConfig.to_dict`), the datasets
(``num_images``, ``manifest`` fingerprint, ``buckets``, ``repeats``), the captions
(:meth:`CaptionPolicy.to_dict`) and the blocklist (:meth:`Blocklist.to_dict`). The format stays one flat,
JSON-serialisable dict (documented in docs/contract.md). Standard library only, and the plan's BucketSpec.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, StateError
from ..plan.batching import BatchSizing
from ..plan.buckets import BucketSpec

__all__ = ["MAX_EPOCH", "STATE_FIELDS", "STATE_FORMAT", "check_resumable", "checked_epoch", "checked_state",
           "compose"]  # fmt: skip

#: Version of ``state_dict()``; 1 stored ``buckets.base`` as ``[height, width]`` and is still read.
#: 3: the O(steps) planner (keyed shuffles per bucket); states of formats 1 and 2 are refused.
STATE_FORMAT = 5  # 4: plans that trim from all images and round fractional repeats (issue 18)
#: 5: ``batching`` (batch sizes by bucket, issue 20); a format-4 state is a format-5 one with ``batching`` None
#: Every field of ``state_dict()``; a state without one of them is refused (it was edited or built by hand).
STATE_FIELDS = ("format", "epoch", "step", "seed", "batch_size", "batching", "world_size", "rank", "sync_ranks",
                "leftover", "crop", "flip", "num_images", "manifest", "buckets", "repeats", "captions", "failed",
                "failed_rows")  # fmt: skip
#: The largest epoch: the batches' metadata carries epochs as int64, and the stream runs on into the next epoch.
MAX_EPOCH = 2**62
#: Fields that must be equal for a state to load (world size and batch size have their own rule).
MUST_MATCH = ("seed", "sync_ranks", "leftover", "crop", "flip", "num_images", "manifest", "buckets", "repeats",
              "captions")  # fmt: skip


def checked_epoch(epoch: Any) -> int:
    """``epoch`` as an int, or a ConfigError echoing it (a non-negative integer, at most ``MAX_EPOCH``)."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
    if epoch > MAX_EPOCH:
        raise ConfigError(f"epoch must be at most 2**62, got {epoch!r}")
    return int(epoch)


def compose(*pieces: dict[str, Any]) -> dict[str, Any]:
    """One state of this format from the components' pieces; two pieces naming one field is a bug."""
    state: dict[str, Any] = {"format": STATE_FORMAT}
    for piece in pieces:
        shared = state.keys() & piece.keys()
        if shared:
            raise RuntimeError(f"dali_arb bug: state pieces both hold {sorted(shared)}")
        state.update(piece)
    missing = [name for name in STATE_FIELDS if name not in state]
    if missing:
        raise RuntimeError(f"dali_arb bug: no component holds the state fields {missing}")
    return state


def _per_dataset(buckets: Any, count: int) -> list[Any]:
    """``buckets`` of a state (one spec, or one per dataset) as one per dataset, to compare either spelling."""
    return list(buckets) if isinstance(buckets, list) else [buckets] * count


def check_resumable(
    saved: dict[str, Any], mine: dict[str, Any], *, datasets: int, units: Callable[[dict[str, Any]], Any]
) -> None:
    """A StateError saying what differs unless ``saved`` (checked) can continue in a loader whose own state is
    ``mine``: the same options and manifest, and the same world size and batch sizes, or the same global batch of
    every bucket (``units(state)``: world size x each bucket's batch) with ranks in sync (elastic resume)."""
    if saved.get("frames") != mine.get("frames"):  # a video loader's frame spec (absent for images only)
        raise StateError(
            f"state was saved with frames={saved.get('frames')!r}, this loader has frames={mine.get('frames')!r} "
            "(the frame buckets, fps, clip, stride and clip_count); build the loader with the same video options "
            "to resume"
        )
    for name in MUST_MATCH:
        a, b = saved[name], mine[name]
        if name == "buckets":
            a, b = _per_dataset(a, datasets), _per_dataset(b, datasets)
        if a != b:
            what = "another manifest (same size, other content)" if name == "manifest" else None
            raise StateError(
                f"state was saved with {what or f'{name}={saved[name]!r}'}, this loader has "
                f"{'its own' if what else f'{name}={mine[name]!r}'}; build the loader with the same options "
                "and manifest to resume"
            )
    if saved["batching"] is not None or mine["batching"] is not None:
        same = (saved["world_size"], saved["batching"]) == (mine["world_size"], mine["batching"])
        if not same and saved["world_size"] == mine["world_size"]:
            raise StateError(
                f"state was saved with batch sizes {_sizing_words(saved)}, this loader has {_sizing_words(mine)}; "
                "build the loader with the same batch sizes to resume"
            )
        if not same and not (mine["sync_ranks"] and list(units(saved)) == list(units(mine))):
            raise StateError(
                f"state was saved with world_size {saved['world_size']} x batching {saved['batching'] or saved['batch_size']}; "
                f"this loader has {mine['world_size']} x {mine['batching'] or mine['batch_size']}, which gives another "
                "global batch for some bucket; resuming on another world size needs the same global batch of every "
                "bucket (world size x its batch) and sync_ranks=True"
            )
        return
    saved_global = saved["world_size"] * saved["batch_size"]
    here_global = mine["world_size"] * mine["batch_size"]
    if (saved["world_size"], saved["batch_size"]) != (mine["world_size"], mine["batch_size"]):
        if not mine["sync_ranks"] or saved_global != here_global:
            per_rank = saved_global // mine["world_size"] if saved_global % mine["world_size"] == 0 else "?"
            raise StateError(
                f"state was saved with world_size {saved['world_size']} x batch_size {saved['batch_size']} = "
                f"{saved_global}; this loader has {mine['world_size']} x {mine['batch_size']} = {here_global}. "
                "Resuming on another world size needs the same global batch and sync_ranks=True "
                f"(here: batch_size {per_rank})"
            )


def _sizing_words(state: dict[str, Any]) -> str:
    """A state's batch sizes as the loader's keywords spell them: ``batch_size=4``, ``batch_pixels=1048576 ...``."""
    if state["batching"] is None:
        return f"batch_size={state['batch_size']}"
    given = {k: v for k, v in state["batching"].items() if v is not None and not (k == "batch_multiple" and v == 1)}
    return " ".join(f"{k}={v}" for k, v in given.items())


def _check_format(state: dict[str, Any]) -> None:
    if state.get("format") in (1, 2):
        raise StateError(
            f"state format {state['format']} was saved by an earlier dali_arb, whose plans differ from this version's "
            f"(format {STATE_FORMAT}): the saved step does not name the same batch here; to go on at its epoch, call "
            f"loader.set_epoch({state.get('epoch')!r}) instead of load_state_dict (the epoch starts again)"
        )
    if state.get("format") == 3 and state.get("step") != 0:
        raise StateError(
            f"state format 3 was saved by an earlier dali_arb, whose plans differ from this version's (format "
            f"{STATE_FORMAT}: what an epoch trims is drawn from all images, fractional repeats are rounded so that every "
            f"image is served alike): step {state.get('step')!r} of epoch {state.get('epoch')!r} names another batch "
            f"here, and going on from it would serve some images of that epoch twice and others never; call "
            f"loader.set_epoch({state.get('epoch')!r}) instead of load_state_dict (the epoch starts again), or load a "
            "state saved at an epoch's start, which carries over exactly"
        )
    if state.get("format") not in (3, 4, STATE_FORMAT):  # 3 at an epoch's start: its epoch is planned anew, whole
        raise StateError(
            f"not a DALIBucketIterator state of this version (format {state.get('format')!r}, this dali_arb reads "
            f"{STATE_FORMAT}); save it again with this version"
        )


def _check_counts(state: dict[str, Any]) -> None:
    for name in ("epoch", "step", "seed", "batch_size", "world_size", "num_images"):
        value = state.get(name)
        if name == "batch_size" and value is None and state.get("batching") is not None:
            continue  # batch sizes by bucket: ``batching`` says them
        positive = name in ("batch_size", "world_size")
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
            raise StateError(f"state field {name!r} must be a {'positive' if positive else 'non-negative'} integer, got {value!r}")  # fmt: skip
        if value > (MAX_EPOCH if name == "epoch" else 2**63 - 1):
            raise StateError(f"state field {name!r} is out of range (at most {'2**62' if name == 'epoch' else '2**63 - 1'}), got {value!r}")  # fmt: skip


def checked_state(state: Any) -> dict[str, Any]:
    """``state`` with its format and its fields' types checked; a StateError naming the first bad field."""
    if not isinstance(state, dict):
        raise StateError(f"not a DALIBucketIterator state: a {type(state).__name__}, not a dict")
    _check_format(state)
    checked = dict(state)
    if state.get("format") in (3, 4):  # before batch sizes by bucket: every state had one batch size
        checked.setdefault("batching", None)
        state = checked
    _check_counts(state)
    missing = [name for name in STATE_FIELDS if name not in state]
    if missing:
        raise StateError(
            f"state has no {', '.join(map(repr, missing))} field{'s' if len(missing) > 1 else ''}, which every state of "
            "this version holds (it was edited or made by hand); load the dict that loader.state_dict() returned"
        )
    if not isinstance(state.get("failed", {}), dict):
        raise StateError(f"state field 'failed' must map keys to reasons, got {type(state['failed']).__name__}")
    rows = state.get("failed_rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows):
        raise StateError(f"state field 'failed_rows' must be a list of manifest rows, got {rows!r:.80}")
    if state["batching"] is not None:
        try:
            checked["batching"] = BatchSizing.from_dict(state["batching"]).to_dict()
        except (ConfigError, TypeError, AttributeError, ValueError) as exc:
            raise StateError(f"state field 'batching' is not a batch sizing ({exc})") from None
    buckets = state.get("buckets")
    try:
        if isinstance(buckets, list):
            checked["buckets"] = [BucketSpec.from_dict(b).to_dict() for b in buckets]
        else:
            checked["buckets"] = BucketSpec.from_dict(buckets).to_dict()
    except (ConfigError, TypeError) as exc:
        raise StateError(f"state field 'buckets' is not a bucket spec ({exc})") from None
    return checked
