"""Shared plumbing for the stage entry points: device choice and one-line errors."""

from __future__ import annotations

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
    """
    world = int(env.get("WORLD_SIZE", "1"))
    if world != cfg.world_size:
        raise UserError(
            f"params.yaml asks for {cfg.world_size} processes (distributed.nnodes {cfg.nnodes} x "
            f"distributed.nproc_per_node {cfg.nproc_per_node}) but this run has {world}: run the stage "
            "with `dvc repro`, or with torchrun and those numbers")
    return world, int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))


def run(main: Callable[[], None]) -> None:
    """Run a stage; bad input ends it with one line on stderr and exit status 1, not a traceback."""
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished outputs and the last checkpoint are kept; rerun to resume")
