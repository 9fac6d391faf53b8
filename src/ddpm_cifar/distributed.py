"""Sharding work across the ranks of an initialised torch.distributed process group.

Sampling shards by seed: rank r of w samples seeds r, r + w, r + 2w, ... and rank 0 puts the images
back in seed order. Because every image owns its noise (a function of its seed) and the network
always sees full batches of the same shape (:class:`~ddpm_cifar.sampling.FixedBatch`), the result
is bit for bit the single-process one on CPU.

The process group is set up by the caller (a stage launched by torchrun); this module only uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import Module

from .diffusion import GaussianDiffusion, Model
from .fid import FidStats, compute_statistics, inception_features, statistics
from .sampling import generate_images

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items rank, rank + world, ...: interleaved, so every rank gets a near-equal share."""
    return list(items[rank::world])


def unshard(parts: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Inverse of :func:`shard` for arrays: parts[r][k] is item r + k * world."""
    world = len(parts)
    out = np.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def gather_to_main(local: np.ndarray, n: int) -> np.ndarray | None:
    """All ranks' shards, in item order, on rank 0; None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    return unshard(parts, n) if rank == 0 else None  # type: ignore[arg-type]


def generate_images_sharded(model: Model, diffusion: GaussianDiffusion, seeds: Sequence[int],
                            **kwargs: Any) -> np.ndarray | None:
    """:func:`~ddpm_cifar.sampling.generate_images` split across the process group's ranks.

    Returns uint8 (N, H, W, C) in seed order on rank 0 and None elsewhere. Keyword arguments are
    generate_images'; its progress bar is shown on rank 0 only.
    """
    rank, world = rank_and_world()
    kwargs["progress"] = kwargs.get("progress", True) and rank == 0
    if kwargs.get("cache_dir") is not None and world > 1:
        # Each rank resumes its own shard; the batch files of different shards must not mix.
        kwargs["cache_dir"] = Path(kwargs["cache_dir"]) / f"rank{rank}-of-{world}"
    local = generate_images(model, diffusion, shard(seeds, rank, world), **kwargs)
    return gather_to_main(local, len(seeds))


def statistics_sharded(images: np.ndarray | None, model: Module, *, n: int, batch_size: int,
                       device: torch.device | str) -> FidStats | None:
    """FID statistics with Inception feature extraction split across ranks.

    ``images`` (uint8 NHWC, all ``n`` of them) need only be on rank 0, which sends each rank its
    shard; the features come back to rank 0, which returns the statistics (None elsewhere).
    Features of a shard may differ from a single-process run in the last float32 bits (other
    batch compositions), far below what FID resolves."""
    rank, world = rank_and_world()
    if world == 1:
        assert images is not None
        return compute_statistics(images, model, batch_size=batch_size, device=device)
    shards: list[Any] | None = None
    if rank == 0:
        assert images is not None and len(images) == n
        shards = [images[r::world] for r in range(world)]  # (n_r, H, W, 3) each
    received: list[Any] = [None]
    dist.scatter_object_list(received, shards, src=0)
    local = received[0]
    feats = inception_features(local, model, batch_size=batch_size, device=device, progress=rank == 0)
    gathered = gather_to_main(feats, n)
    return statistics(gathered) if gathered is not None else None
