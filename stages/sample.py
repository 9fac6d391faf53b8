"""Stage sample: N images from the EMA weights (sample.weights: the final ones, or the best of training)
with per-image seeds, a grid and the denoising strip.

Under torchrun (params distributed) each rank samples its share of the seeds; the images are the
same as with one process."""

import argparse
import shutil
from pathlib import Path

from ddpm_cifar.diffusion import generate
from ddpm_cifar.evaluation.plots import save_denoising_strip, save_grid
from ddpm_cifar.models import checkpoint
from ddpm_cifar.runtime.config import to_dict
from ddpm_cifar.runtime.fileio import file_digest
from ddpm_cifar.runtime.stage import stage

PARAMS = ("sample", "distributed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", type=Path, default=Path("models/ema.pt"), help="the final EMA weights")
    ap.add_argument("--best", type=Path, default=Path("models/ema_best.pt"), help="the best EMA weights")
    ap.add_argument("--out", type=Path, default=Path("samples/samples.npz"))
    ap.add_argument("--partial", type=Path, default=Path("samples/partial"))
    ap.add_argument("--plots", type=Path, default=Path("plots"))
    args = ap.parse_args()
    with stage("sample", args.params, PARAMS, [args.out.parent, args.plots, args.partial]) as run:
        cfg, device = run.params.section("sample"), run.device
        weights = args.best if cfg.weights == "best" else args.checkpoint
        model = checkpoint.load_model(weights, device)
        net, diffusion = generate.for_sampling(model.net, device, compile=cfg.compile), model.diffusion
        where = dict(shape=model.shape, device=device)
        seeds = [cfg.seed + i for i in range(cfg.n)]
        key = generate.sample_cache_key(file_digest(weights), cfg, device)
        images = generate.generate_images_sharded(net, diffusion, seeds, cfg.sampler, cache_dir=args.partial,
                                                  batch_size=cfg.batch_size, cache_key=key, **where)
        if images is None:
            return  # not rank 0: its share is with rank 0, which writes everything
        generate.save_samples(args.out, images, seeds=seeds, config=to_dict(cfg), checkpoint_step=model.step)
        shutil.rmtree(args.partial, ignore_errors=True)  # the finished batches now live in --out
        save_grid(images[: cfg.grid_images], args.plots / "sample_grid.png")
        frames, timesteps = generate.denoising_frames(net, diffusion, list(cfg.strip_seeds), cfg.sampler,
                                                      frames=cfg.strip_frames, **where)
        save_denoising_strip(frames, timesteps, args.plots / "denoise_strip.png")
        print(f"{len(images)} samples ({cfg.sampler.name}, {cfg.sampler.steps} steps, {cfg.weights} weights "
              f"of step {model.step}) -> {args.out}")


if __name__ == "__main__":
    main()
