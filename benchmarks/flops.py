"""Floating-point operations per image of the study's U-Net and Ho et al.'s network, and their ratio.

Counted by ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs; convolutions, matmuls and
attention; normalisations and activations are not counted) on CPU, for one forward pass (a sampling
step) and one forward and backward pass (a training image). The ratio scales a throughput measured
for one network to an estimate for the other: docs/recipes.md's cost of `make paper-recipe` is such an
estimate, labelled as one.

    python benchmarks/flops.py
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from ddpm_cifar.models.networks import build_model
from ddpm_cifar.models.unet import count_parameters
from ddpm_cifar.runtime import config, params_file

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4


def per_image(net: torch.nn.Module, backward: bool) -> float:
    x = torch.randn(BATCH, 3, 32, 32)
    t = torch.randint(0, 1000, (BATCH,))
    with FlopCounterMode(display=False) as counter:
        if backward:
            net(x, t).pow(2).mean().backward()
        else:
            with torch.no_grad():
                net(x, t)
    return counter.get_total_flops() / BATCH


def study_model() -> dict:
    """The study's model section as committed (the workspace's params.yaml may hold an experiment)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:params.yaml"], capture_output=True,
                          text=True)
    text = proc.stdout if proc.returncode == 0 else (ROOT / "params.yaml").read_text()
    return yaml.safe_load(text)["model"]


def main() -> None:
    study = study_model()
    paper = {**study, **yaml.safe_load((ROOT / "configs" / "ddpm-paper.yaml").read_text())["model"]}
    rows = []
    for name, raw in (("study (params.yaml at HEAD)", study), ("paper (configs/ddpm-paper.yaml)", paper)):
        net = build_model(params_file.parse_section("model", raw, config.ModelConfig))
        rows.append((name, count_parameters(net), per_image(net, False), per_image(net, True)))
    print(f"{'network':34s} {'params':>11s} {'GFLOP fwd':>10s} {'GFLOP fwd+bwd':>14s}")
    for name, params, fwd, train in rows:
        print(f"{name:34s} {params:11,d} {fwd / 1e9:10.2f} {train / 1e9:14.2f}")
    (_, _, f0, t0), (_, _, f1, t1) = rows
    print(f"ratio paper / study: {f1 / f0:.2f} per sampling step, {t1 / t0:.2f} per training image")


if __name__ == "__main__":
    main()
