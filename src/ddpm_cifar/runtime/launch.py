"""Start a stage script with the process counts of params.yaml's ``distributed`` section.

    python -m ddpm_cifar.runtime.launch --nnodes 1 --nproc-per-node 1 --rdzv-endpoint localhost:0 \
        stages/train.py

One process in all, the default: the script replaces this process (exec), so the stage runs as a
plain ``python stages/train.py`` would: there is no launcher in between that could outlive it or
be killed without it, and an error is the stage's own one line. More processes: ``torchrun``
replaces this process with the same arguments and starts the workers, and each worker is killed by
the kernel when torchrun dies (``cli.launched_ranks``), so killing the run's process group leaves
no writer behind.

This is an entry point (it reads argv); the stages' commands in dvc.yaml call it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def command(argv: list[str] | None = None) -> list[str]:
    """The command line this launcher becomes."""
    ap = argparse.ArgumentParser(prog="python -m ddpm_cifar.runtime.launch",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--nnodes", type=int, required=True)
    ap.add_argument("--nproc-per-node", type=int, required=True)
    ap.add_argument("--rdzv-endpoint", required=True)
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    args = ap.parse_args(argv)
    if args.nnodes < 1 or args.nproc_per_node < 1:
        ap.error("--nnodes and --nproc-per-node must be at least 1")
    if args.nnodes * args.nproc_per_node == 1:
        return [sys.executable, args.script, *args.args]
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, args.script, *args.args]


def main() -> None:
    argv = command()
    sys.stdout.flush()
    os.execv(argv[0], argv)  # replaces this process: nothing of the launcher stays behind


if __name__ == "__main__":
    main()
