"""Tests for ddpm_cifar.models.hf_export: a model.arch ddpm checkpoint exported as a diffusers
DDPMPipeline folder computes, and samples, what it does here.

diffusers is a test-only dependency; nothing is downloaded. The network is a tiny ddpm-arch one
(channels 32 and 64: the arch needs multiples of 32) on 8x8 images, with random weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require
from factories import save_tiny_checkpoint, tiny_diffusion, tiny_model

from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.diffusion.samplers import ImageNoise, final, run_sampler, spaced_timesteps
from ddpm_cifar.models import checkpoint
from ddpm_cifar.models.ddpm_unet import DdpmUNet, DdpmUNetConfig, load_diffusers_folder
from ddpm_cifar.models.hf_export import export, scheduler_config, unet_config
from ddpm_cifar.models.networks import build_model
from ddpm_cifar.runtime.config import DiffusionConfig, SamplerConfig
from ddpm_cifar.runtime.errors import UserError

diffusers = require("diffusers", module_level=True)
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

diffusers.utils.logging.set_verbosity_error()  # it warns about attention_head_dim=None, as published

ROOT = Path(__file__).resolve().parents[1]
# Dropout 0.1 (the paper's) to check that it travels; it is inactive in eval mode either way.
TINY_DDPM = dict(arch="ddpm", dim=32, dim_mults=(1, 2), attn_heads=1, full_attn=(False, True), dropout=0.1)
# Sigmoid betas travel as trained_betas, v-prediction as v_prediction: the least default mapping.
DIFFUSION = dict(timesteps=100, beta_schedule="sigmoid", objective="pred_v")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, in float64 (a plain number, for a readable failure)."""
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DdpmUNet]:
    """(export folder, our network) for a ddpm checkpoint whose every weight is random: with Ho et
    al.'s near-zero initialisation a swapped or ignored layer would hardly change the output."""
    root = tmp_path_factory.mktemp("hf")
    model_cfg, diffusion_cfg = tiny_model(**TINY_DDPM), tiny_diffusion(**DIFFUSION)
    torch.manual_seed(0)
    net = build_model(model_cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    checkpoint.save(root / "ema.pt", {**checkpoint.model_payload(model_cfg, diffusion_cfg), "step": 3,
                                      "ema": net.state_dict()})
    out = export(root / "ema.pt", root / "out")
    assert out == root / "out"
    return out, checkpoint.load_model(root / "ema.pt").net


def test_folder_layout_and_unet_config_round_trip(exported: tuple[Path, DdpmUNet]) -> None:
    out, net = exported
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "model_index.json", "scheduler", "scheduler/scheduler_config.json", "unet", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    modes = {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert len(modes) == 1 and modes.pop() & 0o044  # the weights as readable as the JSON (safetensors: 0600)
    assert json.loads((out / "model_index.json").read_text()) == {
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    config = json.loads((out / "unet" / "config.json").read_text())
    assert DdpmUNetConfig.from_diffusers(config) == net.settings  # dropout 0.1 included
    assert DdpmUNetConfig.from_diffusers(unet_config(DdpmUNetConfig())) == DdpmUNetConfig()  # the paper's


def test_diffusers_unet_has_our_weights_and_computes_our_function(exported: tuple[Path, DdpmUNet]) -> None:
    out, net = exported
    theirs = UNet2DModel.from_pretrained(out / "unet").eval()
    assert theirs.config.dropout == 0.1
    back = DdpmUNet(net.settings)
    back.load_state_dict(theirs.state_dict(), strict=True)
    ours_state = net.state_dict()
    assert all(torch.equal(v, ours_state[k]) for k, v in back.state_dict().items())
    torch.manual_seed(1)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 41, 99])
    with torch.no_grad():
        assert max_abs(net.eval()(x, t), theirs(x, t).sample) <= 1e-5  # measured: 2.4e-6
    # And our own diffusers loader reads the unet folder back to the same weights.
    loaded = load_diffusers_folder(out / "unet")
    assert loaded.settings == net.settings
    assert all(torch.equal(v, ours_state[k]) for k, v in loaded.state_dict().items())


def test_pipeline_loads_with_our_schedule_and_samples(exported: tuple[Path, DdpmUNet]) -> None:
    out, _ = exported
    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    ours = GaussianDiffusion(tiny_diffusion(**DIFFUSION))
    sched = pipe.scheduler
    assert isinstance(sched, DDPMScheduler) and sched.config.prediction_type == "v_prediction"
    assert sched.config.variance_type == "fixed_small" and sched.config.clip_sample
    assert max_abs(sched.betas, ours.betas) <= 1e-6
    assert max_abs(sched.alphas_cumprod, ours.alphas_cumprod) <= 1e-6
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    assert (images >= 0).all() and (images <= 1).all()  # np.isfinite is implied: NaN fails both


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("timesteps", [10, 1000])
def test_scheduler_betas_match_ours(schedule: str, timesteps: int) -> None:
    """T = 10 caps linear betas at 0.999 (exported as trained_betas); T = 1000 is the paper's."""
    cfg = DiffusionConfig(timesteps, schedule, "pred_noise", None)
    sched = DDPMScheduler.from_config(scheduler_config(cfg))
    ours = GaussianDiffusion(cfg)
    # Measured: at most 4.4e-7 (alphas_cumprod, float32 in diffusers) over these six.
    assert max_abs(sched.alphas_cumprod, ours.alphas_cumprod) <= 1e-6
    assert max_abs(sched.betas, ours.betas) <= 1e-6


def test_linspace_spacing_is_our_uniform_spacing() -> None:
    sched = DDPMScheduler.from_config(scheduler_config(DiffusionConfig(1000, "linear", "pred_noise", None)))
    for steps in (2, 3, 7, 10, 333, 1000):
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == spaced_timesteps(1000, steps, "uniform")[::-1]


@pytest.mark.parametrize(("objective", "variance", "clip_x0"), [
    ("pred_noise", "posterior", True), ("pred_v", "beta", True), ("pred_x0", "posterior", False)])
def test_scheduler_steps_are_our_ddpm_sampler(monkeypatch: pytest.MonkeyPatch, objective: str, variance: str,
                                              clip_x0: bool) -> None:
    """The whole respaced chain, diffusers' DDPMScheduler against our ddpm sampler, fed the same noise
    (ours: diffusers' randn is patched to return our sampler's draws, in order)."""
    cfg = DiffusionConfig(50, "cosine", objective, None)
    steps, seeds = 7, [3, 4]
    noise_of = ImageNoise(seeds, (3, 8, 8), "cpu")  # the draws run_sampler makes for these seeds

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # any smooth function of (x, t) will do
        return torch.tanh(1.5 * x) + 0.02 * t.float().reshape(-1, 1, 1, 1) - 0.3

    ours = final(run_sampler(model, GaussianDiffusion(cfg), seeds, SamplerConfig(
        "ddpm", steps, "uniform", variance=variance, clip_x0=clip_x0), shape=(3, 8, 8), device="cpu"))
    draws = iter(range(1, steps))
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise_of.draw(next(draws)))
    sched = DDPMScheduler.from_config(scheduler_config(cfg, variance=variance, clip_x0=clip_x0))
    sched.set_timesteps(steps)
    x = noise_of.draw(0)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(len(seeds))), t, x).prev_sample
    assert next(draws, None) is None  # noise drawn at every step but the last, as ours
    assert max_abs(x, ours) <= 1e-5  # measured: at most 1.3e-6 (float32 coefficients)


def test_a_unet_arch_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "ema.pt")  # model.arch unet
    with pytest.raises(UserError, match=r"model.arch is 'unet'; only model.arch ddpm"):
        export(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["ema.pt"]


def test_a_non_empty_folder_is_refused_and_an_empty_one_filled(exported: tuple[Path, DdpmUNet],
                                                               tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not empty .*pick another output folder or delete it"):
        export(tmp_path / "nowhere.pt", exported[0])  # refused before the checkpoint is even read
    (tmp_path / "empty").mkdir()
    # The export's own checkpoint is one level up from its folder.
    export(exported[0].parent / "ema.pt", tmp_path / "empty")
    assert (tmp_path / "empty" / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temporary folder left behind


def test_script_reports_a_missing_checkpoint_in_one_line(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "export_diffusers.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "--checkpoint",
                           str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing.pt'} not found"]
    # The exporter itself never imports diffusers (a test-only dependency).
    check = "import sys, ddpm_cifar.models.hf_export; print('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120).stdout.strip() == "False"
