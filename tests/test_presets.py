"""The presets in configs/: each composes onto params.yaml into valid params, and the DDPM paper's
recipe (configs/ddpm-paper.yaml) says what Ho et al. 2020 and their released code say.

The values below are restated from the sources on purpose (not read from the preset): an edit of the
preset that drifts from the paper fails here. Sources: the paper's Appendix B and sections 3.2 and 4
(arXiv:2006.11239) and github.com/hojonathanho/diffusion (scripts/run_cifar.py, diffusion_tf/).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from committed import committed_text
from test_ddpm_unet import PUBLISHED_CONFIG, PUBLISHED_PARAMETERS
from test_run_preset import _script

from ddpm_cifar.diffusion.samplers import spaced_timesteps
from ddpm_cifar.models.networks import build_model, ddpm_unet_config
from ddpm_cifar.models.unet import count_parameters
from ddpm_cifar.runtime import config, params_file
from ddpm_cifar.training.ema import EMA
from ddpm_cifar.training.loop import learning_rate

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
PAPER = ROOT / "configs" / "ddpm-paper.yaml"

# (section, key) or (section, block, key): value, with where it comes from.
PAPER_VALUES: dict[tuple[str, ...], Any] = {
    ("model", "arch"): "ddpm",                   # the paper's network, as published (google/ddpm-cifar10-32)
    ("model", "dim"): 128,                       # run_cifar.py: ch=128
    ("model", "dim_mults"): [1, 2, 2, 2],        # run_cifar.py: ch_mult=(1, 2, 2, 2)
    ("model", "num_res_blocks"): 2,              # run_cifar.py; App. B "two convolutional residual blocks"
    ("model", "full_attn"): [False, True, False, False],  # attn_resolutions=(16,); App. B "at the 16x16"
    ("model", "dropout"): 0.1,                   # App. B; run_cifar.py dropout=0.1
    ("diffusion", "timesteps"): 1000,            # section 4 "T = 1000"
    ("diffusion", "beta_schedule"): "linear",    # section 4, 1e-4 to 0.02 (linear_betas at T = 1000)
    ("diffusion", "objective"): "pred_noise",    # model_mean_type='eps'
    ("diffusion", "min_snr_gamma"): None,        # loss_type='mse': the unweighted L_simple
    ("train", "steps"): 800_000,                 # App. B "800k steps"
    ("train", "batch_size"): 128,                # App. B; total_bs=128
    ("train", "grad_accum"): 1,
    ("train", "lr"): 2e-4,                       # App. B; lr=2e-4
    ("train", "warmup_steps"): 5000,             # run_cifar.py warmup=5000
    ("train", "best_metric"): "fid",             # App. B "the minimum FID value over the course of training"
    ("sample", "weights"): "best",               # ... and those weights are what the paper scores
    ("train", "adam_betas"): [0.9, 0.999],       # App. B "standard values"; TF AdamOptimizer defaults
    ("train", "max_grad_norm"): 1.0,             # grad_clip=1.
    ("train", "ema_decay"): 0.9999,              # App. B; run_training(ema_decay=0.9999)
    ("train", "ema_update_every"): 1,            # the EMA op follows every train op
    ("train", "ema_start_step"): 0,              # make_ema: decay 1e-10 (a copy) at step 0 only
    ("train", "ema_power"): None,                # no decay warm-up
    ("sample", "n"): 50_000,                     # App. B "50000 samples"; num_inception_samples=50000
    ("sample", "sampler", "name"): "ddpm",       # Algorithm 2
    ("sample", "sampler", "steps"): 1000,        # p_sample_loop over all T steps
    ("sample", "sampler", "variance"): "beta",   # model_var_type='fixedlarge'
    ("sample", "sampler", "clip_x0"): True,      # p_sample(clip_denoised=True)
    ("fid", "reference"): "train",               # trainfid50000: Table 1's FID is against the train set
    ("fid", "reference_count"): 0,
}


def _overlay(raw: dict[str, Any], values: dict[str, Any], where: str) -> None:
    """``values`` set key by key into ``raw``, into blocks too, as `-S section.block.key=` does."""
    for key, value in values.items():
        assert key in raw, f"params.yaml has no {where}{key}"
        if isinstance(value, dict):
            _overlay(raw[key], value, f"{where}{key}.")
        else:
            raw[key] = value


def composed(preset: Path) -> dict[str, Any]:
    """The committed params.yaml with ``preset``'s values on top, as `-S` would set them."""
    raw = params_file.parse_yaml(committed_text("params.yaml"), "HEAD:params.yaml")
    _overlay(raw, params_file.read_yaml(preset), f"{preset.name}: ")
    return raw


def _at(raw: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        raw = raw[key]
    return raw


def _section(preset: Path, name: str) -> Any:
    return params_file.parse_section(name, composed(preset)[name], config.SECTIONS[name])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_composes_into_valid_params(preset: Path) -> None:
    raw = composed(preset)
    for name, cls in config.SECTIONS.items():
        params_file.parse_section(name, raw[name], cls)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_the_script_accepts_every_preset(preset: Path) -> None:
    script, study = _script(), params_file.parse_yaml(committed_text("params.yaml"), "HEAD:params.yaml")
    script.check(study, script.plan(study, study, script.load_overlay(preset)))  # exits on a bad value


def test_paper_preset_states_the_papers_values() -> None:
    raw = composed(PAPER)
    wrong = {".".join(p): (_at(raw, p), v) for p, v in PAPER_VALUES.items() if _at(raw, p) != v}
    assert not wrong, f"preset value, paper value: {wrong}"
    # Each of those values cites its source ([paper ...] or [code]) in the comment on its line.
    uncited = [line for line in PAPER.read_text().splitlines()
               if line.startswith("  ") and line.split(":")[0].strip() in {p[-1] for p in PAPER_VALUES}
               and not ("[paper" in line.partition("#")[2] or "[code]" in line.partition("#")[2])]
    assert not uncited, f"values without their source: {uncited}"


def test_paper_preset_builds_the_published_35_7m_network() -> None:
    model_cfg = _section(PAPER, "model")
    settings = ddpm_unet_config(model_cfg)
    assert list(settings.block_out_channels) == PUBLISHED_CONFIG["block_out_channels"]
    assert list(settings.down_block_types) == PUBLISHED_CONFIG["down_block_types"]
    assert list(settings.up_block_types) == PUBLISHED_CONFIG["up_block_types"]
    assert settings.layers_per_block == PUBLISHED_CONFIG["layers_per_block"] and settings.dropout == 0.1
    assert count_parameters(build_model(model_cfg)) == PUBLISHED_PARAMETERS  # 35,746,307


def test_paper_linear_betas_run_from_1e4_to_0_02() -> None:
    from ddpm_cifar.diffusion.process import GaussianDiffusion

    betas = GaussianDiffusion(_section(PAPER, "diffusion")).betas
    assert len(betas) == 1000 and betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert (betas[1:] - betas[:-1]).std().item() < 1e-15  # evenly spaced: linear


def test_paper_warmup_reaches_the_papers_lr_at_5000_steps() -> None:
    cfg = _section(PAPER, "train")
    # diffusion_tf/utils.py get_warmed_up_lr: lr x min(global_step / warmup, 1), global_step = the
    # steps taken before this one.
    assert learning_rate(cfg, 0) == 0.0
    assert learning_rate(cfg, 2500) == pytest.approx(1e-4, rel=1e-12)
    assert learning_rate(cfg, 5000) == pytest.approx(2e-4, rel=1e-12)
    assert learning_rate(cfg, 799_999) == pytest.approx(2e-4, rel=1e-12)
    study = params_file.parse_section("train", yaml.safe_load(committed_text("params.yaml"))["train"],
                                 config.TrainConfig)
    assert study.warmup_steps == 0 and learning_rate(study, 0) == study.lr  # the study has none


def test_paper_ema_copies_once_then_decays_at_0_9999_every_step() -> None:
    cfg = _section(PAPER, "train")
    ema = EMA(torch.nn.Linear(1, 1), decay=cfg.ema_decay, update_every=cfg.ema_update_every,
              start_step=cfg.ema_start_step, inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power)
    assert [ema.decay_at(step) for step in (1, 2, 3, 1000)] == [0.0, 0.9999, 0.9999, 0.9999]


def test_paper_sampler_is_ancestral_ddpm_over_all_1000_steps_with_beta() -> None:
    spec = _section(PAPER, "sample").sampler
    assert (spec.name, spec.steps, spec.variance, spec.clip_x0) == ("ddpm", 1000, "beta", True)
    assert spaced_timesteps(1000, spec.steps, spec.spacing) == list(range(1000))
    assert _section(PAPER, "train").fid_sampler.variance == "beta"


def test_dry_run_prints_the_experiment_and_refuses_bad_overrides(tmp_path: Path) -> None:
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(b"x")
    base = [sys.executable, str(ROOT / "scripts" / "run_preset.py"), str(PAPER), "--source", str(archive)]
    ok = subprocess.run([*base, "--dry-run", "-S", "train.steps=10"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    command = ok.stdout.splitlines()[-1]
    assert command.startswith("$ dvc exp run --temp -n ddpm-paper-")
    assert "train.steps=10" in command and "train.steps=800000" not in command  # -S wins, once
    assert "sample.sampler.variance=" in command and "train.warmup_steps=5000" in command
    bad = subprocess.run([*base, "--dry-run", "-S", "sample.sampler.variance=fixedlarge"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: sample.sampler.variance must be one of posterior, beta; got 'fixedlarge'"]


def test_workspace_mode_writes_params_keeping_comments(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(committed_text("params.yaml"))
    overlay = _script().flatten(yaml.safe_load(PAPER.read_text()))
    _script().write_params(params, overlay)
    text = params.read_text()
    raw = params_file.read_yaml(params)
    for dotted, value in overlay.items():
        assert _at(raw, tuple(dotted.split("."))) == value, dotted
    assert raw["wandb"] == yaml.safe_load(committed_text("params.yaml"))["wandb"]  # the rest as it was
    # The comments stay (on their lines, as DVC's -S leaves them), lists stay lists, null stays null.
    assert text.startswith("# The study's experiment")
    assert re.search(r"\n  full_attn: \[false, true, false, false\] +# per level: softmax attention", text)
    assert "\n  dim_mults: [1, 2, 2, 2]\n" in text and re.search(r"\n  ema_power: null +#", text)


def test_workspace_dry_run_names_repro_and_save(tmp_path: Path) -> None:
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(b"x")
    before = (ROOT / "params.yaml").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_preset.py"), str(PAPER), "--workspace",
                           "--source", str(archive), "--name", "p", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["$ dvc repro", "$ dvc exp save --force -n p"]
    assert (ROOT / "params.yaml").stat().st_mtime_ns == before, "a dry run wrote params.yaml"


# The paper's recipe at CPU size: every mechanism it sets (the DDPM network with dropout, linear
# betas, epsilon MSE, warm-up, Adam's betas, EMA from step 1, ancestral sampling with sigma^2 = beta,
# FID against the train split) runs, only smaller; what `make paper-recipe` runs, through the same
# script in --workspace mode (params.yaml written, `dvc repro`, `dvc exp save`).
QUICK_PAPER = {
    "model.dim": 32, "model.num_res_blocks": 1,  # 4 levels and attention at 16x16, as the paper
    "train.steps": 6, "train.batch_size": 8, "train.warmup_steps": 4, "train.checkpoint_every": 3,
    "train.fid_every": 3, "train.fid_samples": 4, "train.fid_sampler.steps": 10, "train.fid_batch_size": 4,
    "sample.n": 8, "sample.sampler.steps": 10, "sample.batch_size": 8, "sample.grid_images": 4,
    "sample.strip_seeds": [0], "sample.strip_frames": 4,
    "fid.inception_weights": "data/inception/inception-random-seed0.pth", "fid.reference_count": 16,
    "fid.batch_size": 8,
}


@pytest.mark.slow
def test_paper_recipe_at_quick_size_runs_as_an_experiment(tmp_path: Path, tiny_cifar_archive: Any) -> None:
    import json

    from test_pipeline_e2e import toy_repo

    repo, run = toy_repo(tmp_path)
    run.commit("toy project")
    sets = [a for k, v in QUICK_PAPER.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    run([sys.executable, "scripts/run_preset.py", "configs/ddpm-paper.yaml", "--workspace", "--source",
         str(tiny_cifar_archive.path), "--name", "paper-quick", "-S", f"data.md5={tiny_cifar_archive.md5}",
         *sets])
    assert "paper-quick" in run.dvc("exp", "list", "--name-only").stdout.split()

    text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(text)
    assert params["train"]["adam_betas"] == [0.9, 0.999] and params["sample"]["sampler"]["variance"] == "beta"
    assert params["model"]["arch"] == "ddpm" and params["model"]["dropout"] == 0.1
    assert re.search(r"\n  steps: 6 +# optimizer steps\n", text), "params.yaml lost its comments"
    lr_rows = [line.split("\t") for line in (repo / "dvclive/plots/metrics/lr.tsv").read_text().splitlines()]
    warm_up = [0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4]
    assert [float(r[1]) for r in lr_rows[1:]] == pytest.approx(warm_up, rel=1e-12)
    train_metrics = json.loads((repo / "dvclive/metrics.json").read_text())
    assert train_metrics["step"] == 6 and train_metrics["parameters"] == count_parameters(
        build_model(params_file.parse_section("model", params["model"], config.ModelConfig)))
    report = json.loads((repo / "reports/fid.json").read_text())
    assert report["sampler"]["variance"] == "beta" and report["sampler"]["name"] == "ddpm"
    assert report["n_samples"] == 8 and report["comparable"] is False
    fid_rows = (repo / "dvclive/plots/metrics/fid.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[0] for row in fid_rows] == ["3", "6"]
    # The same command again finds everything done: nothing retrains, the experiment is saved again.
    again = run([sys.executable, "scripts/run_preset.py", "configs/ddpm-paper.yaml", "--workspace",
                 "--source", str(tiny_cifar_archive.path), "--name", "paper-quick", "-S",
                 f"data.md5={tiny_cifar_archive.md5}", *sets])
    assert "Running stage 'train'" not in again.stdout + again.stderr
