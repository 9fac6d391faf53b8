"""What keeping freed pages (``ddpm_cifar.runtime.memory.retain_freed_memory``, called by every stage)
does to the quick run's two CPU costs: a training step of its U-Net and a batch of Inception features.

The setting is process-wide, so the two sides cannot share a process: each timed block is a fresh
child process, with the setting off ("glibc default") or on ("retained"), and the blocks alternate
(A B, B A, A B, ...) so that load from other jobs lands on both. Each child builds the same seeded
model, runs untimed warm-up steps, then times its steps and prints images/s; the table gives the
median over blocks, the ratio of medians, and the minor page faults per child (from getrusage).

    python benchmarks/allocator.py                       # training (quick run's U-Net), 4 blocks each
    python benchmarks/allocator.py --work inception --blocks 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def train_work(steps: int) -> float:
    """images/s of the quick run's training step, train_levers.py's baseline (configs/quick.yaml's U-Net,
    2 x 16 images, clip, Adam)."""
    from train_levers import make_step, quick_configs  # this folder is on sys.path when run as a script

    from ddpm_cifar.diffusion.process import GaussianDiffusion

    model_cfg, diffusion_cfg = quick_configs()
    step = make_step("baseline", model_cfg, GaussianDiffusion(diffusion_cfg))
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 32 * steps / (time.perf_counter() - start)


def inception_work(batches: int, batch: int) -> float:
    """images/s of Inception features as the pipeline computes them (folded network, uint8 NHWC in)."""
    import numpy as np

    from ddpm_cifar.evaluation.inception import build_inception, fold_batchnorm, inception_features

    model = fold_batchnorm(build_inception(seed=0))
    images = np.random.default_rng(0).integers(0, 256, (batch * batches, 32, 32, 3), dtype=np.uint8)
    inception_features(images[:batch], model, batch_size=batch, device="cpu", progress=False)
    start = time.perf_counter()
    inception_features(images, model, batch_size=batch, device="cpu", progress=False)
    return len(images) / (time.perf_counter() - start)


def child(args: argparse.Namespace) -> None:
    if args.retain:
        from ddpm_cifar.runtime.memory import retain_freed_memory

        assert retain_freed_memory(), "mallopt did not take: not glibc?"
    rate = train_work(args.steps) if args.work == "train" else inception_work(args.steps, args.batch)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(json.dumps({"rate": rate, "faults": faults}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", choices=("train", "inception"), default="train")
    ap.add_argument("--blocks", type=int, default=4, help="child processes per side")
    ap.add_argument("--steps", type=int, help="timed steps (train, default 40) or batches (inception, 4)")
    ap.add_argument("--batch", type=int, default=25, help="Inception batch (inception work)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--retain", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (40 if args.work == "train" else 4)
    if args.child:
        child(args)
        return
    sides = {"glibc default": [], "retained": []}
    base = [sys.executable, __file__, "--child", "--work", args.work, "--steps", str(args.steps),
            "--batch", str(args.batch)]
    for block in range(args.blocks):
        order = list(sides) if block % 2 == 0 else list(sides)[::-1]
        for name in order:
            cmd = base + (["--retain"] if name == "retained" else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            sides[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"work {args.work}, {args.blocks} blocks per side, {args.steps} timed "
          f"{'steps of 32 images' if args.work == 'train' else f'batches of {args.batch}'} per block")
    print(f"{'allocator':<16}{'images/s':>10}{'min':>9}{'max':>9}{'minor faults':>15}")
    medians = {}
    for name, runs in sides.items():
        rates = [r["rate"] for r in runs]
        medians[name] = statistics.median(rates)
        faults = statistics.median(r["faults"] for r in runs)
        print(f"{name:<16}{medians[name]:>10.2f}{min(rates):>9.2f}{max(rates):>9.2f}{faults:>15,.0f}")
    print(f"ratio retained / default: {medians['retained'] / medians['glibc default']:.3f}")


if __name__ == "__main__":
    main()
