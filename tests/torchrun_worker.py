"""A tiny training run for tests/test_torchrun.py to start under torchrun, like a stage.

    torchrun --nproc-per-node 2 tests/torchrun_worker.py OUT_DIR [--fail-rank R --fail-step S]

With --fail-rank, that rank raises at that step (the others are then waiting in an all-reduce).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from factories import random_images, tiny_diffusion, tiny_model, tiny_train, train_outputs  # noqa: E402

from ddpm_cifar.runtime.distributed import process_group  # noqa: E402
from ddpm_cifar.runtime.stage import run  # noqa: E402
from ddpm_cifar.training.loop import BatchSource, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--fail-step", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = os.environ
    with process_group(int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"])) as device:
        if int(env["RANK"]) == args.fail_rank:
            batch = BatchSource.batch
            micro_batch = args.batch_size * 2  # tiny_train's grad_accum is 2

            def failing(self: BatchSource, start: int, size: int, part: slice = slice(None)) -> torch.Tensor:
                if start >= args.fail_step * micro_batch:
                    raise RuntimeError(f"injected failure on rank {args.fail_rank}")
                return batch(self, start, size, part)

            BatchSource.batch = failing  # type: ignore[method-assign]
        train(tiny_model(), tiny_diffusion(), tiny_train(steps=4, batch_size=args.batch_size),
              images=random_images(12, 8, 3), data_id="random-12", outputs=train_outputs(args.out),
              device=device)


if __name__ == "__main__":
    run(main)
