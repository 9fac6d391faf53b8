"""Sampling images/s: our DDPM-1000, DDIM-50 and DPM-Solver++(2M)-20 against lucidrains' DDPM-1000
and DDIM-50, with the same network size and batch, in one process.

Ours runs as the sample stage runs it: ``generate_images`` under inference mode with per-image
seeds, on CUDA in channels_last with bf16 autocast (and torch.compile with ``--compile``). Theirs
runs as its Trainer samples: ``GaussianDiffusion.sample`` (inference mode, float32). Both networks
have random weights from the same seed; speed does not depend on them.

    python benchmarks/sampling_speed.py                               # CPU: small U-Net, batch 16
    python benchmarks/sampling_speed.py --device cuda --paper --batch 256 --compile

Needs the ``denoising-diffusion-pytorch`` package (lucidrains) next to ``ddpm_cifar``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Callable

import torch
from denoising_diffusion_pytorch import GaussianDiffusion as TheirDiffusion
from denoising_diffusion_pytorch import Unet as TheirUnet

from ddpm_cifar.diffusion.generate import for_sampling, generate_images
from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.models.unet import UNet, count_parameters
from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig, SamplerConfig

DIFFUSION_CFG = DiffusionConfig(timesteps=1000, beta_schedule="sigmoid", objective="pred_v",
                                min_snr_gamma=None)  # lucidrains' defaults, as in the study


def model_config(paper: bool) -> ModelConfig:
    dim, mults = (64, (1, 2, 4, 8)) if paper else (16, (1, 2, 4))
    # lucidrains' defaults: full attention at the innermost level, 4 heads of 32.
    return ModelConfig(image_size=32, channels=3, dim=dim, dim_mults=mults, num_res_blocks=2,
                       full_attn=tuple(i == len(mults) - 1 for i in range(len(mults))), attn_heads=4,
                       attn_dim_head=32, dropout=0.0, arch="unet")


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # their tqdm bars
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--paper", action="store_true", help="the study's U-Net (dim 64, mults 1,2,4,8)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our network (CUDA only)")
    ap.add_argument("--no-theirs", action="store_true", help="time ours only")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = model_config(args.paper)

    torch.manual_seed(0)
    ours_net = UNet(cfg).to(device).eval().requires_grad_(False)
    ours_diff = GaussianDiffusion(DIFFUSION_CFG).to(device)
    net = for_sampling(ours_net, device, compile=args.compile)
    torch.manual_seed(0)
    their_unet = TheirUnet(dim=cfg.dim, dim_mults=cfg.dim_mults)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {device} ({where}), batch {args.batch}; "
          f"U-Net dim {cfg.dim} mults {cfg.dim_mults}: ours "
          f"{count_parameters(ours_net):,} parameters, theirs {count_parameters(their_unet):,}")
    theirs = {steps: TheirDiffusion(their_unet, image_size=32, timesteps=1000,
                                    sampling_timesteps=steps).to(device) for steps in (1000, 50)}

    seeds = list(range(args.batch))

    def ours(sampler: str, steps: int) -> Callable[[], object]:
        spec = SamplerConfig(sampler, steps, "quadratic")  # bf16 autocast on CUDA, as the sample stage
        return lambda: generate_images(net, ours_diff, seeds, spec, batch_size=args.batch, shape=(3, 32, 32),
                                       device=device, progress=False)

    runs = {
        "ours DDPM, 1000 steps": ours("ddpm", 1000),
        "ours DDIM, 50 steps": ours("ddim", 50),
        "ours DPM-Solver++(2M), 20 steps": ours("dpmpp_2m", 20),
    }
    if not args.no_theirs:
        runs["lucidrains DDPM, 1000 steps"] = lambda: theirs[1000].sample(batch_size=args.batch)
        runs["lucidrains DDIM, 50 steps"] = lambda: theirs[50].sample(batch_size=args.batch)
    # Warm-up: kernels, autotuning and compilation, on a short chain of each kind.
    warm = timed(lambda: [ours(s, 3)() for s in ("ddpm", "ddim", "dpmpp_2m")], device)
    theirs_short = TheirDiffusion(their_unet, image_size=32, timesteps=1000, sampling_timesteps=3).to(device)
    if not args.no_theirs:
        warm += timed(lambda: theirs_short.sample(batch_size=args.batch), device)
    print(f"warm-up {warm:.1f} s")
    rates = {}
    for name, fn in runs.items():
        seconds = timed(fn, device)
        rates[name] = args.batch / seconds
        print(f"{name:34s} {seconds:8.2f} s   {rates[name]:10.2f} images/s", flush=True)
    ddpm, dpm = rates["ours DDPM, 1000 steps"], rates["ours DPM-Solver++(2M), 20 steps"]
    if not args.no_theirs:
        print(f"ratio ours DDPM-1000 / lucidrains DDPM-1000: "
              f"{ddpm / rates['lucidrains DDPM, 1000 steps']:.2f}")
        print(f"ratio ours DDIM-50 / lucidrains DDIM-50:     "
              f"{rates['ours DDIM, 50 steps'] / rates['lucidrains DDIM, 50 steps']:.2f}")
    print(f"ratio ours DPM-Solver++-20 / ours DDPM-1000: {dpm / ddpm:.1f}")


if __name__ == "__main__":
    main()
