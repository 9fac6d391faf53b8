"""Stage sample: N images from the EMA weights with per-image seeds, a grid and the denoising strip.

Under torchrun (params distributed) each rank samples its share of the seeds; the images are the
same as with one process."""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ddpm_cifar import checkpoint
from ddpm_cifar.cli import launched_ranks, run
from ddpm_cifar.config import load_params, to_dict
from ddpm_cifar.distributed import process_group
from ddpm_cifar.fileio import atomic_path, file_digest
from ddpm_cifar.plots import save_denoising_strip, save_grid
from ddpm_cifar.sampling import denoising_frames, for_sampling, generate_images_sharded, sample_cache_key

PARAMS = ("sample", "distributed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", type=Path, default=Path("models/ema.pt"))
    ap.add_argument("--out", type=Path, default=Path("samples/samples.npz"))
    ap.add_argument("--partial", type=Path, default=Path("samples/partial"))
    ap.add_argument("--plots", type=Path, default=Path("plots"))
    args = ap.parse_args()
    params = load_params(args.params, PARAMS)
    cfg = params.section("sample")
    with process_group(*launched_ranks(params.section("distributed"), os.environ)) as device:
        model, diffusion, ckpt = checkpoint.load_model(args.checkpoint, device)
        mc = model.config
        net = for_sampling(model, device, compile=cfg.compile)
        common = dict(sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta, spacing=cfg.spacing,
                      shape=(mc.channels, mc.image_size, mc.image_size), device=device, clip_x0=cfg.clip_x0)
        seeds = [cfg.seed + i for i in range(cfg.n)]
        key = sample_cache_key(file_digest(args.checkpoint), cfg, device)
        images = generate_images_sharded(net, diffusion, seeds, batch_size=cfg.batch_size, amp=True,
                                         cache_dir=args.partial, cache_key=key, **common)
        if images is None:
            return  # not rank 0: its share is with rank 0, which writes everything
        with atomic_path(args.out) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, seeds=np.asarray(seeds), config=json.dumps(to_dict(cfg)),
                     checkpoint_step=int(ckpt["step"]))
        shutil.rmtree(args.partial, ignore_errors=True)  # the finished batches now live in --out
        save_grid(images[: cfg.grid_images], args.plots / "sample_grid.png")
        frames, timesteps = denoising_frames(net, diffusion, list(cfg.strip_seeds), frames=cfg.strip_frames,
                                             **common)
        save_denoising_strip(frames, timesteps, args.plots / "denoise_strip.png")
        print(f"{len(images)} samples ({cfg.sampler}, {cfg.steps} steps) -> {args.out}")


if __name__ == "__main__":
    run(main)
