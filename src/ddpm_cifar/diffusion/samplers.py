"""Samplers: they take the model as a callable and yield every intermediate step. How many images
in what batches, cached and sharded, is :mod:`ddpm_cifar.diffusion.generate`'s job.

Randomness is per image: every noise value is a pure function of the image's seed, the draw's
index in the chain and the element's position (a counter-based generator), so image i gets the same
noise whatever batch it is sampled in (the same integers on any device; the float transform may
differ in the last bit between CPU and CUDA). The network's float arithmetic rounds
differently at different batch shapes (BLAS and oneDNN pick kernels by shape), which can move a
pixel by one uint8 level; :class:`FixedBatch` removes that by always calling the network on the
same batch shape.

Three samplers share one signature, ``sampler(model, diffusion, noise, timesteps, *, clip_x0,
eta, variance)``, where ``timesteps`` are the visited steps in ascending order (:func:`spaced_timesteps`):

- ``ddpm``: ancestral sampling (Ho et al. 2020), respaced when fewer steps than T are visited, with
  the posterior's variance (beta tilde) or the forward step's (beta), ``variance``;
- ``ddim``: Song et al. 2021, with ``eta`` from 0 (deterministic) to 1 (DDPM-like noise);
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver of the
  probability-flow ODE in data-prediction form.

Each evaluates the network once per visited timestep and works with every objective, through
:meth:`GaussianDiffusion.predict_x0_eps`. Which one runs, and how, is a
:class:`~ddpm_cifar.runtime.config.SamplerConfig`, checked once when the params are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.config import SamplerConfig
from .process import GaussianDiffusion, Model, posterior_coefficients

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


@dataclass(frozen=True)
class SampleStep:
    index: int  # 0 for x_T, then 1..steps
    t: int  # the timestep x is at; -1 once fully denoised
    x: torch.Tensor  # (B, C, H, W), the current state
    x0: torch.Tensor | None  # (B, C, H, W), the model's estimate of the clean image; None at x_T


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
    if not 1 <= steps <= num_timesteps:  # SamplerConfig.check_steps tells the user
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    last = num_timesteps - 1
    if steps == 1:
        return [last]
    if spacing == "trailing":
        return sorted({round(last - k * num_timesteps / steps) for k in range(steps)})
    if spacing == "uniform":
        return sorted({round(x) for x in np.linspace(0, last, steps)})
    if spacing != "quadratic":
        raise ValueError(f"unknown spacing {spacing!r}")
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
         clip_x0: bool = True, eta: float = 0.0, variance: str = "posterior") -> Iterator[SampleStep]:
    """DDPM ancestral sampling over the visited ``timesteps``; ``eta`` is unused (it is DDIM's).

    Respacing follows Nichol & Dhariwal (2021): the chain visits a subset of timesteps, with betas
    recomputed from alpha_bar so the marginals of the visited timesteps are unchanged. Each step
    draws around the mean of the posterior q(x_prev | x_t, x0) (:func:`posterior_coefficients`) with
    the network's x0, with variance sigma^2:

    - ``posterior``: beta tilde = beta (1 - abar_prev) / (1 - abar_t), the posterior's own variance
      (Ho et al.'s "fixedsmall");
    - ``beta``: beta, the forward step's (their "fixedlarge", the choice behind the paper's CIFAR-10
      FID). Ho et al. section 3.2: beta is optimal for N(0, I) data, beta tilde for a single point;
      on data of smaller variance beta over-disperses (tests/test_samplers_oracle.py measures by how
      much).

    The last step adds no noise either way and lands on the mean (the released code does the same).
    """
    chain = _Chain(model, diffusion, timesteps, clip_x0)
    x = noise.draw(0)
    yield SampleStep(0, diffusion.num_timesteps, x, None)
    for k, i in chain.steps_down():
        a_t, a_prev = chain.abar_at(i), chain.abar_at(i - 1)
        coef_x0, coef_xt, var = posterior_coefficients(a_t, a_prev)
        x0, _ = chain.estimate(x, i)
        mean = coef_x0 * x0 + coef_xt * x
        if i > 0:
            sigma2 = var if variance == "posterior" else 1 - a_t / a_prev  # the (respaced) beta
            x = mean + math.sqrt(sigma2) * noise.draw(k)
        else:
            x = mean  # the last step lands on the mean: no noise below t = 0
        yield SampleStep(k, chain.t_after(i), x, x0)


def ddim(model: Model, diffusion: GaussianDiffusion, noise: ImageNoise, timesteps: Sequence[int], *,
         clip_x0: bool = True, eta: float = 0.0, variance: str = "posterior") -> Iterator[SampleStep]:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps
    + sigma z, with sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev); eta in [0, 1]
    (:class:`SamplerConfig` checks it). ``variance`` is DDPM's and unused."""
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
             clip_x0: bool = True, eta: float = 0.0, variance: str = "posterior") -> Iterator[SampleStep]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2); deterministic, ``eta`` and ``variance`` are
    unused.

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


def run_sampler(model: Model, diffusion: GaussianDiffusion, seeds: Sequence[int], cfg: SamplerConfig, *,
                shape: tuple[int, int, int], device: torch.device | str) -> Iterator[SampleStep]:
    """Start ``cfg``'s sampler for the given per-image seeds; images are (C, H, W) = ``shape``.

    Autocast is the caller's (``generate`` around the whole chain, the app's engine per network
    call); the samplers' own arithmetic is float32."""
    ts = spaced_timesteps(diffusion.num_timesteps, cfg.steps, cfg.spacing)
    noise = ImageNoise(seeds, shape, device)
    return SAMPLERS[cfg.name](model, diffusion, noise, ts, clip_x0=cfg.clip_x0, eta=cfg.eta,
                              variance=cfg.variance)


def final(steps: Iterator[SampleStep]) -> torch.Tensor:
    """Run a sampler to the end and return x_0, (B, C, H, W) in [-1, 1]."""
    last = None
    for step in steps:
        last = step
    assert last is not None, "a sampler yields at least x_T"
    return last.x
