"""Where this process sits in a (possibly distributed) job: rank, world size, local rank."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["World"]


@dataclass(frozen=True)
class World:
    """A process's place in the job. Inject it; tests build ``World(rank=r, world_size=8)`` directly.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes that share the data.
        local_rank: rank on this node; picks the GPU (``device_id``).
        local_world_size: processes of the job on this node; they share its cores.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "local_rank", "local_world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.world_size < 1:
            raise ConfigError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"rank must be in [0, {self.world_size - 1}] for world_size {self.world_size}, got {self.rank}"
            )
        if self.local_rank < 0:
            raise ConfigError(f"local_rank must not be negative, got {self.local_rank}")
        if self.local_world_size < 1:
            raise ConfigError(f"local_world_size must be at least 1, got {self.local_world_size}")

    @classmethod
    def detect(cls, rank: int | None = None, world_size: int | None = None) -> World:
        """The world from explicit values, else ``torch.distributed`` (if initialised), else
        torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process.
        ``LOCAL_WORLD_SIZE`` (set by torchrun) gives the processes on this node, else 1.

        torch is never imported here: it is consulted only if the program already imported it.
        """
        env_rank, env_world, local = 0, 1, 0
        dist = getattr(sys.modules.get("torch"), "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            env_rank, env_world = dist.get_rank(), dist.get_world_size()
            local = _env_int("LOCAL_RANK", 0)
        elif "WORLD_SIZE" in os.environ or "RANK" in os.environ:
            env_rank = _env_int("RANK", 0)
            env_world = _env_int("WORLD_SIZE", 1)
            local = _env_int("LOCAL_RANK", 0)
        return cls(
            rank=env_rank if rank is None else rank,
            world_size=env_world if world_size is None else world_size,
            local_rank=local,
            local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
        )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None
