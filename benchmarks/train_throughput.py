"""Training throughput (images/s) of our U-Net + diffusion loss against lucidrains' reference.

Both sides run the paper configuration (dim 64, dim_mults (1, 2, 4, 8), full attention at the
innermost level only, T = 1000, sigmoid schedule, pred_v) at the same batch size, in the same
process, on the same random images, built from the same seed. One "step" is what a training step
does: forward, backward, gradient clipping to norm 1.0, an Adam step and zero_grad. Timed repeats
alternate between the two implementations so that a load change on a shared machine (another job,
thermal throttling) hits both sides instead of biasing one of them.

    python benchmarks/train_throughput.py                  # batch 32; CPU: 1 warm-up + 3 x 2 timed steps
    python benchmarks/train_throughput.py --device cuda --batch 128 --steps 50

Needs the ``denoising-diffusion-pytorch`` package (lucidrains) next to ``ddpm_cifar``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from denoising_diffusion_pytorch import GaussianDiffusion as TheirDiffusion
from denoising_diffusion_pytorch import Unet as TheirUnet

from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.models.unet import UNet, count_parameters
from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig
from ddpm_cifar.runtime.memory import retain_freed_memory
from ddpm_cifar.training.state import precision_for

# The study's settings (Adam as in training/loop.py / params.yaml; the reference Trainer's betas).
LR = 8e-5
ADAM_BETAS = (0.9, 0.99)
MAX_GRAD_NORM = 1.0
# A few distinct batches, cycled, so the timed loop never pays for data generation and both
# sides see identical inputs.
N_BATCHES = 4
CPU_DEFAULTS = {"warmup": 1, "steps": 1, "repeats": 6}
CUDA_DEFAULTS = {"warmup": 10, "steps": 30, "repeats": 5}

MODEL_CFG = ModelConfig(
    image_size=32, channels=3, dim=64, dim_mults=(1, 2, 4, 8), num_res_blocks=2,
    full_attn=(False, False, False, True), attn_heads=4, attn_dim_head=32, dropout=0.0, arch="unet")
DIFFUSION_CFG = DiffusionConfig(timesteps=1000, beta_schedule="sigmoid", objective="pred_v",
                                min_snr_gamma=None)


@dataclass
class Contender:
    name: str
    params: int
    step: Callable[[torch.Tensor], float]  # one training step on a batch in [0, 1]; returns the loss
    rates: list[float]  # images/s (wall clock), one per timed repeat
    cpu_rates: list[float]  # images per CPU-second of this process, one per timed repeat
    last_loss: float = float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="images per step (the study: 16 x 2 accum)")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default: CPU 1, CUDA 30)")
    p.add_argument("--warmup", type=int,
                   help="untimed steps per implementation before timing (default: CPU 1, CUDA 10)")
    p.add_argument("--repeats", type=int, help="timed repeats per implementation (default: CPU 6, CUDA 5)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our model (theirs stays eager, as their Trainer runs it)")
    p.add_argument("--retain-freed-memory", action="store_true",
                   help="keep freed pages in the process, as every stage does (runtime/memory.py); "
                        "both sides share the process, so both get it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                               else args.device)
    # A batch of 32 takes several seconds per step on a 2-core CPU, so the CPU defaults keep the
    # whole run (2 x (warmup + steps x repeats) steps) to a few minutes, spent on many short
    # A/B pairs rather than a few long ones: on a shared machine a burst of load then spoils
    # single pairs, which the median drops. On a GPU steps are cheap.
    defaults = CUDA_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def make_ours(device: torch.device, precision: str, seed: int, compile_model: bool) -> Contender:
    torch.manual_seed(seed)
    model = UNet(MODEL_CFG).to(device)
    params = count_parameters(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # as training/loop.py does on CUDA
    net: torch.nn.Module = torch.compile(model) if compile_model else model  # type: ignore[assignment]
    diffusion = GaussianDiffusion(DIFFUSION_CFG)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=ADAM_BETAS)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    # t and noise come from a generator of our own, drawn inside the step like training/loop.py does, so
    # their cost is part of the step on both sides (theirs draws them inside forward()).
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    model.train()

    def step(img01: torch.Tensor) -> float:
        x0 = img01 * 2 - 1  # training/batches.py's BatchSource hands the loss [-1, 1] images
        if device.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        with autocast(device, precision):
            loss = diffusion.loss(net, x0, t, noise)
        return optimizer_step(loss, model, opt, scaler)

    name = "ours (ddpm_cifar, compiled)" if compile_model else "ours (ddpm_cifar)"
    return Contender(name, params, step, [], [])


def make_theirs(device: torch.device, precision: str, seed: int) -> Contender:
    torch.manual_seed(seed)
    # Their defaults: full_attn only at the innermost level, flash_attn=False, pred_v, sigmoid.
    unet = TheirUnet(dim=64, dim_mults=(1, 2, 4, 8))
    # Contiguous (NCHW) even on CUDA: their Trainer never converts to channels_last.
    diffusion = TheirDiffusion(unet, image_size=32, timesteps=1000).to(device)
    params = count_parameters(unet)
    # Their Trainer uses Adam with betas (0.9, 0.99) and accelerate's clip_grad_norm_ on the
    # diffusion module; plain torch calls are the single-process equivalent.
    opt = torch.optim.Adam(diffusion.parameters(), lr=LR, betas=ADAM_BETAS)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    diffusion.train()

    def step(img01: torch.Tensor) -> float:
        # forward() takes [0, 1] images, normalises them and draws t and noise itself.
        with autocast(device, precision):
            loss = diffusion(img01)
        return optimizer_step(loss, diffusion, opt, scaler)

    return Contender("theirs (denoising_diffusion_pytorch)", params, step, [], [])


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    # Their Trainer gets mixed precision from accelerate; a plain torch.autocast is the same thing
    # for one process, and it is what training/loop.py uses for ours.
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> float:
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # a no-op unless fp16 loss scaling is on
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    # Both training loops read the loss every step (training/loop.py for its log, their Trainer for its
    # progress bar); the .item() also synchronises CUDA at the end of every step.
    return loss.item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(c: Contender, batches: list[torch.Tensor], n: int,
              device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for ``n`` steps, cycling through ``batches``."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        c.last_loss = c.step(batches[i % len(batches)])
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device: torch.device = args.device
    if args.retain_freed_memory:
        retain_freed_memory()
    precision = precision_for(device, amp=True)  # bf16 where supported, fp16 on older GPUs, fp32 on CPU

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)")
          + f", precision {precision}"
          + (", freed pages retained" if args.retain_freed_memory else ""))
    print(f"batch {args.batch}, warmup {args.warmup}, {args.steps} timed steps x {args.repeats} repeats,"
          f" interleaved{', ours compiled' if args.compile else ''}")

    gen = torch.Generator().manual_seed(args.seed + 2)
    batches = [torch.rand(args.batch, 3, 32, 32, generator=gen).to(device) for _ in range(N_BATCHES)]

    contenders = [make_ours(device, precision, args.seed, args.compile),
                  make_theirs(device, precision, args.seed)]
    torch.manual_seed(args.seed + 3)  # their t and noise come from the global RNG

    for c in contenders:
        # Warm-up also absorbs torch.compile, cuDNN autotuning and allocator growth.
        warm = run_steps(c, batches, args.warmup, device)[0] if args.warmup else 0.0
        print(f"warm-up {c.name}: {args.warmup} steps in {warm:.1f} s")

    for r in range(args.repeats):
        # Alternate which side goes first (A B, B A, ...): a load drift within a repeat then
        # does not always land on the same implementation.
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            seconds, cpu_seconds = run_steps(c, batches, args.steps, device)
            c.rates.append(args.batch * args.steps / seconds)
            c.cpu_rates.append(args.batch * args.steps / cpu_seconds)
        print(f"repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{c.name.split()[0]} {c.rates[-1]:.2f} img/s" for c in contenders))

    ours, theirs = contenders
    medians = [statistics.median(c.rates) for c in contenders]
    print()
    on_cpu = device.type == "cpu"
    print(f"{'implementation':<38} {'params':>12} {'images/s':>9} {'min':>8} {'max':>8}"
          + (f" {'img/cpu-s':>9}" if on_cpu else "") + f" {'last loss':>9}")
    for c, med in zip(contenders, medians):
        print(f"{c.name:<38} {c.params:>12,} {med:>9.2f} {min(c.rates):>8.2f} {max(c.rates):>8.2f}"
              + (f" {statistics.median(c.cpu_rates):>9.2f}" if on_cpu else "")
              + f" {c.last_loss:>9.4f}")
    # Ratios of same-repeat pairs cancel most of the load drift between repeats.
    paired = statistics.median(a / b for a, b in zip(ours.rates, theirs.rates))
    print(f"ratio ours/theirs (images/s): {medians[0] / medians[1]:.3f} (of medians), "
          f"{paired:.3f} (median of per-repeat ratios)")
    if on_cpu:
        # When another job takes the cores away, wall time stretches by the time spent descheduled;
        # CPU time of this process does not, so on a shared CPU this ratio drifts less. It is not
        # immune: OpenMP threads spin while a sibling is descheduled, and that CPU time counts.
        cpu_paired = statistics.median(a / b for a, b in zip(ours.cpu_rates, theirs.cpu_rates))
        print(f"ratio ours/theirs (images per CPU-second): {cpu_paired:.3f} (median of per-repeat ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
