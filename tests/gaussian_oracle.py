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

from ddpm_cifar.diffusion.process import GaussianDiffusion


@dataclass(frozen=True)
class Gaussian:
    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64

    @staticmethod
    def random(dim: int, seed: int = 0, variances: tuple[float, float] = (0.01, 0.3)) -> Gaussian:
        """Means within +-0.3 and, by default, standard deviations 0.1 to 0.55 along random axes:
        images that mostly stay inside [-1, 1], with correlated pixels. ``variances``: the smallest
        and largest eigenvalue of the covariance, the others evenly spaced between (the axes and
        the mean do not depend on it)."""
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        eigenvalues = np.linspace(variances[0], variances[1], dim)
        return Gaussian(rng.uniform(-0.3, 0.3, dim), (q * eigenvalues) @ q.T)

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
    from ddpm_cifar.evaluation.fid import FidStats, frechet_distance, statistics

    return frechet_distance(statistics(samples), FidStats(data.mean, data.cov, -1))


def covariance_tolerance(n: int, dim: int, margin: float = 1.5) -> float:
    """Bound on max |eigenvalue(W) - 1| for n samples in ``dim`` dimensions: ``margin`` times the
    Marchenko-Pastur edge 2 sqrt(dim/n) + dim/n."""
    return margin * (2 * math.sqrt(dim / n) + dim / n)


def ddpm_output_gaussian(data: Gaussian, alphas_cumprod: np.ndarray | torch.Tensor, timesteps: list[int],
                         variance: str) -> Gaussian:
    """The exact law of DDPM ancestral sampling's output when the network is the exact oracle of
    ``data``: x_T ~ N(0, I), then one step down per visited timestep (ascending ``timesteps``),
    clipping off. float64, no sampling.

    Derived here independently of the library (neither its posterior_coefficients nor its sampler
    is used), so that the sampler test compares two computations rather than one with itself.
    With the oracle every step is affine in x_t plus independent Gaussian noise, so the output is
    Gaussian and its mean and covariance propagate exactly:

    - x0_hat = mu + sqrt(a) Sigma C^-1 (x_t - sqrt(a) mu), C = a Sigma + (1 - a) I (a = abar_t);
    - x_prev = c_x0 x0_hat + c_xt x_t + sigma z, with DDPM eq. 7's posterior coefficients between
      the visited levels a and a_prev (a_prev = 1 below the lowest visited step):
      beta = 1 - a / a_prev, c_x0 = beta sqrt(a_prev) / (1 - a), c_xt = (1 - a_prev) sqrt(1 - beta) / (1 - a);
    - sigma^2 = beta (1 - a_prev) / (1 - a) for "posterior", beta for "beta", 0 on the last step.

    So m' = A m + b and P' = A P A^T + sigma^2 I. Sigma, C and hence A are all diagonal in Sigma's
    eigenbasis, and the isotropic noise stays isotropic there, so the recursion runs per eigen-
    direction on scalars: A_j = c_x0 sqrt(a) lam_j / (a lam_j + 1 - a) + c_xt and
    b_j = c_x0 mu_j (1 - a) / (a lam_j + 1 - a) (mu_j: the mean's coordinate along axis j).
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown variance {variance!r}")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    lam, axes = np.linalg.eigh(data.cov)
    mu = axes.T @ data.mean  # the data mean in the eigenbasis
    m = np.zeros_like(lam)  # x_T ~ N(0, I): mean 0 and unit variance along every axis
    p = np.ones_like(lam)
    levels = [float(abar[t]) for t in timesteps]
    for i in reversed(range(len(levels))):
        a = levels[i]
        a_prev = levels[i - 1] if i > 0 else 1.0
        beta = 1.0 - a / a_prev
        c_x0 = beta * np.sqrt(a_prev) / (1.0 - a)
        c_xt = (1.0 - a_prev) * np.sqrt(1.0 - beta) / (1.0 - a)
        c = a * lam + 1.0 - a  # x_t's variance along each axis under the data's forward process
        gain = np.sqrt(a) * lam / c  # x0_hat = mu + gain (x_t - sqrt(a) mu)
        big_a = c_x0 * gain + c_xt
        b = c_x0 * mu * (1.0 - a) / c  # c_x0 (mu - gain sqrt(a) mu), with 1 - a lam / c = (1 - a) / c
        if i == 0:
            sigma2 = 0.0  # the last step lands on the mean
        elif variance == "posterior":
            sigma2 = beta * (1.0 - a_prev) / (1.0 - a)
        else:
            sigma2 = beta
        m = big_a * m + b
        p = big_a**2 * p + sigma2
    return Gaussian(axes @ m, (axes * p) @ axes.T)


def dispersion(predicted: Gaussian, data: Gaussian) -> np.ndarray:
    """(D,) the variance of ``predicted`` along each eigen-direction of the data's covariance,
    relative to the data's own variance there, smallest data variance first: 1 is exact, above 1
    over-dispersed. For a DDPM prediction (:func:`ddpm_output_gaussian`), whose covariance is
    diagonal in that basis, these are the eigenvalues of Sigma^-1/2 P Sigma^-1/2, kept in the
    order of the directions rather than sorted."""
    lam, axes = np.linalg.eigh(data.cov)
    return np.diag(axes.T @ predicted.cov @ axes) / lam
