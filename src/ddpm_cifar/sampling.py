"""Samplers: they take the model as a callable and yield every intermediate step.

Randomness is per image: image i owns a generator seeded with its own seed, which draws its x_T
and then its noise at every step, so image i gets the same noise whatever batch it is sampled in.
The network's float arithmetic rounds differently at different batch shapes (BLAS and oneDNN
pick kernels by shape), which can move a pixel by one uint8 level; :class:`FixedBatch` removes that
by always calling the network on the same batch shape.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .diffusion import GaussianDiffusion, Model
from .errors import UserError
from .fileio import atomic_path


class ImageNoise:
    """Standard normal draws of shape (B, *shape), row i from the generator seeded with seeds[i]."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str):
        self.shape = shape
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.shape, generator=g, device=self.device) for g in self.generators]
        )


class FixedBatch:
    """The network called on batches of exactly ``size`` images, the last one padded.

    Kernels are chosen by tensor shape, so a network called on 1 image and on 64 rounds
    differently. With every call the same shape, image i's arithmetic is the same whatever else is
    sampled beside it: same seed, same pixels, for any number of images (on the same device and
    thread count). The padding rows repeat the last image and are dropped from the output.
    """

    def __init__(self, model: Model, size: int):
        if size < 1:
            raise ValueError(f"batch size must be at least 1, got {size}")
        self.model = model
        self.size = size

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pad = -b % self.size
        if pad:
            x = torch.cat((x, x[-1:].expand(pad, *x.shape[1:])))  # (B + pad, C, H, W)
            t = torch.cat((t, t[-1:].expand(pad)))
        out = [self.model(xc, tc) for xc, tc in zip(x.split(self.size), t.split(self.size))]
        return torch.cat(out)[:b]


@dataclass(frozen=True)
class SampleStep:
    index: int  # 0 for x_T, then 1..steps
    t: int  # the timestep x is at; -1 once fully denoised
    x: torch.Tensor  # (B, C, H, W), the current state
    x0: torch.Tensor | None  # (B, C, H, W), the model's estimate of the clean image; None at x_T


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spread over [0, T-1], ascending, always including both ends."""
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"sampling steps must be in [1, {num_timesteps}] (the model's diffusion.timesteps), "
                        f"got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return sorted({round(x) for x in np.linspace(0, num_timesteps - 1, steps)})


def ddpm(
    model: Model,
    diffusion: GaussianDiffusion,
    noise: ImageNoise,
    *,
    steps: int,
    clip_x0: bool = True,
) -> Iterator[SampleStep]:
    """DDPM ancestral sampling (Ho et al. 2020), respaced to ``steps`` when fewer than T.

    Respacing follows Nichol & Dhariwal (2021): the chain visits a subset of timesteps, with betas
    recomputed from alpha_bar so the marginals of the visited timesteps are unchanged.
    """
    ts = spaced_timesteps(diffusion.num_timesteps, steps)
    ac = diffusion.alphas_cumprod.cpu()[ts]  # float64, (S,); on the host: read as Python floats
    ac_prev = torch.cat((torch.ones(1, dtype=ac.dtype), ac[:-1]))
    betas = 1 - ac / ac_prev
    coef1 = betas * ac_prev.sqrt() / (1 - ac)
    coef2 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
    std = (betas * (1 - ac_prev) / (1 - ac)).sqrt()

    x = noise.draw()
    yield SampleStep(0, diffusion.num_timesteps, x, None)
    b = len(noise)
    for k, i in enumerate(reversed(range(len(ts))), start=1):
        t = torch.full((b,), ts[i], device=x.device, dtype=torch.long)
        out = model(x, t).float()
        x0, _ = diffusion.predict_x0_eps(out, x, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean = float(coef1[i]) * x0 + float(coef2[i]) * x
        # Draw the noise even at the last step, where it is unused, so that every image's
        # generator advances identically however the chain is cut.
        z = noise.draw()
        x = mean + float(std[i]) * z if i > 0 else mean
        yield SampleStep(k, ts[i - 1] if i > 0 else -1, x, x0)


Sampler = Callable[..., Iterator[SampleStep]]
SAMPLERS: dict[str, Sampler] = {"ddpm": ddpm}


def run_sampler(
    name: str,
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    *,
    shape: tuple[int, int, int],
    steps: int,
    device: torch.device | str,
    clip_x0: bool = True,
) -> Iterator[SampleStep]:
    """Start sampler ``name`` for the given per-image seeds; images are (C, H, W) = ``shape``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    noise = ImageNoise(seeds, shape, device)
    return SAMPLERS[name](model, diffusion, noise, steps=steps, clip_x0=clip_x0)


def final(steps: Iterator[SampleStep]) -> torch.Tensor:
    """Run a sampler to the end and return x_0, (B, C, H, W) in [-1, 1]."""
    last = None
    for step in steps:
        last = step
    assert last is not None, "a sampler yields at least x_T"
    return last.x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, quantised as a saved PNG would be."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def generate_images(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    *,
    sampler: str,
    steps: int,
    batch_size: int,
    shape: tuple[int, int, int],
    device: torch.device | str,
    clip_x0: bool = True,
    amp: bool = False,
    progress: bool = True,
    desc: str = "sample",
    cache_dir: str | Path | None = None,
    cache_key: str = "",
) -> np.ndarray:
    """Sample one image per seed, in batches; returns uint8 (N, H, W, C).

    With ``cache_dir``, each finished batch is saved there, so an interrupted run resumes at the
    first missing batch; ``cache_key`` identifies the run (model and settings) the batches belong to.

    With ``amp`` on CUDA the network runs under bf16 autocast; the sampler's own arithmetic
    stays in float32. The network always sees ``batch_size`` images (the last batch is padded), so
    an image does not depend on how many others are sampled.
    """
    device = torch.device(device)
    use_amp = amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    net = FixedBatch(model, batch_size)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key_file = cache_dir / "key.txt"
        if not key_file.exists() or key_file.read_text() != cache_key:
            shutil.rmtree(cache_dir, ignore_errors=True)  # batches of another run: unusable
            cache_dir.mkdir(parents=True)
            key_file.write_text(cache_key)
    out: list[np.ndarray] = []
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(seeds), batch_size):
            batch = seeds[start : start + batch_size]
            shard = cache_dir / f"{start:08d}-{len(batch)}.npy" if cache_dir is not None else None
            if shard is not None and shard.exists():
                images = np.load(shard)  # finished before an interruption
            else:
                with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                    x = final(run_sampler(sampler, net, diffusion, batch, shape=shape,
                                          steps=steps, device=device, clip_x0=clip_x0))
                images = to_uint8(x)
                if shard is not None:
                    with atomic_path(shard) as tmp, open(tmp, "wb") as f:
                        np.save(f, images)
            out.append(images)
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)


def denoising_frames(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    *,
    sampler: str,
    steps: int,
    frames: int,
    shape: tuple[int, int, int],
    device: torch.device | str,
    clip_x0: bool = True,
) -> tuple[np.ndarray, list[int]]:
    """States x_T ... x_0 at ``frames`` evenly spaced points of the chain.

    Returns uint8 (len(seeds), frames, H, W, C) and the timestep of each frame (-1 = x_0).
    """
    n_states = steps + 1  # x_T plus one state per step
    wanted = {int(round(i)) for i in np.linspace(0, n_states - 1, min(frames, n_states))}
    picked: list[np.ndarray] = []
    timesteps: list[int] = []
    with torch.inference_mode():
        for s in run_sampler(sampler, model, diffusion, seeds, shape=shape, steps=steps,
                             device=device, clip_x0=clip_x0):
            if s.index in wanted:
                picked.append(to_uint8(s.x))
                timesteps.append(s.t)
    return np.stack(picked, axis=1), timesteps  # (B, F, H, W, C)
