"""What a torchrun worker runs first: it ties its life to the launcher's, then runs the stage script.

    python -m ddpm_cifar.runtime.launch --nproc-per-node 2 ... stages/train.py   # starts, per worker:
    python -m ddpm_cifar.runtime.worker stages/train.py [args]

This module imports nothing slow (no torch), so the death signal is armed within milliseconds of
the worker's start. A worker whose launcher is already gone when it starts (a whole process group
killed while torchrun was spawning it) exits at once, instead of waiting out the rendezvous
timeout and retrying a dead store for half an hour.

A stage's one-line error (``sys.exit("error: ...")``) goes to a file in the folder the launcher
names, not to stderr: the launcher prints each different line once, instead of one line per rank
followed by torchrun's traceback.

This is an entry point: it reads argv and the launcher's environment variables.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
from pathlib import Path

# Set by ddpm_cifar.runtime.launch for its workers.
LAUNCHER_PID = "DDPM_CIFAR_LAUNCHER_PID"  # the process that spawns the workers (torchrun's agent)
ERROR_DIR = "DDPM_CIFAR_ERROR_DIR"  # where a worker leaves its one-line error, as rank<N>.txt

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process as soon as its parent exits (Linux; elsewhere nothing).

    torchrun starts its workers in a process session of their own, so killing the session or
    process group that ran ``dvc repro`` (a job scheduler, a closed terminal) kills torchrun but not
    them: an orphaned worker would go on and write over the outputs of the next run. The signal is
    armed first and the parent checked after: a parent that died before the request took effect
    has already handed this process to another (init, or a subreaper), which ``expected_parent``
    (or the parent seen before arming) tells apart.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if expected_parent is None else expected_parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here: the output lock still keeps two writers apart
    if os.getppid() != parent:
        os._exit(1)


def main() -> None:
    launcher = os.environ.get(LAUNCHER_PID)
    die_with_parent(int(launcher) if launcher and launcher.isdigit() else None)
    if len(sys.argv) < 2:
        sys.exit("usage: python -m ddpm_cifar.runtime.worker SCRIPT [ARGS ...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the script sees its own argv, as under `python SCRIPT`
    sys.path[0] = str(Path(script).resolve().parent)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        errors = os.environ.get(ERROR_DIR)
        if not isinstance(exc.code, str) or not errors:
            raise
        rank = os.environ.get("RANK", "0")
        (Path(errors) / f"rank{rank}.txt").write_text(exc.code)
        sys.exit(1)


if __name__ == "__main__":
    main()
