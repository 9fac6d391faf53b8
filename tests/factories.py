"""Tiny configurations shared by the tests (T = 20, a U-Net of a few hundred thousand weights)."""

from __future__ import annotations

import contextlib
import socket
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig, SamplerConfig, TrainConfig
from ddpm_cifar.training.loop import TrainOutputs


def tiny_model(**kw: object) -> ModelConfig:
    base = dict(image_size=8, channels=3, dim=16, dim_mults=(1, 2), num_res_blocks=1,
                full_attn=(False, True), attn_heads=2, attn_dim_head=8, dropout=0.0, arch="unet")
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


def tiny_diffusion(**kw: object) -> DiffusionConfig:
    base = dict(timesteps=20, beta_schedule="linear", objective="pred_noise", min_snr_gamma=None)
    return DiffusionConfig(**{**base, **kw})  # type: ignore[arg-type]


def tiny_train(**kw: object) -> TrainConfig:
    # The EMA copies the weights at steps 1 and 2 (at most ema_start_step = 1 step done before each),
    # then averages with the study's warm-up: decay 0.37, 0.52, 0.60, 0.66 at steps 3 to 6.
    base = dict(steps=6, batch_size=4, grad_accum=2, lr=1e-3, adam_betas=(0.9, 0.99),
                max_grad_norm=1.0, ema_decay=0.9, ema_update_every=1, ema_start_step=1,
                ema_inv_gamma=1.0, ema_power=2 / 3, warmup_steps=0,
                amp=True, seed=0, checkpoint_every=3, fid_every=0,
                fid_samples=8, fid_sampler=SamplerConfig("ddpm", 5, "uniform"),
                fid_batch_size=8, sample_grid_every=0, best_metric=None)
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


class FakeWandb(types.ModuleType):
    """Stands in for the ``wandb`` module (monkeypatch it into sys.modules): records the keyword
    arguments of every ``init`` and gives runs the id passed in, else ``new-<n>``."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[dict[str, Any], int]] = []

    def init(self, **kwargs: Any) -> types.SimpleNamespace:
        self.inits.append(kwargs)
        run_id = kwargs.get("id") or f"new-{len(self.inits)}"
        return types.SimpleNamespace(id=run_id, name=kwargs.get("name") or f"auto-{run_id}",
                                     log=lambda values, step: self.logged.append((values, step)),
                                     finish=lambda: None)

    @staticmethod
    def Settings(**kwargs: Any) -> dict[str, Any]:  # noqa: N802 - wandb's name
        return kwargs


def random_images(n: int = 16, size: int = 8, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 images of random pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def train_outputs(root: Path) -> TrainOutputs:
    """The training outputs under ``root`` (DVCLive's folder: ``root/dvclive``)."""
    return TrainOutputs(checkpoint=root / "checkpoint.pt", ema=root / "ema.pt", live=root / "dvclive")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: for tensors this small, threads only add overhead (and
    spin-waiting threads slow the tests badly when other jobs load the CPUs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it), for a server under test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_checkpoint(path: Path, *, seed: int = 0, step: int = 7, model: dict | None = None,
                         diffusion: dict | None = None) -> Path:
    """A checkpoint in the format training writes (EMA weights only), with random weights."""
    from ddpm_cifar.models import checkpoint
    from ddpm_cifar.models.unet import UNet

    model_cfg, diffusion_cfg = tiny_model(**(model or {})), tiny_diffusion(**(diffusion or {}))
    torch.manual_seed(seed)
    net = UNet(model_cfg)
    checkpoint.save(path, {**checkpoint.model_payload(model_cfg, diffusion_cfg), "step": step,
                           "ema": net.state_dict()})
    return path
