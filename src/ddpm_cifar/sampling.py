"""Samplers: they take the model as a callable and yield every intermediate step.

Randomness is per image: every noise value is a pure function of the image's seed, the draw's
index in the chain and the element's position (a counter-based generator), so image i gets the same
noise whatever batch it is sampled in (the same integers on any device; the float transform may
differ in the last bit between CPU and CUDA). The network's float arithmetic rounds
differently at different batch shapes (BLAS and oneDNN pick kernels by shape), which can move a
pixel by one uint8 level; :class:`FixedBatch` removes that by always calling the network on the
same batch shape.

Three samplers share one signature, ``sampler(model, diffusion, noise, timesteps, *, clip_x0,
eta)``, where ``timesteps`` are the visited steps in ascending order (:func:`spaced_timesteps`):

- ``ddpm``: ancestral sampling (Ho et al. 2020), respaced when fewer steps than T are visited;
- ``ddim``: Song et al. 2021, with ``eta`` from 0 (deterministic) to 1 (DDPM-like noise);
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver of the
  probability-flow ODE in data-prediction form.

Each evaluates the network once per visited timestep and works with every objective, through
:meth:`GaussianDiffusion.predict_x0_eps`.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .diffusion import GaussianDiffusion, Model
from .distributed import gather_to_all, gather_to_main, rank_and_world, shard
from .errors import UserError
from .fileio import atomic_path

if TYPE_CHECKING:  # a type only: the sampling code does not depend on the config module
    from .config import SampleConfig

# Bump when the same seeds and settings would give other images (the noise generator, a sampler's
# arithmetic), so that cached sample batches and the training-time FID curve are not reused.
SAMPLING_VERSION = "2-counter-noise"

_U64 = 1 << 64
# splitmix64's constants, as the signed int64 values torch holds.
_GOLDEN = 0x9E3779B97F4A7C15 - _U64
_MIX1 = 0xBF58476D1CE4E5B9 - _U64
_MIX2 = 0x94D049BB133111EB - _U64


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic: it copies the sign bit)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors; multiplication wraps modulo 2^64."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _mix64_int(z: int) -> int:
    z &= _U64 - 1
    z = ((z ^ (z >> 30)) * (_MIX1 % _U64)) & (_U64 - 1)
    z = ((z ^ (z >> 27)) * (_MIX2 % _U64)) & (_U64 - 1)
    z ^= z >> 31
    return z - _U64 if z >= 1 << 63 else z


class ImageNoise:
    """Standard normal draws of shape (B, *shape); row i depends only on seeds[i] and the draw index.

    Counter-based: element j of draw k for seed s is Box-Muller applied to two 24-bit fields of
    mix(mix(key_s + mix(k + 1)) + j * golden), key_s = mix(s * golden + 0x5EED) and mix the
    splitmix64 finaliser, computed for the whole batch at once. Unlike
    one torch.Generator per image, this needs no Python loop over images (which cost about a third
    of DDPM's time on a GPU) and gives the same integers on every device. The 24-bit uniforms cap
    |z| at 5.77, which a standard normal exceeds with probability 8e-9.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        seeds_t = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=self.device)
        self.keys = _mix64(seeds_t * _GOLDEN + 0x5EED)  # (B,)
        self.offsets = torch.arange(math.prod(self.shape), device=self.device) * _GOLDEN  # (N,)

    def __len__(self) -> int:
        return len(self.keys)

    def draw(self, index: int) -> torch.Tensor:
        """Draw number ``index`` (0 for x_T, then one per step that needs noise), float32."""
        base = _mix64(self.keys + _mix64_int(index + 1))  # (B,)
        z = _mix64(base[:, None] + self.offsets[None, :])  # (B, N)
        scale = 2.0**-24
        u1 = (_shr(z, 40) + 1).float() * scale  # (0, 1]: log(u1) is finite
        u2 = (_shr(z, 16) & 0xFFFFFF).float() * scale  # [0, 1)
        normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return normal.reshape(len(self.keys), *self.shape)


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


SPACINGS = ("uniform", "trailing", "quadratic")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """``steps`` distinct timesteps in [0, T-1], ascending, always including T-1.

    - ``uniform``: evenly spread over [0, T-1], both ends included;
    - ``trailing``: T-1, T-1-T/steps, ...: evenly spread, ending at T/steps - 1 rather than 0, so
      no network call is spent on t = 0; the result is then the network's E[x0 | x_t] at that t,
      which is smoother than a sample (the Gaussian-oracle tests show it shrinking low-variance
      directions);
    - ``quadratic``: t proportional to k^2, dense near the data (DDIM's choice for CIFAR-10,
      here spanning the whole chain).
    """
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"sampling steps must be in [1, {num_timesteps}] (the model's diffusion.timesteps), "
                        f"got {steps}")
    if spacing not in SPACINGS:
        raise UserError(f"unknown timestep spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    last = num_timesteps - 1
    if steps == 1:
        return [last]
    if spacing == "trailing":
        return sorted({round(last - k * num_timesteps / steps) for k in range(steps)})
    if spacing == "uniform":
        return sorted({round(x) for x in np.linspace(0, last, steps)})
    # quadratic: near t = 0 the squares are closer than 1 apart; push each up to at least one
    # above the one below, which still ends at T-1 whenever steps <= T (each gap stays >= 1).
    ts = [int(round(x)) for x in np.linspace(0, math.sqrt(last), steps) ** 2]
    for k in range(1, steps):
        ts[k] = max(ts[k], ts[k - 1] + 1)
    return [min(t, last - (steps - 1 - k)) for k, t in enumerate(ts)]


class _Chain:
    """What every sampler needs at each visited timestep: the network's (x0, eps) estimate."""

    def __init__(self, model: Model, diffusion: GaussianDiffusion, timesteps: Sequence[int], clip_x0: bool):
        self.model, self.diffusion, self.clip_x0 = model, diffusion, clip_x0
        self.ts = list(timesteps)
        # float64 on the host: read as Python floats for the per-step coefficients
        self.abar = diffusion.alphas_cumprod.detach().cpu().double()

    def abar_at(self, i: int) -> float:
        """alpha_bar of visited step i; 1.0 for i = -1, the clean data below the chain."""
        return float(self.abar[self.ts[i]]) if i >= 0 else 1.0

    def estimate(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((x.shape[0],), self.ts[i], device=x.device, dtype=torch.long)
        out = self.model(x, t).float()
        x0, eps = self.diffusion.predict_x0_eps(out, x, t)
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            a = self.abar_at(i)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)  # the noise the clipped x0 implies
        return x0, eps

    def steps_down(self) -> Iterator[tuple[int, int]]:
        """(k, i): step k = 1.. goes from visited timestep i to i - 1 (-1: the clean data)."""
        return enumerate(reversed(range(len(self.ts))), start=1)

    def t_after(self, i: int) -> int:
        return self.ts[i - 1] if i > 0 else -1


def ddpm(model: Model, diffusion: GaussianDiffusion, noise: ImageNoise, timesteps: Sequence[int], *,
         clip_x0: bool = True, eta: float = 0.0) -> Iterator[SampleStep]:
    """DDPM ancestral sampling over the visited ``timesteps``; ``eta`` is unused (it is DDIM's).

    Respacing follows Nichol & Dhariwal (2021): the chain visits a subset of timesteps, with betas
    recomputed from alpha_bar so the marginals of the visited timesteps are unchanged; each step
    draws from the posterior q(x_prev | x_t, x0) with the network's x0.
    """
    chain = _Chain(model, diffusion, timesteps, clip_x0)
    x = noise.draw(0)
    yield SampleStep(0, diffusion.num_timesteps, x, None)
    for k, i in chain.steps_down():
        a_t, a_prev = chain.abar_at(i), chain.abar_at(i - 1)
        beta = 1 - a_t / a_prev
        x0, _ = chain.estimate(x, i)
        coef_x0 = beta * math.sqrt(a_prev) / (1 - a_t)
        coef_xt = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)
        mean = coef_x0 * x0 + coef_xt * x
        if i > 0:
            x = mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * noise.draw(k)
        else:
            x = mean  # the last step lands on x0: its posterior variance is 0
        yield SampleStep(k, chain.t_after(i), x, x0)


def ddim(model: Model, diffusion: GaussianDiffusion, noise: ImageNoise, timesteps: Sequence[int], *,
         clip_x0: bool = True, eta: float = 0.0) -> Iterator[SampleStep]:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps
    + sigma z, with sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"DDIM eta must be in [0, 1], got {eta}")
    chain = _Chain(model, diffusion, timesteps, clip_x0)
    x = noise.draw(0)
    yield SampleStep(0, diffusion.num_timesteps, x, None)
    for k, i in chain.steps_down():
        a_t, a_prev = chain.abar_at(i), chain.abar_at(i - 1)
        x0, eps = chain.estimate(x, i)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise.draw(k)
        yield SampleStep(k, chain.t_after(i), x, x0)


def dpmpp_2m(model: Model, diffusion: GaussianDiffusion, noise: ImageNoise, timesteps: Sequence[int], *,
             clip_x0: bool = True, eta: float = 0.0) -> Iterator[SampleStep]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2); deterministic, ``eta`` is unused.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar) and lambda = log(alpha / sigma), a step from s
    to t (h = lambda_t - lambda_s) is x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D, where
    D is the network's x0 at s, corrected to second order with the previous step's x0:
    D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h. The first step is first order, and so
    is the last, to the clean data (sigma = 0, lambda = inf), which lands on the network's x0.
    """
    chain = _Chain(model, diffusion, timesteps, clip_x0)

    def lam(a: float) -> float:
        return 0.5 * (math.log(a) - math.log(1 - a))

    x = noise.draw(0)
    yield SampleStep(0, diffusion.num_timesteps, x, None)
    prev_x0: torch.Tensor | None = None
    prev_h = 0.0
    for k, i in chain.steps_down():
        x0, _ = chain.estimate(x, i)
        if i == 0:
            x = x0
        else:
            a_s, a_t = chain.abar_at(i), chain.abar_at(i - 1)
            h = lam(a_t) - lam(a_s)
            d = x0
            if prev_x0 is not None:
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = math.sqrt((1 - a_t) / (1 - a_s)) * x - math.sqrt(a_t) * math.expm1(-h) * d
            prev_x0, prev_h = x0, h
        yield SampleStep(k, chain.t_after(i), x, x0)


Sampler = Callable[..., Iterator[SampleStep]]
SAMPLERS: dict[str, Sampler] = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


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
    eta: float = 0.0,
    spacing: str = "uniform",
) -> Iterator[SampleStep]:
    """Start sampler ``name`` for the given per-image seeds; images are (C, H, W) = ``shape``."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    ts = spaced_timesteps(diffusion.num_timesteps, steps, spacing)
    noise = ImageNoise(seeds, shape, device)
    return SAMPLERS[name](model, diffusion, noise, ts, clip_x0=clip_x0, eta=eta)


def for_sampling(model: torch.nn.Module, device: torch.device | str, compile: bool = False) -> Model:
    """The network as samplers should call it: on CUDA in channels_last memory layout (faster
    convolutions; the inputs are converted at each call) and, with ``compile``, through
    torch.compile. On CPU the model is returned as it is: neither helps there (see benchmarks/)."""
    device = torch.device(device)
    if device.type != "cuda":
        return model
    model = model.to(memory_format=torch.channels_last)
    net: Model = torch.compile(model) if compile else model

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x.contiguous(memory_format=torch.channels_last), t)

    return call


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
    eta: float = 0.0,
    spacing: str = "uniform",
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
                    x = final(run_sampler(sampler, net, diffusion, batch, shape=shape, steps=steps,
                                          device=device, clip_x0=clip_x0, eta=eta, spacing=spacing))
                images = to_uint8(x)
                if shard is not None:
                    with atomic_path(shard) as tmp, open(tmp, "wb") as f:
                        np.save(f, images)
            out.append(images)
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)


def frame_indices(steps: int, frames: int) -> set[int]:
    """SampleStep indices of ``frames`` states evenly spread from x_T (0) to x_0 (``steps``); all
    ``steps + 1`` states when fewer are available."""
    n_states = steps + 1  # x_T plus one state per step
    return {int(round(i)) for i in np.linspace(0, steps, min(frames, n_states))}


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
    eta: float = 0.0,
    spacing: str = "uniform",
) -> tuple[np.ndarray, list[int]]:
    """States x_T ... x_0 at ``frames`` evenly spaced points of the chain.

    Returns uint8 (len(seeds), frames, H, W, C) and the timestep of each frame (-1 = x_0).
    """
    wanted = frame_indices(steps, frames)
    picked: list[np.ndarray] = []
    timesteps: list[int] = []
    with torch.inference_mode():
        for s in run_sampler(sampler, model, diffusion, seeds, shape=shape, steps=steps,
                             device=device, clip_x0=clip_x0, eta=eta, spacing=spacing):
            if s.index in wanted:
                picked.append(to_uint8(s.x))
                timesteps.append(s.t)
    return np.stack(picked, axis=1), timesteps  # (B, F, H, W, C)


def generate_images_sharded(model: Model, diffusion: GaussianDiffusion, seeds: Sequence[int], *,
                            batch_size: int, everywhere: bool = False, **kwargs: Any) -> np.ndarray | None:
    """:func:`generate_images` split across the process group's ranks by batch.

    Returns uint8 (N, H, W, C) in seed order on rank 0 (on every rank with ``everywhere``) and None
    elsewhere. Keyword arguments are generate_images'; its progress bar is shown on rank 0 only.
    """
    rank, world = rank_and_world()
    kwargs = {**kwargs, "progress": kwargs.get("progress", True) and rank == 0}
    if kwargs.get("cache_dir") is not None and world > 1:
        # Each rank resumes its own shard; the batch files of different shards must not mix.
        kwargs["cache_dir"] = Path(kwargs["cache_dir"]) / f"rank{rank}-of-{world}"
    mine = shard(list(seeds), batch_size, rank, world)
    local = generate_images(model, diffusion, mine, batch_size=batch_size, **kwargs)
    if everywhere:
        return gather_to_all(local, len(seeds), batch_size)
    return gather_to_main(local, len(seeds), batch_size)


def sample_cache_key(ckpt_sha256: str, cfg: SampleConfig, device: torch.device) -> str:
    """What finished sample batches depend on; the device too, since CUDA runs under bf16."""
    # batch_size too: the network always sees full batches of it, and its rounding depends on it
    return (f"{SAMPLING_VERSION}:{ckpt_sha256}:{cfg.sampler}:{cfg.steps}:{cfg.eta}:{cfg.spacing}:"
            f"{cfg.seed}:{cfg.clip_x0}:{cfg.compile}:{cfg.batch_size}:{device.type}")
