"""The torch.distributed process group, as torchrun sets one up, and its collectives.

A stage joins the group with :func:`process_group` (it passes the launcher's rank facts in: the
library reads no environment). Everything else here only uses the group, and is a no-op without
one, so a single process runs the same code. What is sharded lives beside what it shards:
``sampling.generate_images_sharded`` and ``fid.statistics_sharded``.

Sampling and Inception shard by whole batches: of the batches one process would run, rank r of w
runs batches r, r + w, r + 2w, ... and the results are put back in order. Every image owns its
noise (a function of its seed), the network always sees full batches of the same shape
(:class:`~ddpm_cifar.diffusion.generate.FixedBatch`), and each batch holds the same images as in one process,
so the images and features are those of a single-process run, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")
S = TypeVar("S", bound=Sequence[Any] | np.ndarray)

# A rank that waits longer than this in a collective gives up with an error instead of hanging
# for PyTorch's default 10-30 minutes. Generous: rank 0 alone writes checkpoints and W&B sample
# grids while the others wait at the next collective. (On one machine torchrun stops the other
# ranks as soon as one fails; ranks on other machines wait until this timeout.)
COLLECTIVE_TIMEOUT = timedelta(minutes=20)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the rank that writes files, logs and metrics (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


@contextlib.contextmanager
def process_group(world_size: int, rank: int, local_rank: int) -> Iterator[torch.device]:
    """Join the launcher's process group and yield this rank's device.

    ``world_size``, ``rank`` and ``local_rank`` are what torchrun exports (WORLD_SIZE, RANK,
    LOCAL_RANK); with ``world_size`` 1 no group is made. NCCL on GPUs (one per local rank), gloo on
    CPU. A :class:`UserError` raised inside is re-raised with the rank in front, so that the line
    names the rank when several print at once.

    The group is only torn down on success: after an error this rank exits at once, and torchrun
    then stops the others, rather than waiting in a teardown that needs every rank.
    """
    if world_size <= 1:
        yield torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank}: local rank {local_rank} has no GPU: only "
                            f"{torch.cuda.device_count()} visible (lower distributed.nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield device
    except UserError as exc:
        raise UserError(f"rank {rank}: {exc}") from None
    dist.destroy_process_group()


def batch_indices(n: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Positions of the items rank ``rank`` handles: whole batches rank, rank + world, ... of the
    batches of ``batch_size`` that one process would make of ``n`` items.

    Whole batches, not interleaved items, because on a GPU a network's output for an image can
    depend on the other images in its batch: a rank then computes exactly what one process would.
    """
    starts = range(rank * batch_size, n, world * batch_size)
    if not starts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s, min(s + batch_size, n)) for s in starts])


def shard(items: S, batch_size: int, rank: int, world: int) -> S:
    """This rank's items (a list or an array), as :func:`batch_indices` picks them."""
    idx = batch_indices(len(items), batch_size, rank, world)
    if isinstance(items, np.ndarray):
        return items[idx]  # type: ignore[return-value]
    return [items[i] for i in idx]  # type: ignore[return-value]


def unshard(parts: Sequence[np.ndarray], n: int, batch_size: int) -> np.ndarray:
    """Inverse of :func:`shard` for arrays: ``parts[r]`` is rank r's share, in its order."""
    world = len(parts)
    out = np.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[batch_indices(n, batch_size, r, world)] = part
    return out


def gather_to_main(local: np.ndarray, n: int, batch_size: int) -> np.ndarray | None:
    """All ranks' shards, in item order, on rank 0; None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    return unshard(parts, n, batch_size) if rank == 0 else None  # type: ignore[arg-type]


def gather_to_all(local: np.ndarray, n: int, batch_size: int) -> np.ndarray:
    """All ranks' shards, in item order, on every rank."""
    world = rank_and_world()[1]
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return unshard(parts, n, batch_size)


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_agree(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every rank holds the same values, judged by per-tensor float64 sums (cheap:
    a few hundred numbers cross the network, not the weights)."""
    if rank_and_world()[1] == 1:
        return True
    sums = torch.stack([t.detach().double().sum() for t in tensors])  # (len(tensors),)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN)
    dist.all_reduce(high, dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (every rank must call this)."""
    if rank_and_world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The average of a per-rank number (e.g. the loss of each rank's share of the batch)."""
    world = rank_and_world()[1]
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return float(t.item()) / world
