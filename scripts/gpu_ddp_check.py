"""Data-parallel code paths on CUDA, with the one GPU a lent machine has.

NCCL refuses two ranks on one GPU, so the two ranks here share GPU 0 over gloo: this exercises
DDP around a CUDA model (bf16 autocast, channels_last, per-rank CUDA RNG states in checkpoints,
the EMA agreement check, sharded sampling) but not NCCL itself. It also checks that torchrun with
more processes than GPUs stops with the one-line error.

    PYTHONPATH=src python scripts/gpu_ddp_check.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm_cifar.diffusion.generate import generate_images, generate_images_sharded
from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.models.unet import UNet
from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig, SamplerConfig, TrainConfig
from ddpm_cifar.runtime.loaders import load_live_metric
from ddpm_cifar.training.loop import TrainOutputs, train

DEV = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # cpu: a smoke run
SMALL = ModelConfig(image_size=32, channels=3, dim=32, dim_mults=(1, 2, 2), num_res_blocks=1,
                    full_attn=(False, False, True), attn_heads=2, attn_dim_head=16, dropout=0.1, arch="unet")
DIFF = DiffusionConfig(timesteps=1000, beta_schedule="sigmoid", objective="pred_v", min_snr_gamma=None)
IMAGES = np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
SEEDS = list(range(37))
SPEC = SamplerConfig("dpmpp_2m", 10)  # bf16 autocast on CUDA
SAMPLE = dict(batch_size=8, shape=(3, 32, 32), device=DEV, progress=False)


def cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=32, grad_accum=2, lr=2e-4, adam_betas=(0.9, 0.99),
                       max_grad_norm=1.0, ema_decay=0.9, ema_update_every=1, ema_start_step=2, amp=True,
                       seed=0, checkpoint_every=10, fid_every=0, fid_samples=8,
                       fid_sampler=SamplerConfig("ddpm", 5), fid_batch_size=8, sample_grid_every=0,
                       best_metric=None,
                       ema_inv_gamma=1.0, ema_power=None, warmup_steps=0)


def outputs(root: Path) -> TrainOutputs:
    root.mkdir(parents=True, exist_ok=True)
    return TrainOutputs(root / "checkpoint.pt", root / "ema.pt", root / "dvclive")


def run(root: Path, steps: int) -> float:
    t0 = time.perf_counter()
    res = train(SMALL, DIFF, cfg(steps), images=IMAGES, data_id="random", outputs=outputs(root), device=DEV,
                log=lambda _: None)
    assert res.precision == ("bf16" if DEV.type == "cuda" else "fp32"), res.precision
    return time.perf_counter() - t0


def worker(rank: int, root: str) -> None:
    if DEV.type == "cuda":
        torch.cuda.set_device(DEV)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=2)
    base = Path(root)
    run(base / "ddp", 20)
    run(base / "ddp-resumed", 10)
    run(base / "ddp-resumed", 20)
    torch.manual_seed(0)
    net = UNet(SMALL).to(DEV).eval()
    images = generate_images_sharded(net, GaussianDiffusion(DIFF).to(DEV), SEEDS, SPEC, **SAMPLE)
    if rank == 0:
        np.save(base / "sharded.npy", images)
    dist.barrier()
    dist.destroy_process_group()


def weights(root: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(root / "checkpoint.pt", weights_only=True)
    return {f"{p}.{k}": v.float() for p in ("model", "ema") for k, v in ckpt[p].items()}


def losses(root: Path) -> np.ndarray:
    return np.array([value for _, value in load_live_metric(root / "dvclive", "loss")])


def main() -> None:
    root = Path(tempfile.mkdtemp())
    print(torch.__version__, torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu")
    print(f"world 1: 20 steps in {run(root / 'single', 20):.1f} s")
    t0 = time.perf_counter()
    mp.spawn(worker, args=(str(root),), nprocs=2, join=True)
    print(f"world 2 (gloo, both ranks on {DEV}): 20 steps, 10 + resumed 10, sampling: "
          f"{time.perf_counter() - t0:.1f} s")
    ddp, resumed = weights(root / "ddp"), weights(root / "ddp-resumed")
    print("DDP resume, max weight difference:", max((ddp[k] - resumed[k]).abs().max().item() for k in ddp))
    same_log = losses(root / "ddp").tolist() == losses(root / "ddp-resumed").tolist()
    print("DDP resume, loss logs identical:", same_log)
    rel = np.abs(losses(root / "ddp") - losses(root / "single")) / losses(root / "single")
    precision = "bf16" if DEV.type == "cuda" else "fp32"
    print(f"world 2 vs 1 (dropout 0.1, {precision}): loss max relative difference {rel.max():.2e}, "
          f"first step {rel[0]:.2e}")
    ckpt = torch.load(root / "ddp/checkpoint.pt", weights_only=True)
    print("checkpoint RNG states per rank:", len(ckpt["rng"]["torch"]), len(ckpt["rng"].get("cuda", [])))
    torch.manual_seed(0)
    net = UNet(SMALL).to(DEV).eval()
    one = generate_images(net, GaussianDiffusion(DIFF).to(DEV), SEEDS, SPEC, **SAMPLE)
    sharded = np.load(root / "sharded.npy")
    print("sharded sampling on CUDA equals one process:", np.array_equal(one, sharded),
          f"({int((one != sharded).sum())} of {one.size} values differ)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "stages/sample.py",
                           "--params", str(write_params(root))], env=env, capture_output=True, text=True)
    print("torchrun 2 processes on 1 GPU: rc", proc.returncode, "|",
          [line for line in proc.stderr.splitlines() if line.startswith("error:")])


def write_params(root: Path) -> Path:
    path = root / "params.yaml"
    path.write_text("sample: {n: 4, sampler: {name: ddim, steps: 2, spacing: uniform, eta: 0.0, "
                    "variance: posterior, "
                    "clip_x0: true}, compile: false, "
                    "batch_size: 2, seed: 0, grid_images: 4, strip_seeds: [0], weights: final, "
                    "strip_frames: 2}\n"
                    "distributed: {nnodes: 1, nproc_per_node: 2, rdzv_endpoint: 'localhost:0'}\n")
    return path


if __name__ == "__main__":
    main()
