"""Sharded sampling and Inception on CUDA against one process, with the one GPU a lent machine has.

World sizes 1 and 2 run in fresh processes (gloo; both ranks share GPU 0) on the study's U-Net
(random weights, bf16, batch 500) and on random-weight Inception (batch 200); the script prints
how many values differ between them.

    PYTHONPATH=src python scripts/gpu_shard_check.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm_cifar.diffusion.generate import generate_images_sharded
from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.evaluation.fid import statistics_sharded
from ddpm_cifar.evaluation.inception import load_inception, save_random_inception
from ddpm_cifar.models.unet import UNet
from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig, SamplerConfig

PAPER = ModelConfig(image_size=32, channels=3, dim=64, dim_mults=(1, 2, 4, 8), num_res_blocks=2,
                    full_attn=(False, False, False, True), attn_heads=4, attn_dim_head=32, dropout=0.0,
                    arch="unet")
DIFF = DiffusionConfig(timesteps=1000, beta_schedule="sigmoid", objective="pred_v", min_snr_gamma=None)


def worker(rank: int, world: int, root: str) -> None:
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"file://{root}/init{world}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = UNet(PAPER).to(dev).eval()
    with torch.no_grad():  # random weights, nudged so that the outputs are not trivially small
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    images = generate_images_sharded(net, GaussianDiffusion(DIFF).to(dev), list(range(1000)),
                                     SamplerConfig("ddim", 3), batch_size=500, shape=(3, 32, 32), device=dev,
                                     progress=False)
    inception, _ = load_inception(Path(root) / "inception.pth", dev)
    pictures = np.random.default_rng(0).integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)
    stats = statistics_sharded(pictures, inception, batch_size=200, device=dev, progress=False)
    if rank == 0:
        np.savez(Path(root) / f"world{world}.npz", images=images, mu=stats.mu, sigma=stats.sigma)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    root = tempfile.mkdtemp()
    save_random_inception(Path(root) / "inception.pth", seed=0)
    for world in (1, 2):
        mp.spawn(worker, args=(world, root), nprocs=world, join=True)
    one, two = np.load(Path(root) / "world1.npz"), np.load(Path(root) / "world2.npz")
    print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    print(f"images, world 2 vs 1: {int((one['images'] != two['images']).sum())} of {one['images'].size} "
          "uint8 values differ")
    for key in ("mu", "sigma"):
        print(f"FID {key}, world 2 vs 1: {int((one[key] != two[key]).sum())} of {one[key].size} differ, "
              f"max {np.abs(one[key] - two[key]).max():.3g}")


if __name__ == "__main__":
    main()
