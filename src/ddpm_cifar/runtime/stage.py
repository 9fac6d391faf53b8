"""How every stage starts and ends: :func:`stage` reads the params it declares, joins the process
group (data-parallel stages), claims its output folders and turns bad input into one line.

    with stage("sample", args.params, PARAMS, [args.out.parent, args.plots]) as run:
        cfg = run.params.section("sample")   # run.device, run.main (rank 0: the writer)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import DistributedConfig
from .distributed import any_rank, is_main, process_group
from .errors import UserError
from .memory import retain_freed_memory
from .outputs import claim_outputs
from .params_file import Params, load_params
from .worker import die_with_parent


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def launched_ranks(cfg: DistributedConfig, env: Mapping[str, str]) -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's variables in ``env``, checked against params.

    A mismatch is an error rather than a warning: dvc.lock would record params that did not run.
    Under torchrun (``LOCAL_RANK`` set) this worker is also tied to its launcher's life
    (:func:`~ddpm_cifar.runtime.worker.die_with_parent`; the launcher's workers did so first thing,
    a torchrun started by hand does it here).
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


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input ends the process with one line on stderr and exit status 1, not a traceback."""
    try:
        yield
    except UserError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished outputs and the last checkpoint are kept; rerun to resume")


def run(main: Callable[[], None]) -> None:
    """Run an entry point under :func:`one_line_errors`."""
    with one_line_errors():
        main()


@dataclass(frozen=True)
class StageRun:
    """What a stage's body works with."""

    name: str
    params: Params  # the keys the stage declared, and no others
    device: torch.device  # this rank's
    main: bool  # rank 0, or the only process: the one that writes the outputs

    def claim(self, folders: Sequence[Path]) -> contextlib.AbstractContextManager[None]:
        """Claim output folders known only once the params are read (:func:`claim_outputs`)."""
        return claim_outputs(self.name, folders, lock=self.main)


@contextlib.contextmanager
def stage(name: str, params_path: str | Path, declared: Sequence[str],
          outputs: Sequence[Path] = ()) -> Iterator[StageRun]:
    """Start stage ``name``: read ``declared`` from ``params_path``; when that includes the
    ``distributed`` section, join torchrun's process group as params say (checked against what
    torchrun started); claim the ``outputs`` folders (checked writable, the first locked by rank 0).
    Bad input anywhere inside, the body included, ends the process with one line."""
    retain_freed_memory()  # before the stage allocates: CPU steps then reuse their pages
    with one_line_errors():
        params = load_params(params_path, declared) if declared else Params({}, ())
        params.as_dict()  # every declared key checked before anything is claimed or computed
        if "distributed" in declared:
            ranks = launched_ranks(params.section("distributed"), os.environ)
        else:
            ranks = (1, 0, 0)
        with process_group(*ranks) as device, contextlib.ExitStack() as claimed:
            run = StageRun(name, params, device, is_main())
            refused = None
            try:
                claimed.enter_context(run.claim(outputs) if outputs else contextlib.nullcontext())
            except UserError as exc:
                refused = exc
            if any_rank(refused is not None, device):
                if refused is not None:
                    if dist.is_initialized():
                        time.sleep(1)  # the other ranks leave the all-reduce before this one exits
                    raise refused
                # Another rank refused (the lock is rank 0's): its one line says why. Waiting here,
                # not in the stage's first collective, keeps this rank from adding a traceback of
                # its own when that rank exits; torchrun stops this one then.
                time.sleep(60)
                sys.exit(1)
            yield run
