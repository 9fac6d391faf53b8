"""Training images/s of the study's configuration through the real training loop, AMP on and off.

Runs ``ddpm_cifar.training.loop.train`` (EMA, gradient accumulation, clipping, checkpoints, everything the
train stage does but the training-time FID) for a few hundred steps on random images, once with
``amp: true`` (bf16 autocast, or fp16 with loss scaling where bf16 is unsupported) and once with
``amp: false`` (float32), in the same process, and prints both rates and their ratio.

    python benchmarks/train_amp.py --device cuda --steps 300
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig, SamplerConfig, TrainConfig
from ddpm_cifar.training.loop import TrainOutputs, train

MODEL = ModelConfig(image_size=32, channels=3, dim=64, dim_mults=(1, 2, 4, 8), num_res_blocks=2,
                    full_attn=(False, False, False, True), attn_heads=4, attn_dim_head=32, dropout=0.0,
                    arch="unet")
DIFFUSION = DiffusionConfig(timesteps=1000, beta_schedule="sigmoid", objective="pred_v",
                            min_snr_gamma=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16, help="images per micro-step (the study: 16)")
    ap.add_argument("--accum", type=int, default=2, help="micro-steps per step (the study: 2)")
    ap.add_argument("--fp32-first", action="store_true",
                    help="run amp off first (the first run also pays CUDA's warm-up; run both orders)")
    args = ap.parse_args()
    device = torch.device(args.device)
    images = np.random.default_rng(0).integers(0, 256, (5000, 32, 32, 3), dtype=np.uint8)
    rates = {}
    for amp in ((False, True) if args.fp32_first else (True, False)):
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, grad_accum=args.accum, lr=8e-5,
                          adam_betas=(0.9, 0.99), max_grad_norm=1.0, ema_decay=0.995, ema_update_every=10,
                          ema_start_step=100, ema_inv_gamma=1.0, ema_power=2 / 3, amp=amp, seed=0,
                          checkpoint_every=args.steps, fid_every=0,
                          fid_samples=0, fid_sampler=SamplerConfig("ddpm", 1), fid_batch_size=1,
                          sample_grid_every=0, warmup_steps=0, best_metric=None)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            outputs = TrainOutputs(root / "checkpoint.pt", root / "ema.pt", root / "dvclive")
            result = train(MODEL, DIFFUSION, cfg, images=images, data_id="random", outputs=outputs,
                           device=device, log=lambda _: None)
        rates[amp] = result.images_per_second
        print(f"amp {str(amp).lower():5s} ({result.precision}): {result.images_per_second:8.1f} images/s "
              f"over {args.steps} steps of {args.batch} x {args.accum}, final loss {result.final_loss:.4f}",
              flush=True)
    print(f"ratio amp on / off: {rates[True] / rates[False]:.2f}")


if __name__ == "__main__":
    main()
