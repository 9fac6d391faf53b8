"""Stage sample: N images from the EMA weights (sample.weights: the final ones, or the best of training)
with per-image seeds, a grid and the denoising strip.

Under torchrun (params distributed) each rank samples its share of the seeds; the images are the
same as with one process."""

import argparse
import shutil
import time
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
        seeds, digest = [cfg.seed + i for i in range(cfg.n)], file_digest(weights)
        key = generate.sample_cache_key(digest, cfg, device)
        resumed, start = _resumed(args.partial, key), time.perf_counter()
        images = generate.generate_images_sharded(net, diffusion, seeds, cfg.sampler, cache_dir=args.partial,
                                                  batch_size=cfg.batch_size, cache_key=key, **where)
        if images is None:
            return  # not rank 0: its share is with rank 0, which writes everything
        # For the frontier stage, which reuses these images: the weights they came from, and the time per
        # image when this run sampled them all (a resumed one timed only the rest).
        seconds = None if resumed else (time.perf_counter() - start) / cfg.n
        config = {**to_dict(cfg), "weights_sha256": digest, "seconds_per_image": seconds}
        generate.save_samples(args.out, images, seeds=seeds, config=config, checkpoint_step=model.step)
        shutil.rmtree(args.partial, ignore_errors=True)  # the finished batches now live in --out
        save_grid(images[: cfg.grid_images], args.plots / "sample_grid.png")
        frames, timesteps = generate.denoising_frames(net, diffusion, list(cfg.strip_seeds), cfg.sampler,
                                                      frames=cfg.strip_frames, **where)
        save_denoising_strip(frames, timesteps, args.plots / "denoise_strip.png")
        print(f"{len(images)} samples ({cfg.sampler.name}, {cfg.sampler.steps} steps, {cfg.weights} weights "
              f"of step {model.step}) -> {args.out}")


def _resumed(partial: Path, key: str) -> bool:
    """Whether a killed run left batches of these samples (one folder per rank under torchrun)."""
    return any(k.read_text() == key and any(k.parent.glob("*.npy")) for k in partial.rglob("key.txt"))


if __name__ == "__main__":
    main()
