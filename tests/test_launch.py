"""The stages' launcher: one process runs the script in its own place, more go through torchrun's
agent in the launcher's process, each worker tied to the launcher's life from its first line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from factories import save_tiny_checkpoint

from ddpm_cifar.runtime.launch import parse, torchrun_args, worker_errors
from ddpm_cifar.runtime.worker import LAUNCHER_PID

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import os, sys; print(os.getpid(), os.environ.get('LOCAL_RANK'), sys.argv[1:])"
LAUNCH = [sys.executable, "-m", "ddpm_cifar.runtime.launch", "--nnodes", "1",
          "--rdzv-endpoint", "localhost:0"]


def test_one_process_becomes_the_script_itself(tmp_path: Path) -> None:
    """No launcher stays behind: the script runs with the launcher's pid, and no torchrun variables."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.Popen([*LAUNCH, "--nproc-per-node", "1", str(script), "--out", "x"],
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    pid, local_rank, args = out.split(" ", 2)
    assert proc.returncode == 0 and int(pid) == proc.pid
    assert local_rank == "None" and args.strip() == "['--out', 'x']"


def test_more_processes_run_the_script_through_the_worker_entry_point() -> None:
    args = parse(["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-endpoint", "head:29500",
                  "stages/train.py", "--params", "p.yaml"])
    assert torchrun_args(args) == ["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                                   "--rdzv-endpoint", "head:29500", "-m", "ddpm_cifar.runtime.worker",
                                   "stages/train.py", "--params", "p.yaml"]


def test_the_same_error_on_every_rank_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "rank1.txt").write_text("error: rank 1: train.batch_size 3 does not divide")
    (tmp_path / "rank0.txt").write_text("error: rank 0: train.batch_size 3 does not divide")
    (tmp_path / "rank10.txt").write_text("error: rank 10: cannot read x")
    assert worker_errors(tmp_path) == ["error: train.batch_size 3 does not divide", "error: cannot read x"]


def test_a_worker_whose_launcher_is_gone_exits_before_running_the_script(tmp_path: Path) -> None:
    """What a worker sees when the process group was killed while torchrun was starting it: its
    parent is no longer the launcher. It must not go on to wait for a rendezvous that never comes."""
    marker = tmp_path / "ran"
    script = tmp_path / "script.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {**os.environ, LAUNCHER_PID: "1"}  # not this worker's parent
    proc = subprocess.run([sys.executable, "-m", "ddpm_cifar.runtime.worker", str(script)], env=env,
                          timeout=60)
    assert proc.returncode == 1 and not marker.exists()
    env[LAUNCHER_PID] = str(os.getpid())  # the parent it has
    assert subprocess.run([sys.executable, "-m", "ddpm_cifar.runtime.worker", str(script)], env=env,
                          timeout=60).returncode == 0
    assert marker.exists()


def _workers(marker: str) -> list[str]:
    """Processes running stages/sample.py for this test (``marker`` in their command line), the
    launcher and torchrun left out."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        launcher = "ddpm_cifar.runtime.launch" in cmdline or "torchrun" in cmdline
        if "stages/sample.py" in cmdline and marker in cmdline and not launcher:
            found.append(f"{entry.name} {cmdline.strip()}")
    return found


def _sample_params(tmp_path: Path) -> Path:
    params = {
        "sample": {"n": 7, "sampler": {"name": "ddim", "steps": 3, "spacing": "uniform", "eta": 0.0,
                                       "variance": "posterior", "clip_x0": True},
                   "weights": "final",
                   "compile": False, "batch_size": 2, "seed": 0, "grid_images": 4, "strip_seeds": [0],
                   "strip_frames": 3},
        "distributed": {"nnodes": 1, "nproc_per_node": 2, "rdzv_endpoint": "localhost:0"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_a_kill_during_start_up_leaves_no_worker(tmp_path: Path) -> None:
    """SIGKILL to the whole process group 0.3 s after the workers appear, while they import torch:
    none may outlive it (they would wait out torchrun's 20-minute rendezvous, then retry)."""
    save_tiny_checkpoint(tmp_path / "ema.pt")
    params = _sample_params(tmp_path)
    cmd = [*LAUNCH, "--nproc-per-node", "2", str(ROOT / "stages" / "sample.py"), "--params", str(params),
           "--checkpoint", str(tmp_path / "ema.pt"), "--out", str(tmp_path / "s.npz")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_workers(str(tmp_path))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert _workers(str(tmp_path)), "the workers never started"
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    survivors = _workers(str(tmp_path))
    for line in survivors:  # do not leave them to the rest of the suite
        os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not survivors, f"alive after the kill: {survivors}"


@pytest.mark.slow
def test_a_bad_value_under_two_processes_is_one_line(tmp_path: Path) -> None:
    """The same one line as with one process: not one per rank, and no torchrun traceback."""
    save_tiny_checkpoint(tmp_path / "ema.pt")
    params = _sample_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["sample"]["batch_size"] = 0
    params.write_text(yaml.safe_dump(raw))
    lines = {}
    for nproc in (1, 2):
        raw["distributed"]["nproc_per_node"] = nproc
        params.write_text(yaml.safe_dump(raw))
        proc = subprocess.run([*LAUNCH, "--nproc-per-node", str(nproc), str(ROOT / "stages" / "sample.py"),
                               "--params", str(params), "--checkpoint", str(tmp_path / "ema.pt")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        lines[nproc] = proc.stderr.strip().splitlines()
    assert lines[1] == ["error: sample.batch_size must be at least 1, got 0"]
    assert lines[2] == lines[1]


PROBE_STAGE = """
import sys
from pathlib import Path
import torch.distributed as dist
from ddpm_cifar.runtime.stage import stage

with stage("probe", sys.argv[1], ("distributed",), [Path(sys.argv[2])]) as run:
    dist.barrier()  # the stage's first collective, at once
"""


@pytest.mark.slow
def test_the_lock_refusal_under_two_processes_is_one_line(tmp_path: Path) -> None:
    """Only rank 0 takes the output lock: the other rank must not wait in the stage's first
    collective and die there with a traceback of its own when rank 0 exits to say why."""
    import fcntl

    params = _sample_params(tmp_path)
    script = tmp_path / "probe_stage.py"
    script.write_text(PROBE_STAGE)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".probe.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run of the stage, writing
    os.write(fd, b"4242\n")
    try:
        proc = subprocess.run([*LAUNCH, "--nproc-per-node", "2", str(script), str(params), str(out)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=180)
    finally:
        os.close(fd)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: another run of the probe stage is writing {out}/ (process 4242): wait for it to finish "
        "or stop it, then rerun"]
