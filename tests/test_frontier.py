"""The frontier stage: a CSV row per sampler setting (FID, KID, time), the sample stage's images reused
for the setting that made them, a killed run resumed to the same rows, the disabled stage's placeholders
and one-line errors. Tiny models (8x8 images, T = 20) and a random-weight Inception; all in tmp_path."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from factories import one_thread, random_images, save_tiny_checkpoint
from PIL import Image

from ddpm_cifar.diffusion.generate import Samples, load_samples, save_samples
from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.diffusion.samplers import final, run_sampler
from ddpm_cifar.evaluation import frontier
from ddpm_cifar.evaluation.fid import load_reference, save_reference, statistics
from ddpm_cifar.evaluation.inception import inception_features, load_inception
from ddpm_cifar.evaluation.reports import reference_meta
from ddpm_cifar.evaluation.scoring import score_sharded
from ddpm_cifar.runtime.config import SamplerConfig
from ddpm_cifar.runtime.fileio import file_digest

ROOT = Path(__file__).resolve().parents[1]
SAMPLER = {"name": "ddim", "steps": 3, "spacing": "uniform", "eta": 0.0, "variance": "posterior",
           "clip_x0": True}
# ddim 3 uniform is the sample stage's setting: reused. The others are sampled.
CURVES = [{"name": "ddim", "steps": [2, 3], "spacing": "uniform"},
          {"name": "dpmpp_2m", "steps": [4], "spacing": "quadratic"}]
N = 6  # the frontier's images per setting: the first 6 of the sample stage's 8


def _params(root: Path, **frontier_keys: Any) -> dict[str, Any]:
    return {
        "sample": {"n": 8, "sampler": SAMPLER, "weights": "final", "compile": False, "batch_size": 4,
                   "seed": 0, "grid_images": 4, "strip_seeds": [0], "strip_frames": 3},
        "frontier": {"enabled": True, "n": N, "batch_size": 4, "curves": CURVES, **frontier_keys},
        "fid": {"inception_weights": str(root / "inception.pth"), "reference": "train", "reference_count": 0,
                "reference_features": 16, "batch_size": 6, "exact_inception": False},
        "distributed": {"nnodes": 1, "nproc_per_node": 1, "rdzv_endpoint": "localhost:0"},
    }


def _run(script: str, args: list[str], cwd: Path, params: dict[str, Any],
         prelude: str = "") -> subprocess.CompletedProcess[str]:
    """A stage script in ``cwd`` with ``params`` as its params.yaml; ``prelude`` runs first (in the same
    process: a patch of the library)."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    path = str(ROOT / "stages" / script)
    code = (f"import runpy, sys\n{prelude}\nsys.argv = {[path, *args]!r}\n"
            f"runpy.run_path({path!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _frontier(root: Path, name: str, *, params: dict[str, Any] | None = None, checkpoint: str = "ema.pt",
              samples: Path | None = None,
              prelude: str = "") -> tuple[subprocess.CompletedProcess[str], Path]:
    run_dir = root / name
    args = ["--checkpoint", str(root / checkpoint), "--best", str(root / "missing_best.pt"),
            "--samples", str(samples or root / "samples.npz"), "--ref", str(root / "ref.npz"),
            "--partial", str(run_dir / "partial"), "--csv", str(run_dir / "frontier.csv"),
            "--png", str(run_dir / "frontier.png")]
    return _run("frontier.py", args, run_dir, params or _params(root), prelude), run_dir


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, e2e_random_inception: Path) -> Path:
    """Two tiny checkpoints, a random Inception and reference statistics with features."""
    root = tmp_path_factory.mktemp("frontier")
    save_tiny_checkpoint(root / "ema.pt", seed=0)
    save_tiny_checkpoint(root / "other.pt", seed=1)  # the same network, other weights
    (root / "inception.pth").symlink_to(e2e_random_inception)
    with one_thread():
        net, info = load_inception(root / "inception.pth")
        feats = inception_features(random_images(16, 8, seed=3), net, batch_size=8, device="cpu",
                                   progress=False)
    meta = reference_meta("cifar10-train", 16, {"official": False, "source": "random pixels"}, info)
    save_reference(root / "ref.npz", statistics(feats), meta, features=feats)
    return root


@pytest.fixture(scope="module")
def workspace(inputs: Path) -> Path:
    """``inputs`` and samples.npz, written by the sample stage itself."""
    args = ["--checkpoint", str(inputs / "ema.pt"), "--out", str(inputs / "samples.npz"),
            "--partial", str(inputs / "sample_partial"), "--plots", str(inputs / "sample_plots")]
    proc = _run("sample.py", args, inputs / "sample_run", _params(inputs))
    assert proc.returncode == 0, proc.stderr
    return inputs


@pytest.fixture(scope="module")
def full_run(workspace: Path) -> Path:
    proc, run_dir = _frontier(workspace, "full")
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.slow  # whole stages: about 20 s for the first, with the sample stage
def test_a_row_per_setting_with_its_nfe_fid_and_kid(workspace: Path, full_run: Path) -> None:
    rows = _rows(full_run / "frontier.csv")
    assert list(rows[0]) == list(frontier.COLUMNS)
    assert [(r["sampler"], int(r["steps"]), int(r["nfe"])) for r in rows] == [
        ("ddim", 2, 2), ("ddim", 3, 3), ("dpmpp_2m", 4, 4)]
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0, r
        assert math.isfinite(float(r["kid"])) and float(r["kid_std"]) >= 0, r
        assert int(r["n"]) == N and float(r["seconds_per_image"]) > 0, r
    assert rows[0]["eta"] == "0" and rows[2]["eta"] == "" and rows[0]["variance"] == ""  # what each reads
    assert rows[0]["curve"] == "ddim (uniform, eta 0)" and rows[2]["curve"] == "dpmpp_2m (quadratic)"
    assert not (full_run / "partial").exists(), "the partial folder outlived a finished run"
    with Image.open(full_run / "frontier.png") as im:
        assert im.format == "PNG" and im.width > 1000  # two panels: FID and KID


@pytest.mark.slow
def test_the_sample_stages_images_are_reused_for_their_setting(workspace: Path, full_run: Path,
                                                              e2e_random_inception: Path) -> None:
    samples = load_samples(workspace / "samples.npz")
    # What the sample stage now records for the frontier (and evaluate ignores).
    assert samples.config["weights_sha256"] == file_digest(workspace / "ema.pt")
    assert samples.config["seconds_per_image"] > 0
    rows = _rows(full_run / "frontier.csv")
    assert [r["reused"] for r in rows] == ["false", "true", "false"]
    assert rows[1]["seconds_per_image"] == frontier._fmt(samples.config["seconds_per_image"])
    with one_thread():
        net, _ = load_inception(e2e_random_inception)
        scores = score_sharded(samples.images[:N], net, load_reference(workspace / "ref.npz"), batch_size=6,
                               device=torch.device("cpu"), full=False, progress=False)
    assert rows[1]["fid"] == frontier._fmt(scores.fid) and rows[1]["kid"] == frontier._fmt(scores.kid.mean)


@pytest.mark.slow
def test_samples_of_other_weights_are_not_reused(workspace: Path, full_run: Path) -> None:
    params = _params(workspace, curves=[{"name": "ddim", "steps": [3], "spacing": "uniform"}])
    proc, run_dir = _frontier(workspace, "other_weights", params=params, checkpoint="other.pt")
    assert proc.returncode == 0, proc.stderr
    (row,) = _rows(run_dir / "frontier.csv")
    assert row["reused"] == "false", "samples.npz of models/ema.pt stood in for other weights"
    assert row["fid"] != _rows(full_run / "frontier.csv")[1]["fid"]


# Interrupt the run at the third setting's scoring, after its batches are sampled (Ctrl-C: the stage's
# one-line exit); the first two rows are finished by then.
INTERRUPT_THIRD = """
import ddpm_cifar.evaluation.frontier as f
calls, real = [], f.score_sharded
def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise KeyboardInterrupt
    return real(*args, **kwargs)
f.score_sharded = interrupted
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_rows(workspace: Path, full_run: Path) -> None:
    proc, run_dir = _frontier(workspace, "resumed", prelude=INTERRUPT_THIRD)
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bars
    assert proc.returncode == 1 and last.startswith("interrupted:"), proc.stderr
    finished = json.loads((run_dir / "partial" / frontier.FINISHED).read_text())
    assert len(finished) == 2 and not (run_dir / "frontier.csv").exists()
    assert len(list((run_dir / "partial").rglob("*.npy"))) == 2  # the third setting's two batches
    proc, _ = _frontier(workspace, "resumed")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("finished by an earlier run") == 2, proc.stdout
    got, want = _rows(run_dir / "frontier.csv"), _rows(full_run / "frontier.csv")
    for row in (*got, *want):
        row.pop("seconds_per_image")  # the time of what each run sampled itself
    assert got == want
    assert _rows(run_dir / "frontier.csv")[2]["seconds_per_image"] == ""  # all its batches were cached
    assert not (run_dir / "partial").exists()


def test_disabled_writes_a_header_and_a_figure_that_says_how_to_turn_it_on(inputs: Path) -> None:
    proc, run_dir = _frontier(inputs, "disabled", params=_params(inputs, enabled=False),
                              samples=inputs / "no-such.npz")  # nothing is read
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "frontier.csv").read_text().splitlines() == [",".join(frontier.COLUMNS)]
    with Image.open(run_dir / "frontier.png") as im:
        assert im.format == "PNG"
    assert frontier.ENABLE in proc.stdout and not (run_dir / "partial").exists()


@pytest.mark.parametrize(("case", "message"), [
    ("missing samples", "no-such.npz not found: run `dvc repro`, whose sample stage writes it"),
    ("steps beyond the model", "frontier.curves[1].steps 50 exceeds the model's diffusion.timesteps 20"),
])
def test_bad_input_is_one_line(inputs: Path, case: str, message: str) -> None:
    if case == "missing samples":
        proc, _ = _frontier(inputs, "bad_samples", samples=inputs / "no-such.npz")
    else:  # refused before any sampling or Inception
        save_samples(inputs / "few.npz", random_images(4), seeds=range(4), config={}, checkpoint_step=7)
        curves = [CURVES[0], {"name": "dpmpp_2m", "steps": [2, 50]}]
        proc, _ = _frontier(inputs, "bad_steps", params=_params(inputs, curves=curves),
                            samples=inputs / "few.npz")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(message), lines


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["uniform", "trailing", "quadratic"])
def test_nfe_is_the_number_of_network_calls(name: str, spacing: str) -> None:
    from factories import tiny_diffusion

    diffusion = GaussianDiffusion(tiny_diffusion())
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.zeros_like(x)

    for steps in (1, 2, 7, 20):
        spec = SamplerConfig(name, steps, spacing)
        calls.clear()
        final(run_sampler(model, diffusion, [0, 1], spec, shape=(3, 4, 4), device="cpu"))
        assert len(calls) == frontier.nfe(spec, 20) == steps, (name, spacing, steps)


def _samples(**config: Any) -> Samples:
    base = {"sampler": SAMPLER, "weights_sha256": "abc", "seconds_per_image": 0.5}
    return Samples(random_images(8), np.arange(10, 18), {**base, **config}, 7)


@pytest.mark.parametrize(("samples", "spec", "seeds"), [
    (_samples(weights_sha256="abd"), SamplerConfig(**SAMPLER), range(10, 16)),
    (_samples(weights_sha256=None), SamplerConfig(**SAMPLER), range(10, 16)),
    (_samples(), SamplerConfig(**{**SAMPLER, "steps": 4}), range(10, 16)),
    (_samples(), SamplerConfig(**{**SAMPLER, "clip_x0": False}), range(10, 16)),
    (_samples(), SamplerConfig(**SAMPLER), range(11, 17)),
    (_samples(), SamplerConfig(**SAMPLER), range(10, 19)),
    (_samples(sampler={"name": "ddim"}), SamplerConfig(**SAMPLER), range(10, 16)),
], ids=["other weights", "an older samples.npz, without the digest", "other steps", "no clipping",
        "other seeds", "more images than there are", "settings it cannot read"])
def test_samples_stand_in_only_for_their_own_setting(samples: Samples, spec: SamplerConfig,
                                                     seeds: range) -> None:
    assert frontier.reused_images(samples, spec, "abc", list(seeds), 20) is None


@pytest.mark.parametrize(("made", "spec"), [
    (SAMPLER, {**SAMPLER, "variance": "beta"}),  # DDIM ignores the variance
    ({**SAMPLER, "steps": 20, "spacing": "quadratic"}, {**SAMPLER, "steps": 20}),  # every timestep of T = 20
    ({**SAMPLER, "steps": 20, "spacing": "trailing"}, {**SAMPLER, "steps": 20}),
])
def test_samples_stand_in_for_their_own_setting(made: dict[str, Any], spec: dict[str, Any]) -> None:
    samples = _samples(sampler=made)
    got = frontier.reused_images(samples, SamplerConfig(**spec), "abc", list(range(10, 16)), 20)
    assert got is not None and np.array_equal(got, samples.images[:6])


def test_spacings_that_visit_other_timesteps_are_other_settings() -> None:
    samples = _samples(sampler={**SAMPLER, "spacing": "quadratic"})  # 3 of 20: [0, 5, 19] against [0, 10, 19]
    assert frontier.reused_images(samples, SamplerConfig(**SAMPLER), "abc", list(range(10, 16)), 20) is None
