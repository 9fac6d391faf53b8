"""Crash-only: a run killed the way a job scheduler or a closed terminal kills it (SIGKILL to its whole
process group) leaves no process behind, and the next `dvc repro` ends where an uninterrupted run ends.

The toy pipeline runs on 2 processes, so training and sampling go through torchrun, whose workers
live in a session of their own: without runtime.worker's death signal they outlived the kill and
went on writing. It is killed 0.3 s after the training workers start (while they import torch),
during training, when a checkpoint is being written (a 2 ms poll for its temporary file; if it
misses every write, 3 steps before the end of training) and during sampling; then rerun to the end
and compared with a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import yaml
from test_pipeline_e2e import (
    INCEPTION_IN_REPO,
    Runner,
    _live_rows,
    _tiny_params,
    toy_repo,
)

from ddpm_cifar.runtime import params_file

if TYPE_CHECKING:
    from conftest import TinyCifarArchive

pytestmark = pytest.mark.slow

STEPS = 24
KILL_PARAMS: dict[str, dict[str, Any]] = {
    "train": dict(steps=STEPS, checkpoint_every=3, fid_every=0),
    "sample": dict(n=48, batch_size=4),
    "distributed": dict(nproc_per_node=2),
}


def _project(root: Path, archive: TinyCifarArchive, inception: Path) -> tuple[Path, Runner]:
    repo, run = toy_repo(root)
    (repo / INCEPTION_IN_REPO).parent.mkdir(parents=True)
    shutil.copy(inception, repo / INCEPTION_IN_REPO)
    params = _tiny_params(params_file.read_yaml(repo / "params.yaml"), archive)
    for section, values in KILL_PARAMS.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run.commit("toy project")
    return repo, run


def _stage_processes(repo: Path) -> list[str]:
    """Processes still working in ``repo`` (their cwd), as 'pid cmdline'."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if cwd == str(repo) or cwd.startswith(f"{repo}/"):
            found.append(f"{entry.name} {cmdline.strip()}")
    return found


def _repro_killed_when(run: Runner, repo: Path, due: Callable[[], bool], timeout: float = 300) -> bool:
    """`dvc repro` in a process group of its own, SIGKILLed as a whole once ``due()``; False if it
    finished first."""
    with open(repo.parent / "repro.log", "a") as log:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=run.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if due():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        assert proc.poll() is not None, "dvc repro hung"
        return False


def _loss_rows(repo: Path) -> int:
    path = repo / "dvclive/plots/metrics/loss.tsv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def _checkpoint_in_flight(repo: Path) -> bool:
    return any((repo / "models").glob(".checkpoint.pt.*.tmp")) or _loss_rows(repo) >= STEPS - 3


class _WorkersStarted:
    """True from 0.3 s after the train stage's torchrun workers appear: a kill while they start up."""

    def __init__(self, repo: Path):
        self.repo, self.seen = repo, 0.0

    def __call__(self) -> bool:
        if not self.seen:
            workers = [p for p in _stage_processes(self.repo) if "ddpm_cifar.runtime.worker" in p]
            self.seen = time.monotonic() if len(workers) >= 2 else 0.0
        return bool(self.seen) and time.monotonic() - self.seen >= 0.3


def _sampling(repo: Path) -> bool:
    return any((repo / "samples/partial").rglob("*.npy")) if (repo / "samples/partial").is_dir() else False


def test_killed_runs_leave_no_writer_and_resume_to_the_same_results(
        tmp_path: Path, tiny_cifar_archive: TinyCifarArchive, e2e_random_inception: Path) -> None:
    reference, ref_run = _project(tmp_path / "reference", tiny_cifar_archive, e2e_random_inception)
    ref_run.dvc("repro")
    repo, run = _project(tmp_path / "killed", tiny_cifar_archive, e2e_random_inception)

    moments = {"start-up": _WorkersStarted(repo),
               "training": lambda: _loss_rows(repo) >= 4,
               "a checkpoint write": lambda: _checkpoint_in_flight(repo),
               "sampling": lambda: _sampling(repo)}
    for moment, due in moments.items():
        assert _repro_killed_when(run, repo, due), f"the run finished before {moment}"
        time.sleep(2)  # a worker that outlived the kill would still be at work now
        survivors = _stage_processes(repo)
        assert not survivors, f"killed during {moment}, still running: {survivors}"
    run.dvc("repro")  # to the end
    status = run.dvc("status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout

    ema, ref_ema = (torch.load(r / "models/ema.pt", weights_only=True)["ema"] for r in (repo, reference))
    assert all(torch.equal(ema[k], ref_ema[k]) for k in ref_ema), "weights differ from an uninterrupted run"
    with np.load(repo / "samples/samples.npz") as got, np.load(reference / "samples/samples.npz") as want:
        assert np.array_equal(got["images"], want["images"]), "samples differ from an uninterrupted run"
    # DVCLive's histories: every step once, every value to the last digit an uninterrupted run's
    rows, ref_rows = (_live_rows(r, "loss", "lr") for r in (repo, reference))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1)), "gaps or duplicates in the loss log"
    assert rows == ref_rows
    histories = {r: {p.name: p.read_bytes() for p in (r / "dvclive/plots/metrics").iterdir()}
                 for r in (repo, reference)}
    assert set(histories[repo]) == {"loss.tsv", "lr.tsv"}  # train.fid_every: 0
    assert histories[repo] == histories[reference], "a history differs from an uninterrupted run's"
    live, ref_live = (json.loads((r / "dvclive/metrics.json").read_text()) for r in (repo, reference))
    assert {k: v for k, v in live.items() if k != "images_per_second"} == {
        k: v for k, v in ref_live.items() if k != "images_per_second"}
    train = json.loads((repo / "reports/train.json").read_text())
    assert train["world_history"] == [[0, STEPS, 2]], train
    assert not list(repo.rglob(".*.tmp")), "temporary files left behind"
