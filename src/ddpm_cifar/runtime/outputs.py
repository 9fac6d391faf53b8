"""Claiming a stage's output folders before the first write: writable, and one writer at a time.

A stage that finds out at its first checkpoint that ``models/`` is read-only has wasted the steps
before it; a stage that writes while another run of the same stage writes the same files (an
orphaned worker of a killed run, a second launch by hand) leaves outputs that belong to neither.
:func:`claim_outputs` checks both before any work. The lock is an ``flock`` on
``<first folder>/.<stage>.lock``: the kernel releases it when its holder exits, however it exits,
so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import UserError
from .fileio import remove_stale_temp_files


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made in it (one line if not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {folder}/: {exc.strerror or exc}: fix its permissions, "
                        "or free space, and rerun") from None


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def claim_outputs(stage: str, folders: Sequence[Path], *, lock: bool = True) -> Iterator[None]:
    """Check that every folder in ``folders`` is writable and, with ``lock``, hold
    ``folders[0]/.<stage>.lock`` until the block ends (ranks that do not write pass ``lock=False``).
    The holder then removes the temporary files that killed writers left in the folders."""
    for folder in folders:
        check_writable(folder)
    if not lock:
        yield
        return
    path = folders[0] / f".{stage}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another run of the {stage} stage is writing {folders[0]}/ (process {_holder(path)}): "
                "wait for it to finish or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for stale in remove_stale_temp_files(*folders):
            print(f"removed {stale}, left by a killed run")
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race the next holder)
