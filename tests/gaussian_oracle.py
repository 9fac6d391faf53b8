"""The exact denoiser for Gaussian data, as a model callable: a sampler test that needs no training.

If x0 ~ N(mu, Sigma), then x_t = sqrt(a) x0 + sqrt(1 - a) eps is Gaussian too, with covariance
C_t = a Sigma + (1 - a) I, and the posterior mean of the noise is
E[eps | x_t] = sqrt(1 - a) C_t^-1 (x_t - sqrt(a) mu). That is the network a perfect training run
would converge to, so a correct sampler driven by it must reproduce N(mu, Sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_cifar.diffusion import GaussianDiffusion


@dataclass(frozen=True)
class Gaussian:
    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64

    @staticmethod
    def random(dim: int, seed: int = 0) -> Gaussian:
        """Means within +-0.3 and standard deviations 0.1 to 0.55 along random axes: images that
        mostly stay inside [-1, 1], with correlated pixels."""
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        variances = np.linspace(0.01, 0.3, dim)
        return Gaussian(rng.uniform(-0.3, 0.3, dim), (q * variances) @ q.T)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).multivariate_normal(self.mean, self.cov, size=n)


class GaussianOracle:
    """Model callable (x_t (B, C, H, W), t (B,)) -> the exact output for ``diffusion.objective``."""

    def __init__(self, data: Gaussian, diffusion: GaussianDiffusion, shape: tuple[int, int, int],
                 t_shift: int = 0):
        self.shape = shape
        self.objective = diffusion.objective
        self.abar = diffusion.alphas_cumprod.detach().cpu().double()
        lam, self.axes = np.linalg.eigh(data.cov)
        self.lam = torch.from_numpy(lam)  # (D,)
        self.axes_t = torch.from_numpy(self.axes)  # (D, D), columns are Sigma's eigenvectors
        self.mu = torch.from_numpy(data.mean)  # (D,)
        # For the tests' negative controls: answer as if asked about timestep t + t_shift.
        self.t_shift = t_shift
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        ts = (t.cpu().long() + self.t_shift).clamp(0, len(self.abar) - 1)
        self.calls.append(int(t[0]))
        a = self.abar[ts][:, None]  # (B, 1)
        xt = x.detach().cpu().double().reshape(b, -1)  # (B, D)
        # C_t^-1 in Sigma's eigenbasis: 1 / (a lam + 1 - a) along each axis.
        centred = (xt - a.sqrt() * self.mu) @ self.axes_t  # (B, D) in the eigenbasis
        eps = ((centred / (a * self.lam + 1 - a)) @ self.axes_t.T) * (1 - a).sqrt()
        if self.objective == "pred_noise":
            out = eps
        else:
            x0 = (xt - (1 - a).sqrt() * eps) / a.sqrt()
            out = x0 if self.objective == "pred_x0" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x.dtype).reshape(b, *self.shape).to(x.device)


def whitened_errors(samples: np.ndarray, data: Gaussian) -> tuple[float, float]:
    """(Mahalanobis chi^2 of the sample mean, largest |eigenvalue - 1| of W) where W is the sample
    covariance whitened by the true one: W = Sigma^-1/2 S Sigma^-1/2.

    For n exact samples in D dimensions the first is chi^2(D) distributed, and W's eigenvalues
    spread over about 1 +- (2 sqrt(D/n) + D/n) (the Marchenko-Pastur edge). Eigenvalues, not W's
    entries: a variance error along one direction of Sigma must not be diluted over the pixels."""
    n = len(samples)
    lam, axes = np.linalg.eigh(data.cov)
    inv_sqrt = (axes / np.sqrt(lam)) @ axes.T
    mean_err = samples.mean(axis=0) - data.mean
    chi2 = float(n * mean_err @ np.linalg.solve(data.cov, mean_err))
    w = inv_sqrt @ np.cov(samples, rowvar=False) @ inv_sqrt
    return chi2, float(np.abs(np.linalg.eigvalsh(w) - 1).max())


def frechet_to_truth(samples: np.ndarray, data: Gaussian) -> float:
    """Fréchet distance between the samples' fitted Gaussian and the true one."""
    from ddpm_cifar.fid import FidStats, frechet_distance, statistics

    return frechet_distance(statistics(samples), FidStats(data.mean, data.cov, -1))


def covariance_tolerance(n: int, dim: int, margin: float = 1.5) -> float:
    """Bound on max |eigenvalue(W) - 1| for n samples in ``dim`` dimensions: ``margin`` times the
    Marchenko-Pastur edge 2 sqrt(dim/n) + dim/n."""
    return margin * (2 * math.sqrt(dim / n) + dim / n)
