"""Where this process sits in a (possibly distributed) job: rank, world size, local rank."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..errors import ConfigError

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
        """The world from explicit values, else ``torch.distributed`` (if initialised), else the launcher's
        environment, each launcher's variables read together (:data:`LAUNCHERS`): torchrun's ``RANK`` and
        ``WORLD_SIZE``, else Open MPI's, else PMI's (MPICH, Intel MPI, ``srun --mpi``), else ``srun``'s
        (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``); else a single process.

        A launcher's partial set (``WORLD_SIZE`` without ``RANK``) and a world size without a rank are refused:
        every process would be rank 0, serving part of the data several times and the rest never. (A batch
        script run without ``srun`` has ``SLURM_PROCID`` but no step size: one process.) torch is never imported
        here: it is consulted only if the program already imported it.
        """
        found = _from_torch() or _from_launcher()
        env_rank, env_world, local, local_world = found or (None, None, 0, _env_int("LOCAL_WORLD_SIZE", 1))
        if world_size is None:
            world_size = 1 if env_world is None else env_world
        if rank is None:
            if env_rank is None and isinstance(world_size, int) and world_size > 1:
                raise ConfigError(
                    f"world_size {world_size} is given but no rank: pass rank= too (or launch with torchrun, which "
                    "sets RANK and WORLD_SIZE)"
                )
            rank = 0 if env_rank is None else env_rank
        return cls(rank=rank, world_size=world_size, local_rank=local, local_world_size=local_world)


#: Launchers, in the order consulted: (rank, size, local rank, local size) variables, and whether the rank alone,
#: without the size, means "not launched by it" (a SLURM batch script has SLURM_PROCID) rather than a mistake.
LAUNCHERS = (
    (("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"), False),  # torchrun
    (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        False,
    ),
    (("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"), False),
    (("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"), True),  # srun
)


def _from_torch() -> tuple[int, int, int, int] | None:
    """``(rank, world size, local rank, local world size)`` from ``torch.distributed`` when it is initialised."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)


def _from_launcher() -> tuple[int, int, int, int] | None:
    """The world from the first launcher of :data:`LAUNCHERS` whose variables are set, all from that launcher; a
    ConfigError naming the variables when it set one of rank and size without the other."""
    for (rank_name, size_name, local_name, local_size_name), rank_alone_is_none in LAUNCHERS:
        has_rank, has_size = (os.environ.get(name, "") != "" for name in (rank_name, size_name))
        if not (has_rank or has_size) or (rank_alone_is_none and not has_size):
            continue
        if has_rank != has_size:
            there, missing = (rank_name, size_name) if has_rank else (size_name, rank_name)
            raise ConfigError(
                f"{there}={os.environ[there]} is set but {missing} is not, so every process would be rank 0; set "
                f"both {rank_name} and {size_name} (torchrun sets RANK and WORLD_SIZE), or pass rank= and "
                "world_size= to the loader"
            )
        local_world = _env_int(local_size_name, 0, strict=False) or _env_int("LOCAL_WORLD_SIZE", 1)
        return _env_int(rank_name, 0), _env_int(size_name, 1), _env_int(local_name, 0), local_world
    return None


def _env_int(name: str, default: int, *, strict: bool = True) -> int:
    """The environment variable ``name`` as an integer (``default`` when unset); not an integer: a ConfigError,
    or ``default`` when not ``strict`` (SLURM writes some counts as ``4(x2)``)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        if not strict:
            return default
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None
