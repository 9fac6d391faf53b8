"""The original DDPM CIFAR-10 network (Ho et al. 2020), loadable from the published weights.

Google released the paper's CIFAR-10 model converted to Hugging Face diffusers' ``UNet2DModel`` layout
(https://huggingface.co/google/ddpm-cifar10-32: ``config.json`` plus
``diffusion_pytorch_model.safetensors`` or ``.bin``). ``DdpmUNet`` reimplements the part of
``UNet2DModel`` that such a config uses, so those weights can drive this project's samplers without
diffusers at run time: 128 channels, multipliers (1, 2, 2, 2), two residual blocks per level,
single-head self-attention at 16x16 and in the middle, 35.7M parameters. Its submodules carry
diffusers' names, so the published state dict loads with ``strict=True``.

``DdpmUNet(x, t)`` takes x of shape (B, C, H, W) in [-1, 1] and t of shape (B,) integer timesteps in
[0, 1000) and returns the predicted noise, shaped like x: ``diffusion_config()`` gives the matching
diffusion (linear betas 1e-4..0.02, T = 1000, epsilon objective).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.config import DiffusionConfig
from ..runtime.errors import UserError

HUB_URL = "https://huggingface.co/google/ddpm-cifar10-32"
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")

# The training setup of the published model (Ho et al. 2020, section 4 and appendix B). Images are
# scaled to [-1, 1].
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction": "epsilon",
    # How Ho et al. sampled CIFAR-10 (their run_cifar.py: model_var_type fixedlarge, sigma_t^2 = beta_t).
    # This project's ddpm sampler uses the posterior variance (beta tilde, "fixed_small") for every
    # model; the paper reports the two alike at 1000 steps.
    "variance_type": "fixed_large",
    "clip_sample": True,  # the predicted x0 is clipped to [-1, 1] when sampling
}

# Ho et al. trained the CIFAR-10 model with dropout 0.1; the published config.json predates diffusers'
# ``dropout`` key, so diffusers itself would build it with 0.0. Dropout is inactive in eval mode, so
# this only matters when fine-tuning.
PAPER_DROPOUT = 0.1


def diffusion_config() -> DiffusionConfig:
    """The diffusion the published weights were trained with, as this project's config.

    ``diffusion.linear_betas(1000)`` is exactly linspace(1e-4, 0.02, 1000), the model's schedule.
    """
    return DiffusionConfig(timesteps=SCHEDULE["num_train_timesteps"], beta_schedule="linear",
                           objective="pred_noise", min_snr_gamma=None)


@dataclass(frozen=True)
class DdpmUNetConfig:
    """The ``UNet2DModel`` settings ``DdpmUNet`` implements. The defaults are google/ddpm-cifar10-32's."""

    in_channels: int = 3
    out_channels: int = 3
    sample_size: int | tuple[int, int] | None = 32  # informational: any size divisible by 2^(levels-1) runs
    center_input_sample: bool = False  # True: the network maps x to 2x - 1 first (inputs in [0, 1])
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    # Deepest level first: index 2 is the 16x16 level, mirroring down_block_types' index 1.
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2  # residual blocks per down level; the up levels have one more
    mid_block_scale_factor: float = 1.0  # the middle block's residual sums are divided by this
    attention_head_dim: int | None = None  # None: one head spanning all channels
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None  # the middle attention's GroupNorm; None: norm_num_groups
    norm_eps: float = 1e-6
    flip_sin_to_cos: bool = False  # timestep embedding order: False [sin, cos], True [cos, sin]
    freq_shift: float = 1.0  # frequencies are exp(-ln(10000) * i / (half - freq_shift))
    downsample_padding: int = 0  # 0: pad right and bottom by one (TF's "SAME" for stride 2)
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    dropout: float = PAPER_DROPOUT

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise lists (from JSON) to tuples through object.__setattr__.
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self._validate()

    def _validate(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"DdpmUNetConfig {key}={getattr(self, key)!r}: {why}")

        for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")
        levels = len(self.block_out_channels)
        if levels < 1 or not all(_is_int(c) and c > 0 for c in self.block_out_channels):
            raise bad("block_out_channels", "must be a non-empty list of positive integers")
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            types = getattr(self, key)
            if len(types) != levels:
                raise bad(key, f"needs one entry per block_out_channels entry ({levels})")
            for kind in types:
                if kind not in allowed:
                    raise UserError(f"DdpmUNetConfig {key} has {kind!r}, which DdpmUNet does not implement "
                                    f"(supported: {', '.join(allowed)})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise bad("norm_num_groups", f"must divide every block_out_channels entry ({c})")
        mid_groups = self.attn_norm_num_groups
        if mid_groups is not None and (not _is_int(mid_groups) or mid_groups < 1
                                       or self.block_out_channels[-1] % mid_groups):
            raise bad("attn_norm_num_groups", "must be null or a positive divisor of the last channels")
        if self.attention_head_dim is not None:
            if not _is_int(self.attention_head_dim) or self.attention_head_dim < 1:
                raise bad("attention_head_dim", "must be null or a positive integer")
            with_attention = {self.block_out_channels[-1]}  # the middle block always attends
            with_attention |= {c for c, kind in zip(self.block_out_channels, self.down_block_types)
                               if kind.startswith("Attn")}
            with_attention |= {c for c, kind in zip(reversed(self.block_out_channels), self.up_block_types)
                               if kind.startswith("Attn")}
            if any(c % self.attention_head_dim for c in with_attention):
                raise bad("attention_head_dim", f"must divide the channels of every attention layer "
                                                f"({sorted(with_attention)})")
        if self.time_embedding_dim is not None and (not _is_int(self.time_embedding_dim)
                                                    or self.time_embedding_dim < 1):
            raise bad("time_embedding_dim", "must be null or a positive integer")
        if not _is_int(self.downsample_padding) or self.downsample_padding < 0:
            raise bad("downsample_padding", "must be a non-negative integer")
        for key in ("center_input_sample", "flip_sin_to_cos"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")
        for key in ("mid_block_scale_factor", "norm_eps", "freq_shift", "dropout"):
            if not _is_number(getattr(self, key)):
                raise bad(key, "must be a number")
        if self.mid_block_scale_factor == 0:
            raise bad("mid_block_scale_factor", "must not be zero (sums are divided by it)")
        if self.norm_eps <= 0:
            raise bad("norm_eps", "must be positive")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config.json") -> DdpmUNetConfig:
        """Read a diffusers ``UNet2DModel`` config.json dict.

        Absent keys take diffusers' ``UNet2DModel`` defaults (so the config means what diffusers makes
        of it), except ``dropout`` (``PAPER_DROPOUT``). Keys starting with ``_`` (class name aside)
        are bookkeeping and ignored. Settings this module does not implement, and keys it does not
        know, are rejected: either could change the computation.
        """
        if not isinstance(config, Mapping):
            raise UserError(f"{source}: expected a JSON object, got {type(config).__name__}")
        class_name = config.get("_class_name", "UNet2DModel")
        if class_name != "UNet2DModel":
            raise UserError(f"{source}: _class_name={class_name!r}; only UNet2DModel is supported")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; DdpmUNet cannot "
                            "tell whether they change the computation")
        for key, allowed in FIXED_KEYS.items():
            value = config.get(key, allowed[0])
            if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
                raise UserError(f"{source}: {key}={value!r} is not implemented by DdpmUNet "
                                f"(supported: {' or '.join(map(repr, allowed))})")
        values = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
        try:
            return cls(**values)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from exc
        except TypeError as exc:  # e.g. a number where a list belongs: tuple(3)
            raise UserError(f"{source}: malformed value ({exc})") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# UNet2DModel's defaults (diffusers 0.42) for the keys DdpmUNetConfig has, used when config.json lacks one.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "sample_size": None, "center_input_sample": False,
    "block_out_channels": (224, 448, 672, 896),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2, "mid_block_scale_factor": 1, "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "time_embedding_dim": None, "dropout": PAPER_DROPOUT,
}
# Keys whose alternatives are not implemented: the accepted values, the first being diffusers' default.
FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),  # diffusers maps both names to SiLU
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
# Read by UNet2DModel only for time_embedding_type "learned", which FIXED_KEYS rules out.
_IGNORED_KEYS = frozenset({"num_train_timesteps"})
_DIFFUSERS_KEYS = frozenset(_DIFFUSERS_DEFAULTS) | frozenset(FIXED_KEYS) | _IGNORED_KEYS


class TimestepEmbedding(nn.Module):
    """Two linear layers with SiLU between, applied to the sinusoidal embedding."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added between, and a residual sum."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, groups: int, eps: float, dropout: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, dim_in, eps=eps)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, dim_out)
        self.norm2 = nn.GroupNorm(groups, dim_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        # A 1x1 projection only where the channel count changes, as diffusers (no weights otherwise).
        self.conv_shortcut = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # temb arrives SiLU-activated (once, by DdpmUNet.forward, rather than in every block).
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb)[:, :, None, None]  # (B, C_out, 1, 1) broadcast over pixels
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale_factor


class SelfAttention(nn.Module):
    """Softmax self-attention over all pixels with a residual sum (diffusers' converted DDPM AttnBlock)."""

    def __init__(self, dim: int, head_dim: int | None, groups: int, eps: float, rescale_output_factor: float):
        super().__init__()
        # attention_head_dim null means one head of all channels, as in the paper.
        self.heads = 1 if head_dim is None else dim // head_dim
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(groups, dim, eps=eps)
        # Linear (not 1x1 conv) layers: the published weights are (C, C) matrices.
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        # A list, so that the output layer's weights are named to_out.0.* as in diffusers (whose
        # to_out.1 is a dropout with p = 0, left out here).
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # reshape, not view: works for channels_last inputs too (where it is a view anyway).
        h = self.group_norm(x).reshape(b, c, height * width).transpose(1, 2)  # (B, N, C), N = H*W

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, N, C) -> (B, heads, N, C/heads)

        q, k, v = split_heads(self.to_q(h)), split_heads(self.to_k(h)), split_heads(self.to_v(h))
        # Default scale 1/sqrt(C/heads), the DDPM scaling; the fused kernel keeps this fast.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        out = self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, C)
        out = out.transpose(1, 2).reshape(b, c, height, width)  # (B, C, H, W)
        return (out + x) / self.rescale_output_factor


class Downsample(nn.Module):
    """A stride-2 3x3 conv. With padding 0 the input is first padded by one pixel on the right and
    bottom only, reproducing TensorFlow's "SAME" padding of the original stride-2 conv."""

    def __init__(self, dim: int, padding: int):
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom): (B, C, H+1, W+1)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level (DownBlock2D, or AttnDownBlock2D with attention after each resnet)."""

    def __init__(self, cfg: DdpmUNetConfig, dim_in: int, dim_out: int, time_dim: int, attention: bool,
                 downsample: bool):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock(dim_in if i == 0 else dim_out, dim_out, time_dim, groups, eps, cfg.dropout)
            for i in range(cfg.layers_per_block)
        )
        # Empty lists hold no weights, so the state dict matches diffusers' block of either type.
        self.attentions = nn.ModuleList(
            SelfAttention(dim_out, cfg.attention_head_dim, groups, eps, 1.0)
            for _ in range(cfg.layers_per_block if attention else 0)
        )
        self.downsamplers = nn.ModuleList([Downsample(dim_out, cfg.downsample_padding)] if downsample else [])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Appends every resnet(+attention) output and the downsampled output to ``skips``."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x


class UpBlock(nn.Module):
    """One decoder level (UpBlock2D or AttnUpBlock2D): layers_per_block + 1 resnets, each taking a skip."""

    def __init__(self, cfg: DdpmUNetConfig, dim_prev: int, dim_out: int, dim_skip_last: int, time_dim: int,
                 attention: bool, upsample: bool):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        n = cfg.layers_per_block + 1
        # The input channels: the previous block's output (first resnet) or this block's, plus the
        # skip's. The last skip comes from one level up (the encoder's previous downsample, or conv_in).
        self.resnets = nn.ModuleList(
            ResnetBlock((dim_prev if i == 0 else dim_out) + (dim_skip_last if i == n - 1 else dim_out),
                        dim_out, time_dim, groups, eps, cfg.dropout)
            for i in range(n)
        )
        self.attentions = nn.ModuleList(
            SelfAttention(dim_out, cfg.attention_head_dim, groups, eps, 1.0)
            for _ in range(n if attention else 0)
        )
        self.upsamplers = nn.ModuleList([Upsample(dim_out)] if upsample else [])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Consumes skips from the end of ``skips``, last in first out."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat((x, skips.pop()), dim=1), temb)  # (B, C + C_skip, H, W)
            if self.attentions:
                x = self.attentions[i](x)
        for up in self.upsamplers:
            x = up(x)
        return x


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution, each sum divided by mid_block_scale_factor."""

    def __init__(self, cfg: DdpmUNetConfig, dim: int, time_dim: int):
        super().__init__()
        groups, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            ResnetBlock(dim, dim, time_dim, groups, eps, cfg.dropout, scale) for _ in range(2)
        )
        attn_groups = cfg.attn_norm_num_groups or groups
        self.attentions = nn.ModuleList([SelfAttention(dim, cfg.attention_head_dim, attn_groups, eps, scale)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x), temb)


class DdpmUNet(nn.Module):
    """diffusers' ``UNet2DModel`` restricted to DDPM's configuration, computing the same function."""

    def __init__(self, cfg: DdpmUNetConfig | None = None):
        super().__init__()
        cfg = DdpmUNetConfig() if cfg is None else cfg
        self.settings = cfg  # not .config: checkpoint.load_model puts the ModelConfig there
        chans = cfg.block_out_channels
        levels = len(chans)
        self.emb_dim = chans[0]
        time_dim = cfg.time_embedding_dim or 4 * chans[0]

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(self.emb_dim, time_dim)

        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, chans[max(i - 1, 0)], chans[i], time_dim, kind == "AttnDownBlock2D",
                      downsample=i < levels - 1)
            for i, kind in enumerate(cfg.down_block_types)
        )
        self.mid_block = MidBlock(cfg, chans[-1], time_dim)
        rev = chans[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, rev[max(i - 1, 0)], rev[i], rev[min(i + 1, levels - 1)], time_dim,
                    kind == "AttnUpBlock2D", upsample=i < levels - 1)
            for i, kind in enumerate(cfg.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, block_out_channels[0]) sinusoidal features, in float32.

        Same operation order as diffusers' ``get_timestep_embedding``, so the float32 rounding (which
        matters at t ~ 1000, where the arguments are large) is the same.
        """
        half = self.emb_dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - self.settings.freq_shift))  # (half,)
        args = t[:, None].float() * freqs[None, :]  # (B, half)
        sin, cos = torch.sin(args), torch.cos(args)
        emb = torch.cat((cos, sin) if self.settings.flip_sin_to_cos else (sin, cos), dim=-1)  # (B, 2*half)
        return F.pad(emb, (0, self.emb_dim % 2))  # an odd width gets one zero column at the end

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), H and W divisible by 2^(levels-1); t: (B,) or scalar timesteps.

        Returns the network output (the predicted noise for the published weights), (B, C_out, H, W).
        """
        factor = 2 ** (len(self.settings.block_out_channels) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            # Otherwise the skip concatenation fails deep inside with an opaque size mismatch.
            raise ValueError(f"DdpmUNet needs H and W divisible by {factor}, got {tuple(x.shape[-2:])}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.settings.center_input_sample:
            x = 2 * x - 1.0

        # The sinusoid is computed in float32; cast it to the weights' dtype as diffusers does for
        # half-precision models (autocast handles the mixed case).
        feats = self.timestep_features(t).to(self.time_embedding.linear_1.weight.dtype)
        # Every resnet applies SiLU before its projection: doing it once here is the same function.
        temb = F.silu(self.time_embedding(feats))  # (B, time_dim)

        h = self.conv_in(x)
        skips = [h]
        for down in self.down_blocks:
            h = down(h, temb, skips)
        h = self.mid_block(h, temb)
        for up in self.up_blocks:
            h = up(h, temb, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


_OLD_ATTENTION_KEY = re.compile(r"^(?P<path>.*attentions\.\d+)\.(?P<old>query|key|value|proj_attn)\."
                                r"(?P<param>weight|bias)$")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_old_attention_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pre-0.14 diffusers attention weights (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0.

    A key whose new name is also present is left alone, so that the clash shows up as unexpected.
    """
    out = dict(state_dict)
    for key in list(out):
        m = _OLD_ATTENTION_KEY.match(key)
        if m is None:
            continue
        new = f"{m['path']}.{_NEW_ATTENTION_NAME[m['old']]}.{m['param']}"
        if new not in out:
            out[new] = out.pop(key)
    return out


def _missing_files_error(folder: Path, what: str) -> UserError:
    return UserError(
        f"{folder}: {what}; expected a diffusers UNet2DModel folder with {CONFIG_NAME} and "
        f"{SAFETENSORS_NAME} (or {BIN_NAME}), e.g. from {HUB_URL}: "
        f"hf download google/ddpm-cifar10-32 {CONFIG_NAME} {SAFETENSORS_NAME} --local-dir {folder}"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise UserError(f"reading {path} needs the safetensors package: pip install safetensors") from exc

        def read() -> Any:
            return load_file(str(path), device="cpu")
    else:
        def read() -> Any:
            return torch.load(path, map_location="cpu", weights_only=True)
    try:
        state = read()
    except Exception as exc:  # noqa: BLE001 - both readers raise many types on damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable weights file: {first}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def _check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """One readable error for every way the weights can fail to fit (load_state_dict's is a wall)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} (needs {tuple(v.shape)})"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise UserError(f"{path}: weights do not fit the model its config.json describes "
                        f"({'; '.join(problems)})")


def weights_file(folder: Path) -> Path | None:
    """The weights file a diffusers folder holds: the .safetensors file if present, else the .bin."""
    return next((p for p in (folder / SAFETENSORS_NAME, folder / BIN_NAME) if p.is_file()), None)


def load_diffusers_folder(folder: str | Path, device: str | torch.device = "cpu") -> DdpmUNet:
    """Build ``DdpmUNet`` from a diffusers ``UNet2DModel`` folder (config.json plus weights), in eval mode.

    Prefers ``diffusion_pytorch_model.safetensors`` over ``.bin``; the .bin is read with
    ``weights_only=True`` so that it cannot run code. Old attention key names are converted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise _missing_files_error(folder, "no such folder")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise _missing_files_error(folder, f"no {CONFIG_NAME}")
    weights = weights_file(folder)
    if weights is None:
        raise _missing_files_error(folder, "no weights file")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path} is not readable JSON: {exc}") from exc
    model = DdpmUNet(DdpmUNetConfig.from_diffusers(raw, source=str(config_path)))
    state = convert_old_attention_keys(_read_state_dict(weights))
    _check_state_dict(model, state, weights)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
