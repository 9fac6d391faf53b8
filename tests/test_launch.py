"""The stages' launcher: one process runs the script in its own place, more go through torchrun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ddpm_cifar.runtime.launch import command

PROBE = "import os, sys; print(os.getpid(), os.environ.get('LOCAL_RANK'), sys.argv[1:])"


def test_one_process_becomes_the_script_itself(tmp_path: Path) -> None:
    """No launcher stays behind: the script runs with the launcher's pid, and no torchrun variables."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    launch = [sys.executable, "-m", "ddpm_cifar.runtime.launch", "--nnodes", "1", "--nproc-per-node", "1",
              "--rdzv-endpoint", "localhost:0"]
    proc = subprocess.Popen([*launch, str(script), "--out", "x"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    pid, local_rank, args = out.split(" ", 2)
    assert proc.returncode == 0 and int(pid) == proc.pid
    assert local_rank == "None" and args.strip() == "['--out', 'x']"


def test_more_processes_go_through_torchrun_with_the_same_arguments() -> None:
    argv = command(["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-endpoint", "head:29500",
                    "stages/train.py"])
    assert Path(argv[0]).name == "torchrun"
    assert argv[1:] == ["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "head:29500", "stages/train.py"]
    assert command(["--nnodes", "1", "--nproc-per-node", "1", "--rdzv-endpoint", "localhost:0",
                    "stages/train.py"]) == [sys.executable, "stages/train.py"]
