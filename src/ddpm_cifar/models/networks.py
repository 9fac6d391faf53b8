"""The denoising network a :class:`~ddpm_cifar.runtime.config.ModelConfig` describes.

Both take ``(x, t)``, x of shape (B, C, H, W) and t of shape (B,) integer timesteps, and return a
tensor shaped like x: what the diffusion's objective asks for. Neither knows about noise schedules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..diffusion.process import GaussianDiffusion
from ..runtime.config import ModelConfig
from ..runtime.errors import ConfigError, UserError
from .ddpm_unet import (
    CONFIG_NAME,
    DdpmUNet,
    DdpmUNetConfig,
    ResnetBlock,
    SelfAttention,
    diffusion_config,
    load_diffusers_folder,
    weights_file,
)
from .unet import UNet

PUBLISHED = -1  # LoadedModel.step of published weights, which were not trained by this pipeline


@dataclass(frozen=True)
class LoadedModel:
    """A network loaded for sampling (eval mode, no gradients) with what it was built from."""

    net: nn.Module  # (B, C, H, W), (B,) -> (B, C, H, W)
    config: ModelConfig  # what builds ``net``: image size and channels for the samplers
    diffusion: GaussianDiffusion  # the process the network was trained for, on ``net``'s device
    step: int  # training steps behind the weights; PUBLISHED for the published DDPM weights

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.config.channels, self.config.image_size, self.config.image_size)


def ddpm_unet_config(cfg: ModelConfig) -> DdpmUNetConfig:
    """ModelConfig -> the DDPM network's settings: one level per ``dim_mults`` entry, attention where
    ``full_attn`` says, the rest as in Ho et al. (and google/ddpm-cifar10-32's config.json)."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.full_attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.full_attn))  # deepest first
    return DdpmUNetConfig(in_channels=cfg.channels, out_channels=cfg.channels, sample_size=cfg.image_size,
                          block_out_channels=tuple(cfg.dim * m for m in cfg.dim_mults),
                          down_block_types=down, up_block_types=up, layers_per_block=cfg.num_res_blocks,
                          dropout=cfg.dropout)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network ``cfg`` describes, freshly initialised: the study's U-Net as its reference
    implementation (PyTorch's defaults), Ho et al.'s as their released code (:func:`ho_init`)."""
    if cfg.arch == "ddpm":
        return ho_init(DdpmUNet(ddpm_unet_config(cfg)))
    return UNet(cfg)


@torch.no_grad()
def ho_init(net: DdpmUNet) -> DdpmUNet:
    """Initialise ``net`` as Ho et al.'s code does (diffusion_tf/nn.py ``default_init``): every conv
    and linear weight from TF's variance_scaling(scale, "fan_avg", "uniform"), i.e. Glorot-uniform
    with gain sqrt(scale), biases zero; scale 1, except 1e-10 (their stand-in for 0) for the last
    layer of each residual branch (a residual block's second conv, attention's output projection)
    and the output conv, so that every block starts close to the identity and the network's output
    close to 0. GroupNorm keeps weight 1 and bias 0, as theirs. diffusers, whose layout DdpmUNet
    follows, initialises with PyTorch's defaults instead; loading published weights overwrites
    either."""
    near_zero = {id(m.conv2) for m in net.modules() if isinstance(m, ResnetBlock)}
    near_zero |= {id(m.to_out[0]) for m in net.modules() if isinstance(m, SelfAttention)}
    near_zero.add(id(net.conv_out))
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            scale = 1e-10 if id(module) in near_zero else 1.0
            nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))  # limit sqrt(3 scale / fan_avg)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


def model_config_of(settings: DdpmUNetConfig, source: str) -> ModelConfig:
    """The ModelConfig (arch ddpm) that builds the network ``settings`` describe, e.g. one read from a
    diffusers config.json; a setting outside what ``model.arch: ddpm`` builds is a :class:`UserError`."""
    chans = settings.block_out_channels
    dim = chans[0]
    size = settings.sample_size if isinstance(settings.sample_size, int) else 32
    try:
        if any(c % dim for c in chans) or settings.in_channels != settings.out_channels:
            raise ConfigError("channels")
        cfg = ModelConfig(image_size=size, channels=settings.in_channels, dim=dim,
                          dim_mults=tuple(c // dim for c in chans), num_res_blocks=settings.layers_per_block,
                          full_attn=tuple(t == "AttnDownBlock2D" for t in settings.down_block_types),
                          attn_heads=1, attn_dim_head=0, dropout=settings.dropout, arch="ddpm")
    except ConfigError:
        cfg = None
    rebuilt = ddpm_unet_config(cfg) if cfg is not None else None
    if rebuilt is None or rebuilt != dataclasses.replace(settings, sample_size=size):
        theirs, ours = dataclasses.asdict(settings), dataclasses.asdict(rebuilt) if rebuilt else {}
        differ = [k for k in theirs if k != "sample_size" and theirs[k] != ours.get(k)]
        differ = differ or ["block_out_channels"]
        raise UserError(f"{source}: {differ[0]}={theirs[differ[0]]!r} is outside what model.arch ddpm builds "
                        "(Ho et al.'s CIFAR-10 network and its variations in size)")
    return cfg


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu") -> tuple[LoadedModel, Path]:
    """A diffusers UNet2DModel folder (google/ddpm-cifar10-32's layout) as a model of this project,
    with the diffusion it was trained with (:func:`ddpm_cifar.models.ddpm_unet.diffusion_config`),
    and the weights file it read."""
    net = load_diffusers_folder(folder)
    cfg = model_config_of(net.settings, str(Path(folder) / CONFIG_NAME))
    weights = weights_file(Path(folder))
    assert weights is not None  # load_diffusers_folder read it
    diffusion = GaussianDiffusion(diffusion_config()).to(device)
    return LoadedModel(net.to(device).eval().requires_grad_(False), cfg, diffusion, PUBLISHED), weights
