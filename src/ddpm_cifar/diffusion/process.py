"""Gaussian diffusion math: beta schedules, the forward process, the posterior and the loss.

The network is any callable ``model(x_t, t) -> output`` with x_t of shape (B, C, H, W) and t of
shape (B,) integer timesteps in [0, T). What the output means is set by the objective:
``pred_noise`` (epsilon), ``pred_x0`` (the clean image) or ``pred_v`` (v = sqrt(abar) eps -
sqrt(1 - abar) x0, Salimans & Ho 2022). Coefficients are computed in float64 and cast to the
input's dtype on lookup.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..runtime.config import DiffusionConfig

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(timesteps: int) -> torch.Tensor:
    """DDPM's schedule (Ho et al. 2020), rescaled so other T keep the same overall noise."""
    scale = 1000 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    return betas.clamp(max=0.999)  # for T <= 20 the rescaled end reaches 1: no signal left


def _betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021."""
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    return _betas_from_alpha_bar(torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2)


def sigmoid_betas(timesteps: int, start: float = -3, end: float = 3, tau: float = 1) -> torch.Tensor:
    """Jabri et al. 2022 (Fig. 8); the default of the study's reference implementation."""
    t = torch.linspace(0, 1, timesteps + 1, dtype=torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar(alpha_bar)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}


def _extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] for a batch of timesteps, shaped (B, 1, 1, 1) to broadcast against x.

    ``a`` should already be on x's device (see :meth:`GaussianDiffusion.to`); moving it here
    would cost a host-to-device copy at every call on a GPU.
    """
    return a.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def posterior_coefficients(abar_t: float, abar_prev: float) -> tuple[float, float, float]:
    """(c_x0, c_xt, var) of the posterior q(x_prev | x_t, x0) = N(c_x0 x0 + c_xt x_t, var I) between
    two noise levels of the chain, given by their alpha_bar: consecutive timesteps, or the visited
    ones of a respaced chain (Nichol & Dhariwal 2021), whose beta is 1 - abar_t / abar_prev; below
    t = 0, abar_prev = 1 and the variance is 0. DDPM eq. 7, in float64 Python numbers."""
    beta = 1 - abar_t / abar_prev
    coef_x0 = beta * math.sqrt(abar_prev) / (1 - abar_t)
    coef_xt = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar_t)
    return coef_x0, coef_xt, beta * (1 - abar_prev) / (1 - abar_t)


class GaussianDiffusion:
    def __init__(self, cfg: DiffusionConfig):
        self.config = cfg
        self.num_timesteps = cfg.timesteps
        self.objective = cfg.objective
        betas = BETA_SCHEDULES[cfg.beta_schedule](cfg.timesteps)
        self.betas = betas
        self.alphas_cumprod = ac = torch.cumprod(1 - betas, dim=0)
        self.sqrt_ac = ac.sqrt()
        self.sqrt_one_minus_ac = (1 - ac).sqrt()
        snr = ac / (1 - ac)
        # Per-timestep weights that make each objective's MSE equal to the noise MSE, as in DDPM
        # and the study's reference (eps-MSE = snr x0-MSE = snr/(snr+1) v-MSE); with
        # min_snr_gamma, the Min-SNR-gamma weighting of Hang et al. (2023).
        w = snr.clamp(max=cfg.min_snr_gamma) if cfg.min_snr_gamma is not None else snr
        self.loss_weight = {
            "pred_noise": w / snr if cfg.min_snr_gamma is not None else torch.ones_like(snr),
            "pred_x0": w,
            "pred_v": w / (snr + 1),
        }[cfg.objective]

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Move every per-timestep table (kept in float64) to ``device``; returns self."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    # -- forward process ---------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        return _extract(self.sqrt_ac, t, x0) * x0 + _extract(self.sqrt_one_minus_ac, t, x0) * noise

    # -- conversions between parameterisations -------------------------------------------------
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.objective == "pred_noise":
            return noise
        if self.objective == "pred_x0":
            return x0
        return _extract(self.sqrt_ac, t, x0) * noise - _extract(self.sqrt_one_minus_ac, t, x0) * x0

    def predict_x0_eps(
        self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a model output at (x_t, t)."""
        a, s = _extract(self.sqrt_ac, t, xt), _extract(self.sqrt_one_minus_ac, t, xt)
        if self.objective == "pred_noise":
            eps = out
            x0 = (xt - s * eps) / a
        elif self.objective == "pred_x0":
            x0 = out
            eps = (xt - a * x0) / s
        else:  # v = a eps - s x0, with a^2 + s^2 = 1
            x0 = a * xt - s * out
            eps = s * xt + a * out
        return x0, eps

    # -- training loss ----------------------------------------------------------------------
    def loss(
        self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Weighted MSE of the model's prediction; x0 in [-1, 1], shape (B, C, H, W)."""
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t)
        mse = F.mse_loss(out.float(), self.target(x0, noise, t).float(), reduction="none")
        per_image = mse.flatten(1).mean(dim=1) * _extract(self.loss_weight, t, mse).flatten()
        return per_image.mean()
