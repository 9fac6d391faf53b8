"""Start a stage script with the process counts of params.yaml's ``distributed`` section.

    python -m ddpm_cifar.runtime.launch --nnodes 1 --nproc-per-node 1 --rdzv-endpoint localhost:0 \\
        stages/train.py

One process in all, the default: the script replaces this process (exec), so the stage runs as a
plain ``python stages/train.py`` would: there is no launcher in between that could outlive it or
be killed without it, and an error is the stage's own one line.

More processes: this process becomes torchrun (its elastic agent, run in-process) and starts each
worker through :mod:`ddpm_cifar.runtime.worker`, which the kernel kills when this process dies, so
killing the run's process group leaves no writer behind. A worker's one-line error comes back here
and is printed once, however many ranks hit it, and without torchrun's traceback.

This is an entry point (it reads argv); the stages' commands in dvc.yaml call it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from .worker import ERROR_DIR, LAUNCHER_PID


def parse(argv: list[str] | None = None) -> argparse.Namespace:
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
    return args


def torchrun_args(args: argparse.Namespace) -> list[str]:
    """torchrun's arguments: each worker runs the script through ddpm_cifar.runtime.worker."""
    return ["--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
            "-m", "ddpm_cifar.runtime.worker", args.script, *args.args]


def worker_errors(folder: Path) -> list[str]:
    """The different one-line errors the workers left in ``folder``, lowest rank first; the rank
    prefix is dropped, so that the same error on every rank is one line."""
    found: dict[str, None] = {}
    files = sorted(folder.glob("rank*.txt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    for path in files:
        found[re.sub(r"^error: rank \d+: ", "error: ", path.read_text().strip())] = None
    return list(found)


def run_torchrun(args: argparse.Namespace) -> int:
    """torchrun's agent in this process; returns the exit status and prints one line per different
    worker error."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's own log lines (its settings, each failed worker) would bury the workers' errors.
    logging.getLogger("torch.distributed").setLevel(logging.ERROR + 10)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set, without its warning
    with tempfile.TemporaryDirectory(prefix="ddpm-cifar-errors-") as folder:
        os.environ[LAUNCHER_PID], os.environ[ERROR_DIR] = str(os.getpid()), folder
        try:
            run(parse_args(torchrun_args(args)))
            return 0
        except ChildFailedError as exc:
            lines = worker_errors(Path(folder))
            if not lines:  # a crash: the worker printed its traceback
                rank, failure = exc.get_first_failure()  # the first to fail: the others were stopped
                lines = [f"error: rank {rank} failed (exit status {failure.exitcode}): see its output above"]
            print("\n".join(lines), file=sys.stderr)
            return 1
        except (SignalException, KeyboardInterrupt):
            print("interrupted: finished outputs and the last checkpoint are kept; rerun to resume",
                  file=sys.stderr)
            return 130


def main() -> None:
    args = parse()
    if args.nnodes * args.nproc_per_node == 1:
        sys.stdout.flush()
        argv = [sys.executable, args.script, *args.args]
        os.execv(argv[0], argv)  # replaces this process: nothing of the launcher stays behind
    sys.exit(run_torchrun(args))


if __name__ == "__main__":
    main()
