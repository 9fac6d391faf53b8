"""Shared plumbing for the stage entry points: device choice and one-line errors."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping

import torch

from .config import DistributedConfig
from .errors import UserError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def launched_ranks(cfg: DistributedConfig, env: Mapping[str, str]) -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's variables in ``env``, checked against params.

    A mismatch is an error rather than a warning: dvc.lock would record params that did not run.
    Under torchrun (``LOCAL_RANK`` set) this worker is also tied to its launcher's life
    (:func:`die_with_parent`).
    """
    if "LOCAL_RANK" in env:
        die_with_parent()
    world = int(env.get("WORLD_SIZE", "1"))
    if world != cfg.world_size:
        raise UserError(
            f"params.yaml asks for {cfg.world_size} processes (distributed.nnodes {cfg.nnodes} x "
            f"distributed.nproc_per_node {cfg.nproc_per_node}) but this run has {world}: run the stage "
            "with `dvc repro`, or with torchrun and those numbers")
    return world, int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process as soon as its parent exits (Linux; elsewhere nothing).

    torchrun starts its workers in a process session of their own, so killing the session or
    process group that ran ``dvc repro`` (a job scheduler, a closed terminal) kills torchrun but not
    them: an orphaned worker would go on training and later write its checkpoint over the outputs
    of the next run. With this, the workers die with torchrun, before they can write anything more.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here: the output lock still keeps two writers apart
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def run(main: Callable[[], None]) -> None:
    """Run a stage; bad input ends it with one line on stderr and exit status 1, not a traceback."""
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished outputs and the last checkpoint are kept; rerun to resume")
