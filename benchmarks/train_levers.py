"""The quick run's training step on CPU, one lever at a time, each against the step as training/loop.py
takes it, interleaved in one process.

The step is configs/quick.yaml's: its U-Net (dim 16, 0.44M parameters), 2 micro-steps of 16 images,
the diffusion loss, gradient clipping to 1.0 and Adam. Every variant builds the same seeded model and
draws its own seeded images, t and noise. Timed blocks alternate between variants (the first rotating
each repeat), so load from other jobs lands on all of them. Printed per variant: images/s (median over
blocks) and the ratio to the baseline.

    python benchmarks/train_levers.py                  # every lever but compile
    python benchmarks/train_levers.py --compile        # also torch.compile (about 100 s to compile)
    python benchmarks/train_levers.py --retain-freed-memory   # as the stages run (runtime/memory.py)
    python benchmarks/train_levers.py --only foreach_adam --repeats 12
    python benchmarks/train_levers.py --retain-freed-memory --profile   # where a step's time goes

Levers: ``fused_adam`` and ``foreach_adam`` (torch.optim.Adam's multi-tensor paths), ``channels_last``
(model and inputs), ``bf16_autocast`` (CPU autocast; numerics change), ``one_pass_32`` (the two
micro-steps as one batch of 32: the same mean gradient up to float rounding), ``compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.models.networks import build_model
from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig
from ddpm_cifar.runtime.memory import retain_freed_memory
from ddpm_cifar.runtime.params_file import parse_section

ROOT = Path(__file__).resolve().parents[1]
LEVERS = ("baseline", "fused_adam", "foreach_adam", "channels_last", "bf16_autocast", "one_pass_32")


def quick_configs() -> tuple[ModelConfig, DiffusionConfig]:
    """The committed study params under configs/quick.yaml's model section."""
    shown = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:params.yaml"], capture_output=True,
                           text=True)
    raw = yaml.safe_load(shown.stdout if shown.returncode == 0 else (ROOT / "params.yaml").read_text())
    raw["model"].update(yaml.safe_load((ROOT / "configs/quick.yaml").read_text())["model"])
    return (parse_section("model", raw["model"], ModelConfig),
            parse_section("diffusion", raw["diffusion"], DiffusionConfig))


def make_step(lever: str, model_cfg: ModelConfig, diffusion: GaussianDiffusion) -> Callable[[], float]:
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    layout = torch.channels_last if lever == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=layout)
    extra = {"fused": True} if lever == "fused_adam" else {"foreach": True} if lever == "foreach_adam" else {}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), **extra)
    net = torch.compile(model) if lever == "compile" else model
    gen = torch.Generator().manual_seed(1)
    micro, accum = (32, 1) if lever == "one_pass_32" else (16, 2)

    def step() -> float:
        for _ in range(accum):
            x0 = (torch.rand(micro, 3, 32, 32, generator=gen) * 2 - 1).contiguous(memory_format=layout)
            t = torch.randint(0, diffusion.num_timesteps, (micro,), generator=gen)
            noise = torch.randn(micro, 3, 32, 32, generator=gen)
            ctx = (torch.autocast("cpu", torch.bfloat16) if lever == "bf16_autocast"
                   else contextlib.nullcontext())
            with ctx:
                loss = diffusion.loss(net, x0, t, noise) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def profile(step: Callable[[], float]) -> None:
    """Where a step's time goes: operators by self CPU time over 10 steps, after 3 untimed ones."""
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", help="comma-separated levers to time beside the baseline")
    ap.add_argument("--profile", action="store_true",
                    help="instead, torch.profiler's top operators over 10 baseline steps")
    ap.add_argument("--retain-freed-memory", action="store_true")
    args = ap.parse_args()
    if args.retain_freed_memory:
        retain_freed_memory()
    model_cfg, diffusion_cfg = quick_configs()
    diffusion = GaussianDiffusion(diffusion_cfg)
    if args.profile:
        profile(make_step("baseline", model_cfg, diffusion))
        return
    levers = list(LEVERS) + (["compile"] if args.compile else [])
    if args.only:
        levers = ["baseline"] + [lever for lever in args.only.split(",") if lever != "baseline"]
    steps, warm = {}, {}
    for lever in levers:
        start = time.perf_counter()
        steps[lever] = make_step(lever, model_cfg, diffusion)
        for _ in range(2):
            steps[lever]()
        warm[lever] = time.perf_counter() - start
    rates: dict[str, list[float]] = {lever: [] for lever in levers}
    for repeat in range(args.repeats):
        for lever in levers[repeat % len(levers):] + levers[:repeat % len(levers)]:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[lever]()
            rates[lever].append(32 * args.steps / (time.perf_counter() - start))
    base = statistics.median(rates["baseline"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} blocks of "
          f"{args.steps} steps, freed pages {'retained' if args.retain_freed_memory else 'returned'}")
    print(f"{'lever':<16}{'images/s':>10}{'vs baseline':>13}{'first 2 steps':>15}")
    for lever in levers:
        rate = statistics.median(rates[lever])
        print(f"{lever:<16}{rate:>10.1f}{rate / base:>12.3f}x{warm[lever]:>14.1f}s")


if __name__ == "__main__":
    main()
