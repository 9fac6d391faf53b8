"""Stages and training under a real torchrun launch with 2 CPU processes (gloo).

What only the launcher can show: a failing rank ends the whole run with its error instead of
leaving the others waiting in a collective, bad input gives the one-line error, and the sample
stage's sharded images equal a one-process run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from factories import save_tiny_checkpoint

from ddpm_cifar.runtime.loaders import live_metric_path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"  # the one dvc.yaml's commands find on PATH
WORKER = ROOT / "tests" / "torchrun_worker.py"
HANG_LIMIT = 120  # seconds; a healthy failure takes a few


Result = tuple[subprocess.CompletedProcess[str], float]


def _torchrun(args: list[str], nproc: int = 2, cwd: Path = ROOT) -> Result:
    cmd = [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_LIMIT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun still running after {HANG_LIMIT} s (a hang): {exc.stderr!r}")
    return proc, time.monotonic() - t0


@pytest.mark.slow
def test_a_crash_in_one_rank_ends_the_run_with_its_error(tmp_path: Path) -> None:
    proc, elapsed = _torchrun([str(WORKER), str(tmp_path / "out"), "--fail-rank", "1", "--fail-step", "2"])
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in proc.stderr
    assert "rank      : 1" in proc.stderr  # torchrun's summary names the failed rank
    assert elapsed < HANG_LIMIT / 2, f"took {elapsed:.0f} s to fail"
    # Rank 0 got as far as the step-1 log row and no further: it was stopped, not left waiting.
    rows = live_metric_path(tmp_path / "out" / "dvclive", "loss").read_text().splitlines()
    assert len(rows) <= 3


@pytest.mark.slow
def test_a_global_batch_that_does_not_divide_is_one_line_per_rank(tmp_path: Path) -> None:
    proc, _ = _torchrun([str(WORKER), str(tmp_path / "out"), "--batch-size", "3"])
    assert proc.returncode != 0
    for rank in (0, 1):
        line = (f"error: rank {rank}: train.batch_size 3 does not divide among 2 processes: it is the "
                "global batch, and every rank takes an equal share")
        # Whole, though the two ranks' lines may interleave in the shared pipe without a newline.
        assert line in proc.stderr, proc.stderr
    # torchrun adds its own traceback and failure summary; none from our code.
    assert "/ddpm_cifar/" not in proc.stderr


def _sample_params(path: Path, nproc: int) -> Path:
    params = {
        "sample": {"n": 7, "sampler": {"name": "ddim", "steps": 3, "spacing": "uniform", "eta": 0.0,
                                       "variance": "posterior", "clip_x0": True},
                   "weights": "final",
                   "compile": False, "batch_size": 2, "seed": 0, "grid_images": 4, "strip_seeds": [0],
                   "strip_frames": 3},
        "distributed": {"nnodes": 1, "nproc_per_node": nproc, "rdzv_endpoint": "localhost:0"},
    }
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_the_sample_stage_on_two_processes_gives_the_one_process_images(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ema.pt")
    outs = {}
    for nproc in (1, 2):
        d = tmp_path / f"world{nproc}"
        params = _sample_params(tmp_path / f"p{nproc}.yaml", nproc)
        stage_args = [str(ROOT / "stages" / "sample.py"), "--params", str(params), "--checkpoint", str(ckpt),
                      "--out", str(d / "samples.npz"), "--partial", str(d / "partial"),
                      "--plots", str(d / "plots")]
        if nproc == 1:
            proc = subprocess.run([sys.executable, *stage_args], cwd=tmp_path, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=HANG_LIMIT)
        else:
            proc, _ = _torchrun(stage_args, nproc=2, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outs[nproc] = np.load(d / "samples.npz")["images"]
        assert (d / "plots" / "denoise_strip.png").exists() and not (d / "partial").exists()
    assert outs[1].shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(outs[2], outs[1])


def test_a_stage_started_alone_refuses_params_that_ask_for_two(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ema.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "sample.py"), "--params",
                           str(_sample_params(tmp_path / "p.yaml", 2)), "--checkpoint", str(ckpt)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG_LIMIT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml asks for 2 processes (distributed.nnodes 1 x distributed.nproc_per_node 2) but "
        "this run has 1: run the stage with `dvc repro`, or with torchrun and those numbers"]
