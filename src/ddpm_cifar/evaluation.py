"""FID of generated images against cached reference statistics, and what makes it comparable."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SampleConfig, TrainConfig
from .diffusion import GaussianDiffusion, Model
from .distributed import broadcast_from_main, generate_images_sharded, statistics_sharded
from .errors import UserError
from .fid import FidStats, InceptionInfo, frechet_distance, load_inception, load_stats
from .fileio import file_digest
from .sampling import SAMPLING_VERSION, for_sampling
from .train import FidFn

# The measured pretrained model's name in metrics and plots, beside the quoted baselines.
PRETRAINED = "pretrained DDPM (measured)"


def reference_meta(name: str, n: int, data_meta: dict[str, Any], info: InceptionInfo) -> dict[str, Any]:
    """What a set of reference statistics was computed from."""
    official_data = bool(data_meta.get("official", False))
    return {
        "reference": name,
        "reference_n": n,
        "reference_official": official_data and name == "cifar10-train" and n == 50000,
        "data_official": official_data,
        "data_source": data_meta.get("source"),
        "inception_sha256": info.sha256,
        "inception_official": info.official,
    }


def comparability(ref_meta: dict[str, Any], info: InceptionInfo, n_samples: int) -> list[str]:
    """Reasons an FID cannot be compared with published CIFAR-10 numbers (empty if it can)."""
    reasons = []
    if not info.official:
        reasons.append("Inception weights are not the official pt_inception-2015-12-05 file")
    if not ref_meta.get("reference_official", False):
        name, n = ref_meta.get("reference"), ref_meta.get("reference_n")
        if not ref_meta.get("data_official", False):
            reasons.append(f"reference {name} is not from the official CIFAR-10 archive "
                           f"(source: {ref_meta.get('data_source')})")
        if name != "cifar10-train" or n != 50000:
            reasons.append(f"reference is {name} with {n} images, not the 50,000-image train set")
    if n_samples < 10000:
        reasons.append(f"only {n_samples} samples (published FIDs use 10k-50k)")
    return reasons


def check_same_inception(ref_meta: dict[str, Any], info: InceptionInfo) -> None:
    want = ref_meta.get("inception_sha256")
    if want and want != info.sha256:
        raise UserError(
            f"the reference statistics were computed with Inception weights {want[:12]}, but "
            f"{info.path} is {info.sha256[:12]}: rerun the ref_stats stage (dvc repro ref_stats)"
        )


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
    images = generate_images_sharded(model, diffusion, seeds, sampler=cfg.sampler, steps=cfg.steps,
                                     eta=cfg.eta, spacing=cfg.spacing, shape=shape, clip_x0=cfg.clip_x0,
                                     batch_size=cfg.batch_size, device=device, amp=True, cache_dir=cache_dir,
                                     cache_key=cache_key, desc=desc, everywhere=True)
    assert images is not None
    return fid_sharded(images, inception, ref, batch_size=fid_batch_size, device=device)


def training_fid_fn(inception: torch.nn.Module, ref: FidStats, *, n: int, sampler: str, steps: int,
                    spacing: str, batch_size: int, shape: tuple[int, int, int],
                    device: torch.device) -> FidFn:
    """FID of the EMA model during training: the same seeds 0..n-1 every time, for a smooth curve.

    In a process group the ranks share the sampling and the Inception batches."""
    seeds = list(range(n))

    def fid(model: torch.nn.Module, diffusion: GaussianDiffusion) -> float:
        images = generate_images_sharded(for_sampling(model, device), diffusion, seeds, sampler=sampler,
                                         steps=steps, spacing=spacing, batch_size=batch_size, shape=shape,
                                         device=device, amp=True, progress=False, everywhere=True)
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
    fn = training_fid_fn(inception, ref, n=cfg.fid_samples, sampler=cfg.fid_sampler,
                         steps=cfg.fid_sample_steps, spacing=cfg.fid_spacing, batch_size=cfg.fid_batch_size,
                         shape=shape, device=device)
    return fn, fid_id, meta


def fid_report(value: float, *, n_samples: int, sample_cfg: dict[str, Any], ref_meta: dict[str, Any],
               info: InceptionInfo, baselines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    reasons = comparability(ref_meta, info, n_samples)
    return {
        "fid": round(float(value), 4),
        "n_samples": n_samples,
        "reference": ref_meta.get("reference"),
        "reference_n": ref_meta.get("reference_n"),
        "reference_official": bool(ref_meta.get("reference_official")),
        "inception_sha256": info.sha256,
        "inception_official": info.official,
        "comparable": not reasons,
        "not_comparable_because": reasons,
        "sampler": sample_cfg.get("sampler"),
        "sampling_steps": sample_cfg.get("steps"),
        "baselines": {b["name"]: b["fid"] for b in baselines},
    }


def sample_cache_key(ckpt_sha256: str, cfg: SampleConfig, device: torch.device) -> str:
    """What finished sample batches depend on; the device too, since CUDA runs under bf16."""
    # batch_size too: the network always sees full batches of it, and its rounding depends on it
    return (f"{SAMPLING_VERSION}:{ckpt_sha256}:{cfg.sampler}:{cfg.steps}:{cfg.eta}:{cfg.spacing}:"
            f"{cfg.seed}:{cfg.clip_x0}:{cfg.compile}:{cfg.batch_size}:{device.type}")


def training_fid_id(inception_sha256: str, ref_digest: str, cfg: TrainConfig) -> str:
    """What the training-time FID curve depends on besides the weights: when it changes, the curve
    already logged is dropped rather than continued with values that are not comparable."""
    return (f"{inception_sha256}:{ref_digest}:{SAMPLING_VERSION}:{cfg.fid_samples}:{cfg.fid_sampler}:"
            f"{cfg.fid_sample_steps}:{cfg.fid_spacing}:{cfg.fid_batch_size}")
