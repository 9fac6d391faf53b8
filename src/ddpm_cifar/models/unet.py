"""The U-Net: a denoiser network that maps (image, timestep) to an image-shaped output.

It knows nothing about noise schedules or objectives; ``diffusion.py`` decides what the output
means. The layout follows the study's reference U-Net (lucidrains' ``Unet``): per level
``num_res_blocks`` residual blocks with FiLM time conditioning, then attention (linear attention at
high resolution, softmax attention where ``full_attn`` says), a pixel-unshuffle downsample, and a
mirrored decoder with skip connections. GroupNorm and PyTorch's fused scaled-dot-product attention
keep the op count low, which is where its speed comes from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.config import ModelConfig


def _groups(channels: int) -> int:
    # GroupNorm needs groups | channels; 32 as in DDPM, fewer for the tiny test models.
    return math.gcd(32, channels)


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(theta) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None, :]  # (B, half)
        return torch.cat((args.sin(), args.cos()), dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, time_dim: int, dropout: float):
        super().__init__()
        self.time = nn.Linear(time_dim, dim_out * 2)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(dim_out), dim_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(dim_out), dim_out)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # temb is already SiLU-activated by the caller, once for all blocks.
        scale, shift = self.time(temb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C, 1, 1)
        h = self.norm1(self.conv1(x))
        h = F.silu(torch.addcmul(shift, h, scale + 1))
        h = self.dropout(h)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class LinearAttention(nn.Module):
    """Attention linear in the number of pixels (softmax over features, Shen et al.)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.norm = nn.GroupNorm(_groups(dim), dim)
        self.qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.out = nn.Conv2d(hidden, dim, 1)
        self.out_norm = nn.GroupNorm(_groups(dim), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w)  # (B, 3, heads, d, N)
        q, k, v = qkv.unbind(1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = k @ v.transpose(-1, -2)  # (B, heads, d, d)
        out = context.transpose(-1, -2) @ q  # (B, heads, d, N)
        return x + self.out_norm(self.out(out.reshape(b, -1, h, w)))


class Attention(nn.Module):
    """Softmax self-attention over all pixels, through PyTorch's fused kernel."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.norm = nn.GroupNorm(_groups(dim), dim)
        self.qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w)  # (B, 3, heads, d, N)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return x + self.out(out.transpose(-1, -2).reshape(b, -1, h, w))


class Downsample(nn.Module):
    """Space-to-depth then a 1x1 conv: halves resolution without discarding pixels."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in * 4, dim_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pixel_unshuffle(x, 2))  # (B, 4C, H/2, W/2) -> (B, C_out, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], attn: nn.Module, resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        dim, time_dim = cfg.dim, cfg.dim * 4
        dims = [dim, *(dim * m for m in cfg.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        n_levels = len(in_out)

        def attention(channels: int, full: bool) -> nn.Module:
            kind = Attention if full else LinearAttention
            return kind(channels, cfg.attn_heads, cfg.attn_dim_head)

        self.init_conv = nn.Conv2d(cfg.channels, dim, 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )

        self.downs = nn.ModuleList()
        for i, ((d_in, d_out), full) in enumerate(zip(in_out, cfg.full_attn)):
            last = i == n_levels - 1
            self.downs.append(_Level(
                [ResBlock(d_in, d_in, time_dim, cfg.dropout) for _ in range(cfg.num_res_blocks)],
                attention(d_in, full),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else Downsample(d_in, d_out),
            ))

        mid = dims[-1]
        self.mid1 = ResBlock(mid, mid, time_dim, cfg.dropout)
        self.mid_attn = Attention(mid, cfg.attn_heads, cfg.attn_dim_head)
        self.mid2 = ResBlock(mid, mid, time_dim, cfg.dropout)

        self.ups = nn.ModuleList()
        for i, ((d_in, d_out), full) in enumerate(zip(reversed(in_out), reversed(cfg.full_attn))):
            last = i == n_levels - 1
            self.ups.append(_Level(
                [ResBlock(d_out + d_in, d_out, time_dim, cfg.dropout) for _ in range(cfg.num_res_blocks)],
                attention(d_out, full),
                nn.Conv2d(d_out, d_in, 3, padding=1) if last else Upsample(d_out, d_in),
            ))

        self.final_block = ResBlock(dim * 2, dim, time_dim, cfg.dropout)
        self.final_conv = nn.Conv2d(dim, cfg.channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) timesteps (any real values). Returns (B, C, H, W)."""
        x = self.init_conv(x)
        r = x
        temb = F.silu(self.time_mlp(t))
        skips: list[torch.Tensor] = []
        for level in self.downs:
            for block in level.blocks:
                x = block(x, temb)
                skips.append(x)
            # Attention acts on the last block's output, which is also the last skip (as in
            # the reference, where the skip is taken after attention).
            x = level.attn(x)
            skips[-1] = x
            x = level.resample(x)
        x = self.mid2(self.mid_attn(self.mid1(x, temb)), temb)
        for level in self.ups:
            for block in level.blocks:
                x = block(torch.cat((x, skips.pop()), dim=1), temb)
            x = level.attn(x)
            x = level.resample(x)
        x = self.final_block(torch.cat((x, r), dim=1), temb)
        return self.final_conv(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
