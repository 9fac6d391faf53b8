"""The pretrained stage: a diffusers-layout DDPM folder sampled and scored like our model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DModel
from factories import one_thread, random_images, save_tiny_checkpoint
from PIL import Image

from ddpm_cifar.app.engine import Demo, load_demo_model
from ddpm_cifar.evaluation.fid import compute_statistics, save_reference
from ddpm_cifar.evaluation.inception import load_inception, save_random_inception
from ddpm_cifar.evaluation.plots import save_fid_comparison
from ddpm_cifar.evaluation.reports import PRETRAINED, reference_meta
from ddpm_cifar.models.networks import PUBLISHED, load_pretrained
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.fileio import file_digest

ROOT = Path(__file__).resolve().parents[1]
# A small model with the published network's structure (attention at the second level, DDPM's
# embedding and padding conventions), in the layout of google/ddpm-cifar10-32.
TINY_DIFFUSERS = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                      block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                      downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                      norm_num_groups=32, mid_block_scale_factor=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    UNet2DModel(**TINY_DIFFUSERS).save_pretrained(root / "ddpm-tiny")  # safetensors
    save_random_inception(root / "inception.pth", seed=0)
    with one_thread():
        net, info = load_inception(root / "inception.pth")
        stats = compute_statistics(random_images(8, 32), net, batch_size=8, device="cpu", progress=False)
    meta = reference_meta("cifar10-train", stats.n, {"official": False, "source": "random pixels"}, info)
    save_reference(root / "ref.npz", stats, meta)
    return root


def _run(root: Path, *, enabled: bool, folder: str) -> subprocess.CompletedProcess[str]:
    params = {
        "pretrained": {"enabled": enabled, "folder": folder},
        "sample": {"n": 6, "sampler": {"name": "ddim", "steps": 3, "spacing": "uniform", "eta": 0.0,
                                       "variance": "posterior", "clip_x0": True},
                   "weights": "final",
                   "compile": False, "batch_size": 4, "seed": 0, "grid_images": 4, "strip_seeds": [0],
                   "strip_frames": 3},
        "fid": {"inception_weights": str(root / "inception.pth"), "reference": "train", "reference_count": 0,
                "reference_features": 100,
                "batch_size": 6, "exact_inception": False},
        "distributed": {"nnodes": 1, "nproc_per_node": 1, "rdzv_endpoint": "localhost:0"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    stage = str(ROOT / "stages" / "pretrained.py")
    return subprocess.run([sys.executable, stage, "--ref", str(root / "ref.npz"),
                           "--out", str(root / "out.json"), "--report", str(root / "report.json"),
                           "--partial", str(root / "partial")],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_loads_as_a_model_of_this_project(workspace: Path) -> None:
    loaded, weights = load_pretrained(workspace / "ddpm-tiny")
    assert weights.name == "diffusion_pytorch_model.safetensors"
    net, cfg = loaded.net, loaded.config
    assert loaded.step == PUBLISHED and loaded.diffusion.num_timesteps == 1000
    assert cfg.arch == "ddpm" and cfg.dim_mults == (1, 2) and cfg.full_attn == (False, True)
    reference = UNet2DModel.from_pretrained(workspace / "ddpm-tiny").eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 999])
    with torch.no_grad():
        assert (net(x, t) - reference(x, t).sample).abs().max() < 1e-5


@pytest.mark.slow
def test_the_stage_scores_the_folder_like_our_model(workspace: Path) -> None:
    proc = _run(workspace, enabled=True, folder=str(workspace / "ddpm-tiny"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((workspace / "report.json").read_text())
    assert report["name"] == PRETRAINED
    assert report["enabled"] is True and math.isfinite(report["fid"]) and report["fid"] > 0
    # The metrics file holds the numbers only: what `dvc metrics show` lists.
    assert json.loads((workspace / "out.json").read_text()) == {
        "enabled": True, "fid": report["fid"], "n_samples": 6, "reference_n": 8, "comparable": False}
    assert report["n_samples"] == 6
    assert report["sampler"]["name"] == "ddim" and report["sampler"]["steps"] == 3
    assert report["comparable"] is False
    assert any("Inception" in r for r in report["not_comparable_because"])
    assert not (workspace / "partial").exists()
    weights = workspace / "ddpm-tiny" / "diffusion_pytorch_model.safetensors"
    assert report["weights_sha256"] == file_digest(weights)
    # ... and the plot draws it beside the quoted baselines and our model.
    ours = {**report, "fid": 50.0}
    baselines = [{"name": "BigGAN", "fid": 14.73, "samples": "unknown"}]
    save_fid_comparison(ours, baselines, workspace / "cmp.png", measured=[report])
    with Image.open(workspace / "cmp.png") as im:
        assert im.format == "PNG" and im.height > 200


def test_missing_weights_name_the_folder(workspace: Path) -> None:
    proc = _run(workspace, enabled=True, folder="models/ddpm-cifar10-32")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: models/ddpm-cifar10-32: no such folder"), lines
    assert "huggingface" in lines[0]


def test_disabled_writes_a_placeholder_and_samples_nothing(workspace: Path) -> None:
    proc = _run(workspace, enabled=False, folder="nowhere")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((workspace / "out.json").read_text()) == {"enabled": False}
    assert json.loads((workspace / "report.json").read_text()) == {"name": PRETRAINED, "enabled": False}


def test_the_app_takes_the_folder_as_the_comparison_side(workspace: Path, tmp_path: Path) -> None:
    ours = load_demo_model(save_tiny_checkpoint(tmp_path / "ema.pt", model=dict(image_size=32)), "cpu")
    published = load_demo_model(workspace / "ddpm-tiny", "cpu")
    assert "published DDPM weights" in published.label and published.shape == (3, 32, 32)
    demo = Demo([ours, published], device="cpu", micro_batch=2)
    with one_thread():
        images = demo.images(demo.check(2, "ddim", 2, 0, "uniform", 0.0))
    assert [im.shape for im in images] == [(2, 32, 32, 3)] * 2
    assert not np.array_equal(images[0], images[1])  # two different networks
    with pytest.raises(UserError, match="no such folder"):
        load_demo_model(tmp_path / "missing-folder-but-a-dir-name", "cpu")
