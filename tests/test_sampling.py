"""Tests for ddpm_cifar.diffusion.generate: the sampler config, per-image seeds, the DDPM posterior step,
quantisation, caching."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import tiny_diffusion, tiny_model

from ddpm_cifar.diffusion.generate import FixedBatch, denoising_frames, generate_images, to_uint8, use_bf16
from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.diffusion.samplers import (
    SAMPLERS,
    ImageNoise,
    ddim,
    ddpm,
    dpmpp_2m,
    final,
    run_sampler,
    spaced_timesteps,
)
from ddpm_cifar.models.unet import UNet
from ddpm_cifar.runtime.config import SPACING_NAMES, SamplerConfig
from ddpm_cifar.runtime.errors import UserError

SHAPE = (3, 8, 8)
SEEDS = list(range(10, 18))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(0)
    return UNet(tiny_model()).eval()


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(tiny_diffusion(objective="pred_v", beta_schedule="cosine"))


def _generate(model, diffusion, seeds, *, steps: int = 20, batch_size: int = 8, **kw) -> np.ndarray:
    return generate_images(model, diffusion, seeds, SamplerConfig("ddpm", steps), batch_size=batch_size,
                           shape=SHAPE, device="cpu", progress=False, **kw)


def _draws(seed: int, n: int, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    """Draws 0 .. n-1 of the noise of an image with this seed, computed for that image alone."""
    noise = ImageNoise([seed], shape, "cpu")
    return [noise.draw(k)[0] for k in range(n)]


# -- the sampler config -------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "match"), [
    (dict(name="euler"), r"^sampler\.name must be one of ddpm, ddim, dpmpp_2m; got 'euler'$"),
    (dict(spacing="log"), r"^sampler\.spacing must be one of uniform, trailing, quadratic; got 'log'$"),
    (dict(steps=0), r"^sampler\.steps must be at least 1, got 0$"),
    (dict(eta=-0.1), r"^sampler\.eta must be in \[0, 1\], got -0\.1$"),
    (dict(eta=1.5), r"^sampler\.eta must be in \[0, 1\], got 1\.5$"),
    (dict(eta=float("nan")), r"got nan$"),
    (dict(variance="fixedlarge"), r"^sampler\.variance must be one of posterior, beta; got 'fixedlarge'$"),
])
def test_sampler_config_refuses_bad_settings_in_one_line(kw: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        SamplerConfig(**{"name": "ddim", "steps": 5, **kw})


def test_sampler_steps_are_checked_against_the_diffusion(tmp_path: Path) -> None:
    spec = SamplerConfig("ddpm", 21)
    spec.check_steps(21)
    message = r"^sampler\.steps 21 exceeds the model's diffusion\.timesteps 20$"
    with pytest.raises(UserError, match=message):
        spec.check_steps(20)
    d = GaussianDiffusion(tiny_diffusion())
    with pytest.raises(UserError, match=message):  # before it touches the cache of the run it replaces
        generate_images(_pointwise, d, [], spec, batch_size=2, shape=SHAPE, device="cpu", progress=False,
                        cache_dir=tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    with pytest.raises(UserError, match=message):
        denoising_frames(_pointwise, d, [0], spec, frames=2, shape=SHAPE, device="cpu")


def test_every_setting_that_changes_the_images_changes_the_key() -> None:
    base = SamplerConfig("ddim", 10, "uniform", 0.5, clip_x0=True)
    others = [SamplerConfig("dpmpp_2m", 10, "uniform", 0.5), SamplerConfig("ddim", 11, "uniform", 0.5),
              SamplerConfig("ddim", 10, "trailing", 0.5), SamplerConfig("ddim", 10, "uniform", 0.25),
              SamplerConfig("ddim", 10, "uniform", 0.0),
              SamplerConfig("ddim", 10, "uniform", 0.5, clip_x0=False),
              SamplerConfig("ddpm", 10, "uniform", 0.5, variance="beta")]
    keys = {spec.key() for spec in others}
    assert len(keys) == len(others) and base.key() not in keys
    # Only DDIM reads eta: for the others it changes nothing, in the images or the key.
    assert SamplerConfig("ddpm", 10, eta=0.7).key() == SamplerConfig("ddpm", 10).key()
    assert SamplerConfig("ddim", 10, eta=1).key() == SamplerConfig("ddim", 10, eta=1.0).key()
    # Only DDPM reads the variance.
    assert SamplerConfig("ddim", 10, variance="beta").key() == SamplerConfig("ddim", 10).key()
    assert SamplerConfig("ddpm", 10, variance="beta").key() == "ddpm:10:uniform:var=beta:clip"
    assert SamplerConfig("dpmpp_2m", 20, "quadratic").key() == "dpmpp_2m:20:quadratic:clip"


def test_bf16_only_where_asked_and_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_bf16("auto", cpu) and not use_bf16("fp32", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert use_bf16("auto", cuda) and not use_bf16("fp32", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert not use_bf16("auto", cuda)
    with pytest.raises(ValueError, match="precision"):
        use_bf16("bf16", cpu)


def test_the_spec_reaches_the_sampler(model: UNet, diffusion: GaussianDiffusion) -> None:
    """Each field the key holds changes the images (eta through DDIM), and no field is dropped on
    the way from generate_images to the sampler."""
    def run(spec: SamplerConfig) -> np.ndarray:
        return generate_images(model, diffusion, SEEDS[:3], spec, batch_size=3, shape=SHAPE, device="cpu",
                               progress=False)

    base = run(SamplerConfig("ddim", 6, "uniform", 0.0))
    for other in (SamplerConfig("ddim", 6, "uniform", 1.0), SamplerConfig("ddim", 5, "uniform", 0.0),
                  SamplerConfig("ddim", 6, "quadratic", 0.0), SamplerConfig("ddpm", 6, "uniform", 0.0),
                  SamplerConfig("dpmpp_2m", 6, "uniform", 0.0)):
        assert (run(other) != base).any(), other
    ddpm = SamplerConfig("ddpm", 6, "uniform")
    assert (run(dataclasses.replace(ddpm, variance="beta")) != run(ddpm)).any()
    d = GaussianDiffusion(tiny_diffusion(objective="pred_x0"))
    for clip_x0, end in ((True, 1.0), (False, 3.0)):  # a network that predicts x0 = 3 everywhere
        spec = SamplerConfig("ddim", 5, clip_x0=clip_x0)
        x = final(run_sampler(lambda x, t: torch.full_like(x, 3.0), d, [0], spec, shape=SHAPE, device="cpu"))
        torch.testing.assert_close(x, torch.full((1, *SHAPE), end))
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m"}


# -- per-image seeds -----------------------------------------------------------------------------

def _pointwise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in network that treats every pixel on its own, with exactly rounded ops only
    (no reductions, no transcendental functions): bit for bit independent of the batch size."""
    return 0.3 * x * x - 0.5 * x + 0.01 * t.float()[:, None, None, None]


@pytest.mark.parametrize("steps", [20, 7])
def test_per_image_randomness_does_not_depend_on_batch_size(diffusion: GaussianDiffusion,
                                                            steps: int) -> None:
    by_8 = _generate(_pointwise, diffusion, SEEDS, steps=steps, batch_size=8)
    assert by_8.shape == (8, 8, 8, 3) and by_8.dtype == np.uint8
    for batch_size in (3, 1):
        other = _generate(_pointwise, diffusion, SEEDS, steps=steps, batch_size=batch_size)
        np.testing.assert_array_equal(other, by_8, err_msg=f"batch_size {batch_size}")


def _assert_same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> None:
    """Equal uint8 images, but for the odd pixel one step off.

    The U-Net's matrix products round differently for different batch sizes (BLAS blocking: the
    time MLP alone differs by ~1e-7), so a value that lands within ~1e-6 of a quantisation
    boundary may round the other way; anything beyond one level or a few pixels is a real bug.
    """
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() <= 0.005, (diff > 0).sum()


@pytest.mark.parametrize("steps", [20, 7])
def test_unet_images_do_not_depend_on_batch_size(model: UNet, diffusion: GaussianDiffusion,
                                                 steps: int) -> None:
    by_8 = _generate(model, diffusion, SEEDS, steps=steps, batch_size=8)
    for batch_size in (3, 1):
        _assert_same_up_to_rounding(_generate(model, diffusion, SEEDS, steps=steps, batch_size=batch_size),
                                    by_8)


def test_an_image_is_the_same_alone_or_among_others(model: UNet, diffusion: GaussianDiffusion) -> None:
    among = _generate(_pointwise, diffusion, SEEDS, steps=7)
    alone = _generate(_pointwise, diffusion, [13], steps=7)
    np.testing.assert_array_equal(alone[0], among[SEEDS.index(13)])
    reordered = _generate(_pointwise, diffusion, [17, 13, 10], steps=7)
    np.testing.assert_array_equal(reordered, among[[7, 3, 0]])
    # The same, bit for bit, with the U-Net: generate_images pads every network call to the same
    # batch shape (FixedBatch), so its matrix products round the same way for 1 image or 8.
    among = _generate(model, diffusion, SEEDS, steps=7)
    np.testing.assert_array_equal(_generate(model, diffusion, [13], steps=7)[0], among[3])
    np.testing.assert_array_equal(_generate(model, diffusion, [17, 13, 10], steps=7), among[[7, 3, 0]])


def test_fixed_batch_calls_the_network_on_one_shape_only(model: UNet) -> None:
    shapes: list[tuple[int, ...]] = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        assert t.shape == x.shape[:1]
        return model(x, t)

    net = FixedBatch(recording, 4)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 20, (10,), generator=g)
    with torch.no_grad():
        out = net(x, t)
        assert out.shape == (10, 3, 8, 8)
        assert set(shapes) == {(4, 3, 8, 8)} and len(shapes) == 3  # 4 + 4 + (2 padded to 4)
        # Row i of the output belongs to input row i, wherever it sat in its padded chunk.
        torch.testing.assert_close(out[8:], model(x[8:], t[8:]))
        np.testing.assert_array_equal(net(x[3:4], t[3:4]).numpy(), out[3:4].numpy())
    with pytest.raises(ValueError, match="at least 1"):
        FixedBatch(model, 0)


def test_different_seeds_give_different_images(model: UNet, diffusion: GaussianDiffusion) -> None:
    images = _generate(model, diffusion, SEEDS, steps=7).astype(int)
    for i in range(len(SEEDS)):
        for j in range(i + 1, len(SEEDS)):
            assert np.abs(images[i] - images[j]).mean() > 5, (SEEDS[i], SEEDS[j])
    # And the same seed twice gives the same image twice.
    twice = _generate(model, diffusion, [10, 10], steps=7)
    np.testing.assert_array_equal(twice[0], twice[1])


def test_image_noise_draws_are_exact_per_seed() -> None:
    noise = ImageNoise([3, 5, 3], (2, 4, 4), "cpu")
    assert len(noise) == 3
    got = [noise.draw(k) for k in range(3)]
    for row, seed in enumerate([3, 5, 3]):
        for k, expected in enumerate(_draws(seed, 3, (2, 4, 4))):
            assert torch.equal(got[k][row], expected), (seed, k)
    assert got[0].shape == (3, 2, 4, 4) and got[0].dtype == torch.float32
    assert not torch.equal(got[0][0], got[1][0])  # each draw index gives new noise
    assert not torch.equal(got[0][0], got[0][1])  # and each seed
    assert torch.equal(noise.draw(1), got[1])  # a pure function of (seed, index): no hidden state


def test_image_noise_is_standard_normal_and_independent() -> None:
    from scipy import stats

    noise = ImageNoise(range(200), (3, 8, 8), "cpu")
    draws = torch.stack([noise.draw(k) for k in range(10)])  # (10, 200, 3, 8, 8)
    flat = draws.double().flatten().numpy()
    assert abs(flat.mean()) < 5 / np.sqrt(flat.size)
    assert abs(flat.std() - 1) < 5 * np.sqrt(0.5 / flat.size)
    assert stats.kstest(flat[:100_000], "norm").pvalue > 1e-4
    # 4th moment (kurtosis 3) checks the tails; 24-bit uniforms cap |z| at 5.77.
    assert abs((flat**4).mean() - 3) < 0.05 and np.abs(flat).max() <= 5.8
    # Neighbouring seeds, draws and pixels are uncorrelated.
    pairs = [(draws[0, 0], draws[0, 1]), (draws[0, 0], draws[1, 0]),
             (draws[0, :, 0, 0, 0], draws[0, :, 0, 0, 1])]
    for a, b in pairs:
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < 5 / np.sqrt(a.numel()), r


def test_noise_hash_is_splitmix64() -> None:
    """The int64 tensor hash against a plain-Python splitmix64 finaliser, on edge values too."""
    from ddpm_cifar.diffusion.samplers import _mix64, _mix64_int
    def reference(z: int) -> int:
        m = (1 << 64) - 1
        z &= m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    values = [0, 1, 2**63 - 1, -(2**63), -1, 0x5EED, 123456789123456789]
    got = _mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    for v, g in zip(values, got):
        assert g % (1 << 64) == reference(v), v
        assert _mix64_int(v) % (1 << 64) == reference(v), v
    assert reference(0) == 0 and reference(1) == 0x5692161D100B05E5  # splitmix64's finaliser of 1


def test_image_noise_takes_large_seeds() -> None:
    big = ImageNoise([2**62, 0, 2**31 - 1], (4,), "cpu").draw(0)
    assert big.shape == (3, 4) and torch.isfinite(big).all()
    assert len({tuple(r.tolist()) for r in big}) == 3


# -- timesteps -----------------------------------------------------------------------------------

def test_spaced_timesteps_1000_50() -> None:
    ts = spaced_timesteps(1000, 50)
    assert len(ts) == 50 == len(set(ts))
    assert ts == sorted(ts)
    assert ts[0] == 0 and ts[-1] == 999
    assert all(isinstance(t, int) for t in ts)
    gaps = np.diff(ts)
    assert gaps.min() >= 20 and gaps.max() <= 21  # evenly spread: 999 / 49 = 20.4


@pytest.mark.parametrize("T", [2, 20, 1000])
def test_spaced_timesteps_full_chain_is_every_step(T: int) -> None:
    assert spaced_timesteps(T, T) == list(range(T))


@pytest.mark.parametrize("spacing", SPACING_NAMES)
@pytest.mark.parametrize("T", [5, 20, 333])
def test_spaced_timesteps_always_gives_the_requested_count(T: int, spacing: str) -> None:
    for steps in range(1, T + 1):
        ts = spaced_timesteps(T, steps, spacing)
        assert len(ts) == len(set(ts)) == steps, (steps, ts)
        assert ts == sorted(ts) and ts[-1] == T - 1
        assert 0 <= ts[0]
        if steps > 1 and spacing != "trailing":
            assert ts[0] == 0


def test_trailing_and_quadratic_spacings() -> None:
    assert spaced_timesteps(1000, 50, "trailing")[:3] == [19, 39, 59]
    assert spaced_timesteps(1000, 50, "trailing")[-1] == 999
    quad = spaced_timesteps(1000, 50, "quadratic")
    gaps = np.diff(quad)
    assert quad[:3] == [0, 1, 2] and (np.diff(gaps) >= -1).all()  # gaps grow towards t = T-1
    assert gaps[-1] == 40
    with pytest.raises(ValueError, match="unknown spacing 'log'"):  # SamplerConfig names the key
        spaced_timesteps(1000, 50, "log")


@pytest.mark.parametrize("steps", [0, 21, -1])
def test_spaced_timesteps_rejects_impossible_counts(steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):  # SamplerConfig.check_steps names the key
        spaced_timesteps(20, steps)


# -- the DDPM step -------------------------------------------------------------------------------

class _Recorder:
    """A 'model' returning a fixed output; records the timesteps it is asked about."""

    def __init__(self, out: torch.Tensor):
        self.out, self.ts = out, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.shape == self.out.shape and t.shape == (x.shape[0],)
        assert (t == t[0]).all()
        self.ts.append(int(t[0]))
        return self.out


def test_first_step_with_steps_equal_T_is_ddpms_posterior() -> None:
    """On the full chain, DDPM eq. 7 with the schedule's own betas (not the ratio of alpha_bars)."""
    d = GaussianDiffusion(tiny_diffusion(objective="pred_noise", beta_schedule="linear"))
    seeds = [4, 9]
    eps = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(99))
    sampler = ddpm(_Recorder(eps), d, ImageNoise(seeds, SHAPE, "cpu"), spaced_timesteps(20, 20), clip_x0=True)
    first, second = next(sampler), next(sampler)
    draws = [_draws(s, 2) for s in seeds]
    x_T = torch.stack([dr[0] for dr in draws])
    z = torch.stack([dr[1] for dr in draws])
    assert first.index == 0 and first.x0 is None
    assert torch.equal(first.x, x_T)

    betas = d.betas.numpy()
    abar, abar_prev = float(np.prod(1 - betas)), float(np.prod(1 - betas[:-1]))
    beta = float(betas[-1])
    x0 = ((x_T.double() - np.sqrt(1 - abar) * eps.double()) / np.sqrt(abar)).clamp(-1, 1)
    mean = (beta * np.sqrt(abar_prev) / (1 - abar) * x0
            + (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar) * x_T.double())
    expected = mean + np.sqrt(beta * (1 - abar_prev) / (1 - abar)) * z.double()
    assert second.index == 1 and second.t == 18
    torch.testing.assert_close(second.x0.double(), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(second.x.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [20, 7, 1])
def test_every_step_is_the_bayes_posterior_between_visited_timesteps(steps: int) -> None:
    # With a model that predicts a fixed x0, each step must draw from q(x_prev | x_t, x0) for the
    # visited timesteps (t, prev), computed here by Bayes from the alpha_bars alone:
    # x_t | x_prev ~ N(sqrt(a) x_prev, 1 - a) with a = abar_t / abar_prev.
    d = GaussianDiffusion(tiny_diffusion(objective="pred_x0", beta_schedule="sigmoid"))
    abar = np.cumprod(1 - d.betas.numpy())
    seeds = [0, 1, 2]
    x0 = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    model = _Recorder(x0)
    states = list(ddpm(model, d, ImageNoise(seeds, SHAPE, "cpu"), spaced_timesteps(20, steps), clip_x0=False))
    ts = spaced_timesteps(20, steps)
    assert model.ts == ts[::-1]
    assert len(states) == steps + 1
    assert [s.t for s in states[1:]] == [*ts[::-1][1:], -1]
    draws = [_draws(s, steps + 1) for s in seeds]
    x = torch.stack([dr[0] for dr in draws]).double().numpy()
    x0_np = x0.double().numpy()
    for k, t in enumerate(ts[::-1], start=1):
        prev = ts[ts.index(t) - 1] if t != ts[0] else None
        if prev is None:  # the last step lands on the mean, x0 itself
            x = x0_np * 1.0
        else:
            a = abar[t] / abar[prev]
            var = 1 / (1 / (1 - abar[prev]) + a / (1 - a))
            mean = var * (np.sqrt(abar[prev]) / (1 - abar[prev]) * x0_np + np.sqrt(a) / (1 - a) * x)
            z = torch.stack([dr[k] for dr in draws]).double().numpy()
            x = mean + np.sqrt(var) * z
        np.testing.assert_allclose(states[k].x.double().numpy(), x, rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {k} (t={t})")
        assert torch.equal(states[k].x0, x0)


def test_clip_x0_clamps_the_estimate() -> None:
    d = GaussianDiffusion(tiny_diffusion(objective="pred_x0"))
    big = torch.full((1, *SHAPE), 3.0)
    ts = spaced_timesteps(20, 5)
    clipped = list(ddpm(_Recorder(big), d, ImageNoise([0], SHAPE, "cpu"), ts, clip_x0=True))
    free = list(ddpm(_Recorder(big), d, ImageNoise([0], SHAPE, "cpu"), ts, clip_x0=False))
    assert torch.equal(clipped[-1].x, torch.ones(1, *SHAPE))
    assert torch.equal(free[-1].x, big)


@pytest.mark.parametrize("sampler", [ddim, dpmpp_2m])
def test_clipped_x0_also_sets_the_noise_estimate(sampler) -> None:
    """DDIM and DPM-Solver++ also use the noise estimate: it must be the one the clipped x0 implies,
    so that a network predicting x0 = 3 everywhere still ends on x0 = 1."""
    d = GaussianDiffusion(tiny_diffusion(objective="pred_x0"))
    big = torch.full((1, *SHAPE), 3.0)
    steps = list(sampler(_Recorder(big), d, ImageNoise([0], SHAPE, "cpu"), spaced_timesteps(20, 5),
                         clip_x0=True, eta=0.0))
    torch.testing.assert_close(steps[-1].x, torch.ones(1, *SHAPE))


# -- quantisation --------------------------------------------------------------------------------

def test_to_uint8() -> None:
    values = torch.tensor([-1.0, 1.0, 0.0, -2.0, 5.0, -1 + 0.5 / 127.5, -1 + 1.49 / 127.5, 0.999])
    x = values.reshape(1, 1, 1, -1).expand(2, 3, 1, -1).clone()
    x[1] = -x[1]
    x[0, 1] = 0.5
    got = to_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (2, 1, 8, 3)  # (B, H, W, C)
    # Round half to even: 127.5 -> 128, 0.5 -> 0, 254.5 -> 254.
    assert got[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 0, 1, 255]
    assert got[1, 0, :, 0].tolist() == [255, 0, 128, 255, 0, 254, 254, 0]
    assert (got[0, 0, :, 1] == 191).all()  # channel 1 ends up last: (0.5 + 1) * 127.5 = 191.25
    assert got[0, 0, :, 2].tolist() == got[0, 0, :, 0].tolist()


# -- denoising frames ----------------------------------------------------------------------------

def test_denoising_frames(model: UNet, diffusion: GaussianDiffusion) -> None:
    seeds = [3, 8]
    frames, timesteps = denoising_frames(model, diffusion, seeds, SamplerConfig("ddpm", 20), frames=5,
                                         shape=SHAPE, device="cpu")
    assert frames.shape == (2, 5, 8, 8, 3) and frames.dtype == np.uint8
    assert len(timesteps) == 5
    assert timesteps[-1] == -1
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 5
    for i, s in enumerate(seeds):
        x_T = _draws(s, 1)[0].numpy()  # (C, H, W) float32
        expected = np.clip(np.round((x_T + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        np.testing.assert_array_equal(frames[i, 0], expected)
    # The last frame is the finished sample.
    np.testing.assert_array_equal(frames[:, -1], _generate(model, diffusion, seeds, steps=20))


def test_denoising_frames_with_more_frames_than_states(model: UNet, diffusion: GaussianDiffusion) -> None:
    frames, timesteps = denoising_frames(model, diffusion, [1], SamplerConfig("ddpm", 3), frames=10,
                                         shape=SHAPE, device="cpu")
    assert frames.shape == (1, 4, 8, 8, 3)  # x_T and one state per step
    assert timesteps[-1] == -1 and len(timesteps) == 4


# -- cache ---------------------------------------------------------------------------------------

class _Budget:
    """Wraps a model; fails the test if called more than ``calls`` times."""

    def __init__(self, model: UNet, calls: int):
        self.model, self.left, self.used = model, calls, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.used += 1
        if self.used > self.left:
            raise AssertionError("model called more often than the missing batch needs")
        return self.model(x, t)


def test_generate_images_resumes_from_the_cache(model: UNet, diffusion: GaussianDiffusion,
                                                tmp_path: Path) -> None:
    cache = tmp_path / "partial"
    first = _generate(model, diffusion, SEEDS, steps=7, batch_size=3, cache_dir=cache, cache_key="k1")
    shards = sorted(p.name for p in cache.glob("*.npy"))
    assert shards == ["00000000-3.npy", "00000003-3.npy", "00000006-2.npy"]
    (cache / "00000003-3.npy").unlink()

    budget = _Budget(model, calls=7)  # one batch of 7 steps
    again = _generate(budget, diffusion, SEEDS, steps=7, batch_size=3, cache_dir=cache, cache_key="k1")
    assert budget.used == 7
    np.testing.assert_array_equal(again, first)
    assert (cache / "00000003-3.npy").exists()
    # The cached images are the ones an uncached run makes.
    np.testing.assert_array_equal(first, _generate(model, diffusion, SEEDS, steps=7, batch_size=3))

    # Nothing missing: the model is not called at all.
    np.testing.assert_array_equal(
        _generate(_Budget(model, 0), diffusion, SEEDS, steps=7, batch_size=3, cache_dir=cache,
                  cache_key="k1"),
        first,
    )


def test_generate_images_ignores_a_cache_of_another_run(model: UNet, diffusion: GaussianDiffusion,
                                                         tmp_path: Path) -> None:
    cache = tmp_path / "partial"
    _generate(model, diffusion, SEEDS[:3], steps=7, batch_size=3, cache_dir=cache, cache_key="old")
    # Poison the old batch: a run with another key must not use it.
    np.save(cache / "00000000-3.npy", np.zeros((3, 8, 8, 3), np.uint8))
    budget = _Budget(model, calls=7)
    new = _generate(budget, diffusion, SEEDS[:3], steps=7, batch_size=3, cache_dir=cache, cache_key="new")
    assert budget.used == 7
    assert new.any()
    assert (cache / "key.txt").read_text() == "new"


def test_generate_images_with_no_seeds() -> None:
    out = generate_images(lambda x, t: x, GaussianDiffusion(tiny_diffusion()), [], SamplerConfig("ddpm", 5),
                          batch_size=4, shape=SHAPE, device="cpu", progress=False)
    assert out.shape == (0, 8, 8, 3) and out.dtype == np.uint8
