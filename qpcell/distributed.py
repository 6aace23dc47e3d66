"""Training on several GPUs (or CPU processes): DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node=N -m qpcell train ...`` starts N copies of ``qpcell train`` and
gives each the variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. With these hooks each copy

1. joins the process group (:func:`setup`: NCCL on CUDA, gloo on CPU) and takes GPU
   ``LOCAL_RANK``;
2. trains on its share of every epoch's patch windows (:func:`shard`, the rule of torch's
   ``DistributedSampler``: every rank gets as many windows, so all take the same number of
   steps);
3. runs the model through :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`),
   which averages the gradients over the ranks after each backward, so every rank keeps the
   same weights;
4. leaves validation, the model folder, the log and the resume state to rank 0
   (:func:`is_main`), which shares its validation result (:func:`broadcast`); the others wait.

Without ``WORLD_SIZE`` > 1 every hook does nothing, so one code path serves both. The batch
size is per process: N processes train with N times the batch (the learning rate is not
scaled).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch

from qpcell.errors import QpcellError

T = TypeVar("T")

#: Collectives wait this long (minutes) for the slowest rank, e.g. rank 0 validating.
DEFAULT_TIMEOUT_MINUTES = 60.0


@dataclass(frozen=True)
class Context:
    """This process's place in the training job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """Several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates, saves and logs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise QpcellError(f"environment variable {name}={value!r} is not a whole number") \
            from None


def env_ranks() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` from torchrun's variables."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < max(world, 1) and 0 <= local_rank < max(local_world, 1)):
        raise QpcellError(f"RANK={rank} / LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}"
                          f" / LOCAL_WORLD_SIZE={local_world}")
    return rank, world, local_rank, local_world


def rank_device(requested: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank``: GPU ``local_rank`` when CUDA is wanted
    (or available and nothing is asked), else the CPU."""
    from qpcell.device import pick_device

    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested in (None, "", "auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if requested == "cuda":
            pick_device("cuda")  # raises the usual one-line error
        return torch.device("cpu")
    device = pick_device(requested)
    if device.type == "cuda":
        raise QpcellError(f"--device {requested}: under torchrun every process takes GPU "
                          "LOCAL_RANK; use --device cuda (choose GPUs with "
                          "CUDA_VISIBLE_DEVICES)")
    if device.type != "cpu":
        raise QpcellError(f"--device {requested}: training in several processes needs CUDA "
                          "GPUs or the CPU")
    return device


def setup(device: str | torch.device | None = None, *, backend: str | None = None,
          timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Context:
    """Join the torchrun job described by the environment, once per process.

    Parameters
    ----------
    device
        As ``--device``; under torchrun ``None`` or ``"cuda"`` means GPU ``LOCAL_RANK``.
    backend
        ``"nccl"`` (default on CUDA) or ``"gloo"`` (default on the CPU).
    timeout_minutes
        How long a collective waits for the other ranks.

    Returns
    -------
    Context
        A single process (``WORLD_SIZE`` unset or 1) gets rank 0 of 1 on
        :func:`qpcell.device.pick_device`'s device, and no process group.
    """
    import torch.distributed as dist

    from qpcell.device import pick_device

    rank, world, local_rank, local_world = env_ranks()
    if world <= 1:
        dev = device if isinstance(device, torch.device) else pick_device(device)
        return Context(device=dev)
    dev = rank_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_available():
        raise QpcellError("this torch build has no torch.distributed")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise QpcellError(f"WORLD_SIZE={world} but {name} is not set: start training "
                                  "with torchrun")
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes))
        atexit.register(cleanup)
    return Context(rank, world, local_rank, local_world, dev, dist.get_backend())


def cleanup() -> None:
    """Leave the process group (at exit; harmless when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main(ctx: Context | None = None) -> bool:
    """Whether this process is rank 0 (of ``ctx``, else of the environment)."""
    if ctx is not None:
        return ctx.is_main
    return env_ranks()[0] == 0


def wrap(model: torch.nn.Module, ctx: Context, *, find_unused_parameters: bool = False,
         sync_batchnorm: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (the model itself when not distributed).

    Call the wrapper for the forward pass only; the loss, ``maps``, ``spec``, the optimizer,
    ``state_dict`` and saving stay on the unwrapped model (:func:`unwrap`). Every qpcell model
    uses all its parameters in every step, so ``find_unused_parameters`` stays off.
    ``sync_batchnorm`` (CUDA only) computes batch-norm statistics over all ranks' patches.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if ctx.device.type != "cuda":
            raise QpcellError("synchronised batch norm needs CUDA")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(items: Sequence[T], ctx: Context) -> list[T]:
    """This rank's share of ``items``, as torch's ``DistributedSampler`` (no shuffle) deals.

    The list is padded by repeating its first items to a multiple of the world size; rank
    ``r`` takes items ``r, r + W, r + 2W, ...``. Every rank gets ``ceil(n / W)`` items, so
    all ranks take the same number of optimiser steps, and together they cover every item.
    """
    items = list(items)
    if not ctx.distributed or not items:
        return items
    total = math.ceil(len(items) / ctx.world_size) * ctx.world_size
    padded = items + [items[i % len(items)] for i in range(total - len(items))]
    return padded[ctx.rank:total:ctx.world_size]


def barrier(ctx: Context) -> None:
    """Wait until every rank gets here."""
    if ctx.distributed:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def broadcast(obj: T, ctx: Context, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (anything picklable) on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src,
                               device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def mean_over_ranks(value: float, ctx: Context) -> float:
    """The mean of ``value`` over all ranks (e.g. an epoch's loss for the log)."""
    if not ctx.distributed:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


# --------------------------------------------------------------------------------------------
# data loading and CPU threads
# --------------------------------------------------------------------------------------------

def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class LoaderSettings:
    """DataLoader workers and torch threads for one training process.

    Attributes
    ----------
    num_workers
        DataLoader worker processes (0 = patches are cut in the training process).
    pin_memory
        Page-locked batches, for faster copies to a CUDA GPU.
    torch_threads
        ``torch.set_num_threads`` for the training process.
    """

    num_workers: int
    pin_memory: bool
    torch_threads: int

    def loader_kwargs(self) -> dict:
        """Keyword arguments for ``torch.utils.data.DataLoader``."""
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory}


def default_loader_settings(device: str | torch.device, *, cores: int | None = None,
                            local_world_size: int | None = None,
                            forks: bool | None = None) -> LoaderSettings:
    """Sensible defaults for the cores this process has.

    The machine's usable cores are shared by the training processes on it
    (``local_world_size``, default torchrun's ``LOCAL_WORLD_SIZE`` or 1). Then:

    * CUDA: the GPU does the arithmetic, so up to 4 loader workers prepare patches (none with
      2 cores or fewer: they would only take turns with the process feeding the GPU), batches
      in pinned memory, torch threads = the cores left (at least 1).
    * CPU and MPS: the model needs the cores and cutting patches is light, so 2 loader workers
      only from 8 cores per process on, and only where workers are forked (``forks``,
      default: on Linux; elsewhere each epoch's workers would start a new Python); torch
      threads = the cores left.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    total = usable_cores() if cores is None else int(cores)
    local = (env_ranks()[3] if local_world_size is None else int(local_world_size)) or 1
    per_process = max(1, total // max(1, local))
    if device.type == "cuda":
        workers = 0 if per_process <= 2 else min(4, per_process - 1)
        return LoaderSettings(workers, True, max(1, per_process - workers))
    forks = sys.platform.startswith("linux") if forks is None else forks
    workers = 2 if (per_process >= 8 and forks) else 0
    return LoaderSettings(workers, False, max(1, per_process - workers))


__all__ = ["Context", "setup", "cleanup", "env_ranks", "rank_device", "is_main", "wrap",
           "unwrap", "shard", "barrier", "broadcast", "mean_over_ranks", "LoaderSettings",
           "default_loader_settings", "usable_cores", "DEFAULT_TIMEOUT_MINUTES"]
