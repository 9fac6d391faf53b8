"""Exercise the CUDA-only code paths on a GPU machine and print what they did.

The test suite runs on CPU only; this covers what it cannot: bf16 autocast and fp16 + GradScaler
training, channels_last, exact resume on CUDA, CUDA per-image generators, batch-shape invariance
of sampling on the GPU, and the demo engine on CUDA. It also times sampling of the study's U-Net
and how much of it goes to drawing per-image noise.

    PYTHONPATH=src python scripts/gpu_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from ddpm_cifar.app.engine import Demo, TorchWorker, load_demo_model
from ddpm_cifar.diffusion.generate import FixedBatch, generate_images
from ddpm_cifar.models import checkpoint
from ddpm_cifar.models.unet import UNet
from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig, SamplerConfig, TrainConfig
from ddpm_cifar.training.loop import TrainOutputs, train
from ddpm_cifar.training.tracking import Tracker

DEV = torch.device("cuda")
SMALL = ModelConfig(image_size=32, channels=3, dim=32, dim_mults=(1, 2, 2), num_res_blocks=1,
                    full_attn=(False, False, True), attn_heads=2, attn_dim_head=16, dropout=0.0, arch="unet")
PAPER = ModelConfig(image_size=32, channels=3, dim=64, dim_mults=(1, 2, 4, 8), num_res_blocks=2,
                    full_attn=(False, False, False, True), attn_heads=4, attn_dim_head=32, dropout=0.0,
                    arch="unet")
DIFF = DiffusionConfig(timesteps=1000, beta_schedule="sigmoid", objective="pred_v", min_snr_gamma=None)


def train_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=32, grad_accum=2, lr=1e-3, adam_betas=(0.9, 0.99),
                       max_grad_norm=1.0, ema_decay=0.9, ema_update_every=1, ema_start_step=2, amp=True,
                       seed=0, checkpoint_every=10, fid_every=0, fid_samples=8,
                       fid_sampler=SamplerConfig("ddpm", 5), fid_batch_size=8, sample_grid_every=0,
                       best_metric=None,
                       ema_inv_gamma=1.0, ema_power=None, warmup_steps=0)


class Crash(Tracker):
    def __init__(self, at: int):
        self.at = at

    def log(self, values: dict[str, float], step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def outputs(root: Path) -> TrainOutputs:
    root.mkdir(parents=True, exist_ok=True)
    return TrainOutputs(root / "checkpoint.pt", root / "ema.pt", root / "dvclive")


def max_diff(a: Path, b: Path) -> float:
    ea, eb = (torch.load(p, weights_only=True)["ema"] for p in (a, b))
    return max(float((ea[k].float() - eb[k].float()).abs().max()) for k in ea)


def check_training(root: Path, images: np.ndarray, label: str) -> Path:
    quiet = lambda _: None  # noqa: E731
    runs = {}
    for name in ("straight", "again"):
        t0 = time.perf_counter()
        res = train(SMALL, DIFF, train_cfg(20), images=images, data_id="random", outputs=outputs(root / name),
                    device=DEV, log=quiet)
        runs[name] = res
        print(f"[{label}] {name}: precision {res.precision}, final loss {res.final_loss:.4f}, "
              f"{res.images_per_second:.0f} img/s, {time.perf_counter() - t0:.1f} s")
    try:
        train(SMALL, DIFF, train_cfg(20), images=images, data_id="random", outputs=outputs(root / "resumed"),
              device=DEV, tracker=Crash(15), log=quiet)
    except KeyboardInterrupt:
        pass
    res = train(SMALL, DIFF, train_cfg(20), images=images, data_id="random",
                outputs=outputs(root / "resumed"), device=DEV, log=quiet)
    print(f"[{label}] resumed from step {res.resumed_from}; EMA max |diff| vs straight run: "
          f"{max_diff(root / 'resumed/ema.pt', root / 'straight/ema.pt'):.3g} "
          f"(two straight runs differ by {max_diff(root / 'again/ema.pt', root / 'straight/ema.pt'):.3g})")
    return root / "straight/ema.pt"


def check_sampling(ema: Path) -> None:
    loaded = checkpoint.load_model(ema, DEV)
    model, diffusion = loaded.net, loaded.diffusion
    spec, common = SamplerConfig("ddpm", 20), dict(shape=(3, 32, 32), device=DEV, progress=False)
    many = generate_images(model, diffusion, list(range(100, 116)), spec, batch_size=16, **common)
    alone = generate_images(model, diffusion, [105], spec, batch_size=16, **common)
    other = generate_images(model, diffusion, list(range(100, 116)), spec, batch_size=4, **common)
    print(f"[sampling] image 5 alone vs among 16 (same batch shape): "
          f"{int((alone[0] != many[5]).sum())} differing values of {alone[0].size}")
    d = np.abs(other.astype(int) - many)
    print(f"[sampling] batch 4 vs batch 16: {int((d > 0).sum())} differing values of {d.size}, max {d.max()}")
    again = generate_images(model, diffusion, list(range(100, 116)), spec, batch_size=16, **common)
    print(f"[sampling] same call twice identical: {np.array_equal(again, many)}")


def check_demo(root: Path) -> None:
    worker = TorchWorker()
    dm = worker.call(load_demo_model, root / "straight/ema.pt", DEV)
    demo = Demo([dm], device=DEV, micro_batch=64)

    def run(n: int, seed: int) -> np.ndarray:
        return next(iter(worker.call(lambda: demo.images(demo.check(n, "ddpm", 50, seed)))))

    many = run(64, 7)
    print(f"[demo] image 0 alone == image 0 of 64: {np.array_equal(run(1, 7)[0], many[0])}; "
          f"image 30 alone == image 30 of 64: {np.array_equal(run(1, 37)[0], many[30])}")
    for n in (4, 64):
        t0 = time.perf_counter()
        run(n, 0)
        torch.cuda.synchronize()
        print(f"[demo] {n} images x 50 steps (small model, micro-batch 64): {time.perf_counter() - t0:.2f} s")


def time_paper_sampling(root: Path) -> None:
    torch.manual_seed(0)
    net = UNet(PAPER).to(DEV).eval().requires_grad_(False)
    path = root / "paper.pt"
    checkpoint.save(path, {**checkpoint.model_payload(PAPER, DIFF), "step": 0, "ema": net.state_dict()})
    loaded = checkpoint.load_model(path, DEV)
    model, diffusion = loaded.net, loaded.diffusion
    n, steps = 256, 20
    common = dict(batch_size=n, shape=(3, 32, 32), device=DEV, progress=False)
    generate_images(model, diffusion, list(range(n)), SamplerConfig("ddpm", 2), **common)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate_images(model, diffusion, list(range(n)), SamplerConfig("ddpm", steps), **common)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    x = torch.randn(n, 3, 32, 32, device=DEV)
    t = torch.full((n,), 500, device=DEV)
    net_call = FixedBatch(model, n)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        net_call(x, t)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            net_call(x, t)
        torch.cuda.synchronize()
    network = time.perf_counter() - t0
    per_img = total / (n * steps)
    print(f"[paper U-Net] {n} images x {steps} DDPM steps: {total:.2f} s; the network alone {network:.2f} s "
          f"({100 * network / total:.0f}%); estimate for sample.n=10000 x 1000 steps: "
          f"{per_img * 10000 * 1000 / 60:.0f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · "
          f"bf16 {torch.cuda.is_bf16_supported()}")
    images = np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    ema = check_training(args.out / "bf16", images, "train bf16")
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        check_training(args.out / "fp16", images, "train fp16")
    check_sampling(ema)
    check_demo(args.out / "bf16")
    time_paper_sampling(args.out)


if __name__ == "__main__":
    main()
