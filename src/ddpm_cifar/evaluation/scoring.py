"""FID of generated images against cached reference statistics: of a sample set, of a model (sampled
with the sample section's settings) and during training. What makes an FID comparable: reports.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion.generate import for_sampling, generate_images_sharded
from ..diffusion.process import GaussianDiffusion, Model
from ..diffusion.samplers import SAMPLING_VERSION
from ..runtime.config import SampleConfig, SamplerConfig, TrainConfig
from ..runtime.distributed import broadcast_from_main
from ..runtime.fileio import file_digest
from .fid import FidStats, frechet_distance, load_inception, load_stats, statistics_sharded
from .reports import check_same_inception

# What train() calls for the training-time FID, on every rank: (EMA model, diffusion) -> FID.
FidFn = Callable[[torch.nn.Module, GaussianDiffusion], float]


def fid_sharded(images: np.ndarray, inception: torch.nn.Module, ref: FidStats, *, batch_size: int,
                device: torch.device, progress: bool = True) -> float:
    """FID of ``images`` (the same on every rank), Inception's batches split over the process
    group's ranks; every rank returns the value. Without a group, one process does it all."""
    stats = statistics_sharded(images, inception, batch_size=batch_size, device=device, progress=progress)
    return broadcast_from_main(frechet_distance(stats, ref) if stats is not None else float("nan"))


def fid_of_model(model: Model, diffusion: GaussianDiffusion, cfg: SampleConfig, inception: torch.nn.Module,
                 ref: FidStats, *, shape: tuple[int, int, int], fid_batch_size: int, device: torch.device,
                 cache_dir: Path | None = None, cache_key: str = "", desc: str = "sample") -> float:
    """Sample ``cfg.n`` images (C, H, W) = ``shape`` with the sample section's settings and seeds, and
    score them, both sharded over the process group's ranks (every rank returns the FID)."""
    seeds = [cfg.seed + i for i in range(cfg.n)]
    images = generate_images_sharded(model, diffusion, seeds, cfg.sampler,
                                     batch_size=cfg.batch_size, shape=shape, device=device,
                                     cache_dir=cache_dir, cache_key=cache_key, desc=desc, everywhere=True)
    assert images is not None
    return fid_sharded(images, inception, ref, batch_size=fid_batch_size, device=device)


def training_fid_fn(inception: torch.nn.Module, ref: FidStats, spec: SamplerConfig, *, n: int,
                    batch_size: int, shape: tuple[int, int, int], device: torch.device) -> FidFn:
    """FID of the EMA model during training, sampled with ``spec``: the same seeds 0..n-1 every
    time, for a smooth curve.

    In a process group the ranks share the sampling and the Inception batches."""
    seeds = list(range(n))

    def fid(model: torch.nn.Module, diffusion: GaussianDiffusion) -> float:
        images = generate_images_sharded(for_sampling(model, device), diffusion, seeds, spec,
                                         batch_size=batch_size, shape=shape, device=device, progress=False,
                                         everywhere=True)
        assert images is not None
        return fid_sharded(images, inception, ref, batch_size=batch_size, device=device, progress=False)

    return fid


def training_fid(inception_weights: str | Path, ref_path: Path, cfg: TrainConfig, shape: tuple[int, int, int],
                 device: torch.device) -> tuple[FidFn, str, dict[str, Any]]:
    """The training-time FID as train() takes it: the function, its id, and what it is measured
    against, for the metrics."""
    inception, info = load_inception(inception_weights, device)
    ref, ref_meta = load_stats(ref_path)
    check_same_inception(ref_meta, info)
    fid_id = training_fid_id(info.sha256, file_digest(ref_path), cfg)
    meta = {"fid_inception_official": info.official, "fid_reference": ref_meta.get("reference"),
            "fid_reference_n": ref_meta.get("reference_n"), "fid_samples": cfg.fid_samples}
    fn = training_fid_fn(inception, ref, cfg.fid_sampler, n=cfg.fid_samples,
                         batch_size=cfg.fid_batch_size, shape=shape, device=device)
    return fn, fid_id, meta


def training_fid_id(inception_sha256: str, ref_digest: str, cfg: TrainConfig) -> str:
    """What the training-time FID curve depends on besides the weights: when it changes, the curve
    already logged is dropped rather than continued with values that are not comparable."""
    return (f"{inception_sha256}:{ref_digest}:{SAMPLING_VERSION}:{cfg.fid_samples}:"
            f"{cfg.fid_sampler.key()}:{cfg.fid_batch_size}")
