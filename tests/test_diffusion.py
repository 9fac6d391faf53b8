"""Tests for ddpm_cifar.diffusion.process against closed forms computed independently in numpy float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import tiny_diffusion, tiny_model

from ddpm_cifar.diffusion.process import GaussianDiffusion, posterior_coefficients
from ddpm_cifar.models.unet import UNet

SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def _diffusion(schedule: str = "linear", T: int = 20, objective: str = "pred_noise",
               gamma: float | None = None) -> GaussianDiffusion:
    return GaussianDiffusion(tiny_diffusion(timesteps=T, beta_schedule=schedule, objective=objective,
                                            min_snr_gamma=gamma))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float64)


def _abar(d: GaussianDiffusion) -> np.ndarray:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), from the betas alone."""
    return np.cumprod(1.0 - _np(d.betas))


def _col(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a[t][:, None, None, None]


# -- schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1000, 20])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_is_valid(schedule: str, T: int) -> None:
    d = _diffusion(schedule, T)
    betas = _np(d.betas)
    assert d.betas.dtype == torch.float64
    assert betas.shape == (T,)
    assert np.isfinite(betas).all()
    assert (betas > 0).all() and (betas < 1).all()
    ac = _np(d.alphas_cumprod)
    assert np.isfinite(ac).all()
    assert (ac > 0).all() and (ac < 1).all()
    assert (np.diff(ac) < 0).all(), "alpha_bar must be strictly decreasing"
    np.testing.assert_allclose(ac, _abar(d), rtol=1e-12, atol=0)
    # Every schedule ends (almost) at pure noise and starts (almost) at the data.
    assert ac[-1] < 1e-3
    assert ac[0] > 0.9


def test_linear_schedule_is_ddpm_at_1000_steps() -> None:
    np.testing.assert_allclose(_np(_diffusion("linear", 1000).betas), np.linspace(1e-4, 0.02, 1000),
                               rtol=1e-12, atol=1e-15)


def test_linear_schedule_rescales_for_fewer_steps() -> None:
    # T = 20: scale 50, so beta runs from 0.005 to 1.0, the end clipped to 0.999.
    expected = np.minimum(np.linspace(50 * 1e-4, 50 * 0.02, 20), 0.999)
    np.testing.assert_allclose(_np(_diffusion("linear", 20).betas), expected, rtol=1e-12)


def _cosine_f(u: np.ndarray, s: float = 0.008) -> np.ndarray:
    return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def _sigmoid_f(u: np.ndarray, start: float = -3, end: float = 3) -> np.ndarray:
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return (sig(end) - sig(u * (end - start) + start)) / (sig(end) - sig(start))


@pytest.mark.parametrize("T", [1000, 20])
@pytest.mark.parametrize(("schedule", "f"), [("cosine", _cosine_f), ("sigmoid", _sigmoid_f)])
def test_alpha_bar_schedules_follow_their_closed_form(schedule: str, f, T: int) -> None:
    # alpha_bar at 0-based step t is f((t + 1) / T) / f(0), until the 0.999 beta clip takes over.
    d = _diffusion(schedule, T)
    u = np.arange(1, T + 1) / T
    expected = f(u) / f(np.zeros(1))
    betas = _np(d.betas)
    unclipped = np.cumsum(betas >= 0.999 - 1e-12) == 0  # steps before the first clipped beta
    assert unclipped.sum() >= T - 2
    np.testing.assert_allclose(_np(d.alphas_cumprod)[unclipped], expected[unclipped], rtol=1e-9)


# -- forward process -----------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1000, 20])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_q_sample_matches_closed_form(schedule: str, T: int) -> None:
    d = _diffusion(schedule, T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, T // 3, T // 2, T - 2, T - 1])
    abar = _col(_abar(d), t.numpy())
    expected = np.sqrt(abar) * _np(x0) + np.sqrt(1 - abar) * _np(eps)
    got = d.q_sample(x0, t, eps)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(_np(got), expected, rtol=1e-10, atol=1e-12)
    # float32 inputs stay float32 and agree to float32 precision.
    got32 = d.q_sample(x0.float(), t, eps.float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(_np(got32), expected, rtol=1e-5, atol=1e-6)


def test_q_sample_at_zero_noise_and_zero_image() -> None:
    d = _diffusion("linear", 20)
    x0 = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 19])
    abar = _abar(d)
    got = d.q_sample(x0, t, torch.zeros_like(x0))
    np.testing.assert_allclose(_np(got)[:, 0, 0, 0], np.sqrt(abar[[0, 19]]), rtol=1e-12)
    got = d.q_sample(torch.zeros_like(x0), t, x0)
    np.testing.assert_allclose(_np(got)[:, 0, 0, 0], np.sqrt(1 - abar[[0, 19]]), rtol=1e-12)


# -- posterior -----------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1000, 20])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_matches_closed_forms(schedule: str, T: int) -> None:
    """Between consecutive timesteps (abar_prev = abar_{t-1}, 1 at t = 0), as the full chain uses it."""
    d = _diffusion(schedule, T)
    betas, abar = _np(d.betas), _abar(d)
    abar_prev = np.concatenate(([1.0], abar[:-1]))
    ac = _np(d.alphas_cumprod)
    coefs = [posterior_coefficients(float(ac[t]), float(ac[t - 1]) if t else 1.0) for t in range(T)]
    got_x0, got_xt, var = (np.array(c) for c in zip(*coefs))
    g = torch.Generator().manual_seed(1)
    ts = np.arange(T)
    x0 = _np(torch.randn(T, 2, 3, 3, generator=g, dtype=torch.float64))
    xt = _np(torch.randn(T, 2, 3, 3, generator=g, dtype=torch.float64))
    mean = _col(got_x0, ts) * x0 + _col(got_xt, ts) * xt

    # DDPM eq. 7: tilde beta_t and the two mean coefficients.
    tilde_beta = betas * (1 - abar_prev) / (1 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    np.testing.assert_allclose(var, tilde_beta, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(mean, _col(coef1, ts) * x0 + _col(coef2, ts) * xt, rtol=1e-9, atol=1e-12)

    # Independently by Bayes: x_{t-1} | x0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and
    # x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t) give a Gaussian conditional whose precision
    # is the sum of the precisions and whose mean is the precision-weighted average.
    s = ts[1:]
    alpha = 1 - betas[s]
    precision = 1 / (1 - abar_prev[s]) + alpha / betas[s]
    bayes_var = 1 / precision
    np.testing.assert_allclose(var[1:], bayes_var, rtol=1e-8)
    bayes_mean = _col(bayes_var, s - 1) * (
        _col(np.sqrt(abar_prev[s]) / (1 - abar_prev[s]), s - 1) * x0[1:]
        + _col(np.sqrt(alpha) / betas[s], s - 1) * xt[1:]
    )
    np.testing.assert_allclose(mean[1:], bayes_mean, rtol=1e-8, atol=1e-10)
    # At t = 0 the posterior is a point mass at x0.
    assert var[0] == 0.0
    np.testing.assert_allclose(mean[0], x0[0], rtol=1e-12, atol=1e-12)


# -- parameterisations ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_predict_x0_eps_inverts_target(objective: str, schedule: str) -> None:
    d = _diffusion(schedule, 20, objective)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(20, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(20, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.arange(20)
    out = d.target(x0, eps, t)
    x0_hat, eps_hat = d.predict_x0_eps(out, d.q_sample(x0, t, eps), t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_target_is_the_named_quantity(objective: str) -> None:
    d = _diffusion("cosine", 20, objective)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 10, 19])
    abar = _col(_abar(d), t.numpy())
    expected = {
        "pred_noise": _np(eps),
        "pred_x0": _np(x0),
        "pred_v": np.sqrt(abar) * _np(eps) - np.sqrt(1 - abar) * _np(x0),
    }[objective]
    np.testing.assert_allclose(_np(d.target(x0, eps, t)), expected, rtol=1e-10, atol=1e-12)


# -- loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_is_finite_and_reaches_every_parameter(objective: str) -> None:
    d = _diffusion("sigmoid", 20, objective)
    torch.manual_seed(0)
    model = UNet(tiny_model(num_res_blocks=2))
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 6, 13, 19])
    loss = d.loss(model, x0, t, noise)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class _Fixed:
    """A 'model' that returns a fixed output, whatever x_t and t are."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_without_min_snr_equals_the_implied_noise_mse(objective: str) -> None:
    # Without min_snr_gamma every objective is weighted so that its loss is the MSE between the
    # true noise and the noise implied by the output; computed here in numpy from closed forms.
    d = _diffusion("cosine", 20, objective)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 4, 9, 14, 18])
    a = np.sqrt(_col(_abar(d), t.numpy()))
    s = np.sqrt(1 - _col(_abar(d), t.numpy()))
    xt = a * _np(x0) + s * _np(noise)
    implied_eps = {
        "pred_noise": _np(out),
        "pred_x0": (xt - a * _np(out)) / s,
        "pred_v": s * xt + a * _np(out),
    }[objective]
    expected = ((implied_eps - _np(noise)) ** 2).mean()
    got = float(d.loss(_Fixed(out), x0, t, noise))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", [None, 5.0, 0.5])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_gamma_weights(objective: str, gamma: float | None) -> None:
    d = _diffusion("linear", 20, objective, gamma)
    abar = _abar(d)
    snr = abar / (1 - abar)
    w = np.minimum(snr, gamma) if gamma is not None else snr
    expected = {
        "pred_noise": w / snr if gamma is not None else np.ones_like(snr),
        "pred_x0": w,
        "pred_v": w / (snr + 1),
    }[objective]
    np.testing.assert_allclose(_np(d.loss_weight), expected, rtol=1e-9)
    if gamma is not None:
        # The clamp is active for the low-noise steps and inactive for the noisy ones.
        assert snr[0] > gamma > snr[-1]
        if objective == "pred_noise":
            assert _np(d.loss_weight)[0] == pytest.approx(gamma / snr[0])
            assert _np(d.loss_weight)[-1] == pytest.approx(1.0)

    # The weights reach the loss: with a zero output each image's loss is w_t * mean(target^2).
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 7, 19])
    a, s = np.sqrt(abar[t.numpy()]), np.sqrt(1 - abar[t.numpy()])
    target = {
        "pred_noise": _np(noise),
        "pred_x0": _np(x0),
        "pred_v": a[:, None, None, None] * _np(noise) - s[:, None, None, None] * _np(x0),
    }[objective]
    per_image = (target**2).reshape(3, -1).mean(axis=1) * expected[t.numpy()]
    got = float(d.loss(_Fixed(torch.zeros_like(x0)), x0, t, noise))
    assert got == pytest.approx(per_image.mean(), rel=1e-5)


def test_min_snr_gamma_changes_the_noise_loss() -> None:
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1])  # high SNR: where Min-SNR down-weights
    plain = _diffusion(gamma=None).loss(_Fixed(torch.zeros_like(x0)), x0, t, noise)
    clamped = _diffusion(gamma=5.0).loss(_Fixed(torch.zeros_like(x0)), x0, t, noise)
    assert float(clamped) < 0.5 * float(plain)
