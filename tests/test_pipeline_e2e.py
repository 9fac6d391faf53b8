"""The whole DVC pipeline end to end at toy size, in a throwaway copy of the project.

fetch -> ref_stats -> train -> sample -> evaluate -> plots runs with ``dvc repro`` on a tiny
official-format archive and a random-weight Inception; then the test checks the outputs, that a
second repro does nothing, and that ``dvc exp run -S sample.n=5`` reruns only what follows
sampling (the persisted training checkpoint is left alone).

Set ``E2E_ARTIFACTS=<dir>`` to keep the DVC plots page and the PNGs for a look.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import yaml
from committed import committed_text
from PIL import Image

from ddpm_cifar.runtime import config, params_file

if TYPE_CHECKING:  # fixtures hand these over; conftest is not imported at run time
    from conftest import TinyCifarArchive

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Generated state: never copied, so the copy starts from nothing (dvc.lock records a past run).
GENERATED_DIRS = ("data", "models", "metrics", "plots", "samples")
GENERATED_FILES = ("dvc.lock",)
INCEPTION_IN_REPO = "data/inception/inception-random-e2e.pth"  # git-ignored, like the real file
VENV_BIN = Path(sysconfig.get_path("scripts"))
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGE_NAMES = tuple(DVC_YAML["stages"])
# What a sampling param invalidates; everything upstream (training above all) must be skipped.
# (pretrained too: it samples with the same settings; disabled here, it only rewrites its metrics)
AFTER_SAMPLING = {"sample", "evaluate", "frontier", "pretrained", "plots"}
DATA_PARALLEL = {"ref_stats", "train", "sample", "evaluate", "frontier", "pretrained"}  # under torchrun
TIMEOUT_S = 600

# Everything the toy run changes in params.yaml; every other key keeps the project's value (in a
# block such as sample.sampler too).
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "model": dict(dim=8, dim_mults=[1, 2], num_res_blocks=1, full_attn=[False, True], attn_heads=1,
                  attn_dim_head=8),  # image_size stays 32: CIFAR images are 32x32
    "diffusion": dict(timesteps=20),
    "train": dict(steps=4, batch_size=4, grad_accum=1, checkpoint_every=2, fid_every=2, fid_samples=4,
                  fid_sampler=dict(steps=5), fid_batch_size=4, sample_grid_every=0,
                  # The EMA copies the weights at every one of the 4 steps, so sampling uses the trained
                  # weights; with the study's ema_update_every: 10 it would still hold the initial ones.
                  lr=1e-3, ema_update_every=1, ema_start_step=100),
    "sample": dict(n=6, sampler=dict(steps=5), batch_size=4, grid_images=4, strip_seeds=[0, 1],
                   strip_frames=4),
    "fid": dict(inception_weights=INCEPTION_IN_REPO, reference="train", reference_count=12, batch_size=6),
    "wandb": dict(enabled=False),
}


def _git_files(*args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *args], capture_output=True,
                         check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def _copy_project(dest: Path) -> None:
    """The code as the working tree has it (tracked plus untracked-but-not-ignored files), but
    params.yaml as committed: an experiment applied to the workspace must not change the test."""
    files = set(_git_files()) | set(_git_files("--others", "--exclude-standard"))
    for rel in sorted(files):
        top = rel.split("/", 1)[0]
        if (top in GENERATED_DIRS and "/" in rel) or rel in GENERATED_FILES:
            continue
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(committed_text("params.yaml"))


def _env(tmp: Path, repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Import the copy's package, not the editable install's, so that the stages run the copied
    # code and write their bytecode inside the copy, as they would in a user's clone.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo / "src"), env.get("PYTHONPATH")) if p)
    for var in [v for v in env if v.startswith("GIT_") or v.startswith("DVC_")]:
        del env[var]  # e.g. GIT_DIR from a hook would point git at the real repository
    # Users' Python writes __pycache__ next to src/; DVC must not see that as a changed dependency.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),  # not /var/tmp/dvc, shared with others
        WANDB_MODE="disabled",
        CUDA_VISIBLE_DEVICES="",  # the toy run is CPU-sized; no device start-up cost
    )
    return env


class Runner:
    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, env
        self.timings: list[tuple[str, float]] = []

    def __call__(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        t0 = time.perf_counter()
        proc = subprocess.run(list(argv), cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        self.timings.append((" ".join(argv), time.perf_counter() - t0))
        if check and proc.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-8000:]}"
                        f"\n--- stderr\n{proc.stderr[-8000:]}", pytrace=False)
        return proc

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self(["dvc", *args], check=check)

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self(["git", *args])

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)


def init_git(run: Runner) -> None:
    """A git repository in the runner's folder, with a committer and no signing."""
    run.git("init", "-q")
    for key, value in (("user.name", "toy project"), ("user.email", "toy@example.invalid"),
                       ("commit.gpgsign", "false")):
        run.git("config", key, value)


def toy_repo(root: Path) -> tuple[Path, Runner]:
    """``root/repo``: a copy of the project (:func:`_copy_project`) in a new git repository, with
    nothing committed yet, and a runner for commands in it."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    _copy_project(repo)
    run = Runner(repo, _env(root, repo))
    init_git(run)
    return repo, run


def _tiny_params(base: dict[str, Any], archive: TinyCifarArchive) -> dict[str, Any]:
    params = {section: dict(values or {}) for section, values in base.items()}
    overrides = {**TINY_PARAMS, "data": dict(source=str(archive.path), md5=archive.md5)}
    for section, values in overrides.items():
        for key, value in values.items():
            assert key in params.get(section, {}), f"params.yaml has no {section}.{key} to override"
            params[section][key] = {**params[section][key], **value} if isinstance(value, dict) else value
    assert set(params) == set(config.SECTIONS)
    for section, cls in config.SECTIONS.items():  # fail here, not three stages into dvc repro
        params_file.parse_section(section, params[section], cls)
    return params


def _declared_outs(params: dict[str, Any]) -> list[str]:
    """Every stage output, with ``${section.key}`` filled in from ``params``."""
    def fill(path: str) -> str:
        def value(m: re.Match[str]) -> str:
            section, key = m.group(1).strip().split(".", 1)
            return str(params[section][key])
        return re.sub(r"\$\{([^}]+)\}", value, path)

    outs = []
    for stage in DVC_YAML["stages"].values():
        for entry in stage.get("outs") or []:
            outs.extend(fill(p) for p in ([entry] if isinstance(entry, str) else entry))
    return outs


def _read_tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]


def _live_rows(repo: Path, *names: str) -> list[dict[str, str]]:
    """DVCLive's histories of ``names`` (dvclive/plots/metrics/NAME.tsv) joined by step: one row per step of
    the first, with every name's value at that step."""
    by_name = {name: {r["step"]: r[name] for r in _read_tsv(repo / f"dvclive/plots/metrics/{name}.tsv")}
               for name in names}
    return [{"step": step, **{name: by_name[name][step] for name in names}} for step in by_name[names[0]]]


def _keep_artifacts(repo: Path, plots_html: Path, label: str) -> None:
    target = os.environ.get("E2E_ARTIFACTS")
    if not target:
        return
    dest = Path(target) / label
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(plots_html, dest / "dvc_plots")
    for png in sorted((repo / "plots").glob("*.png")):
        (dest / "plots").mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, dest / "plots" / png.name)
    for metric in sorted((repo / "metrics").glob("*")):
        (dest / "metrics").mkdir(parents=True, exist_ok=True)
        shutil.copy2(metric, dest / "metrics" / metric.name)


def _assert_metrics_are_numbers(repo: Path) -> None:
    """What `dvc metrics show` and `dvc exp show` list: flat numbers and booleans only (provenance,
    strings and hashes are in reports/)."""
    for rel in _paths_of(DVC_YAML["metrics"]):
        values = json.loads((repo / rel).read_text())
        bad = {k: v for k, v in values.items() if not isinstance(v, (int, float, bool)) or v is None}
        assert not bad, f"{rel} holds non-numbers {bad}"


def _paths_of(entries: list[Any]) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def _stale(run: Runner) -> set[str]:
    """Stages `dvc status` calls changed."""
    out = run.dvc("status", "--json").stdout
    return set(json.loads(out or "{}"))


def _check_reruns_follow_imports(run: Runner, repo: Path) -> None:
    """Each stage depends on the modules it imports, and nothing else: an edit to the app reruns
    nothing; an edit to the samplers reruns what samples, never fetch, inception or ref_stats. A
    run-only param (W&B) reruns nothing either."""
    for rel, expect in (("src/ddpm_cifar/app/ui.py", set()),
                        ("src/ddpm_cifar/diffusion/generate.py",
                         {"train", "sample", "evaluate", "frontier", "pretrained"}),
                        ("src/ddpm_cifar/diffusion/samplers.py",
                         {"train", "sample", "evaluate", "frontier", "pretrained"})):
        path = repo / rel
        before = path.read_bytes()
        path.write_bytes(before + b"\n# an edit\n")
        try:
            assert _stale(run) == expect, f"after editing {rel}: {_stale(run)}"
        finally:
            path.write_bytes(before)
    params = repo / "params.yaml"
    before = params.read_bytes()
    raw = params_file.read_yaml(params)
    raw["wandb"]["enabled"] = True
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        assert _stale(run) == set(), "turning W&B on marks stages changed"
    finally:
        params.write_bytes(before)
    assert _stale(run) == set()


def _ran(output: str) -> set[str]:
    return {name for name in STAGE_NAMES if f"Running stage '{name}'" in output}


def test_pipeline_end_to_end(tmp_path: Path, tiny_cifar_archive: TinyCifarArchive,
                             e2e_random_inception: Path) -> None:
    repo, run = toy_repo(tmp_path)
    if not (repo / ".dvc").is_dir():
        run.dvc("init", "-q")
    assert "analytics = false" in (repo / ".dvc" / "config").read_text()

    (repo / INCEPTION_IN_REPO).parent.mkdir(parents=True)
    shutil.copy(e2e_random_inception, repo / INCEPTION_IN_REPO)
    params = _tiny_params(params_file.read_yaml(repo / "params.yaml"), tiny_cifar_archive)
    (repo / "params.yaml").write_text(
        "# the end-to-end test's toy run (tests/test_pipeline_e2e.py)\n"
        + yaml.safe_dump(params, sort_keys=False, default_flow_style=False)
    )
    assert params_file.read_yaml(repo / "params.yaml") == params
    run.commit("toy project")

    # --- first repro: every stage runs ---------------------------------------------------------
    first = run.dvc("repro")
    assert _ran(first.stdout + first.stderr) == set(STAGE_NAMES), first.stdout

    missing = [out for out in _declared_outs(params) if not (repo / out).exists()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}"

    weights = repo / INCEPTION_IN_REPO  # a file put there by hand is kept as it is
    assert weights.read_bytes() == e2e_random_inception.read_bytes(), "the Inception file was replaced"

    report = json.loads((repo / "reports/fid.json").read_text())
    assert isinstance(report["fid"], float) and math.isfinite(report["fid"]), report
    assert report["n_samples"] == 6
    assert report["inception_official"] is False
    assert report["comparable"] is False
    reasons = report["not_comparable_because"]
    assert reasons and any("Inception" in r for r in reasons), reasons
    assert report["sampler"]["steps"] == 5 and report["sampler"]["name"] == "ddpm", report
    _assert_metrics_are_numbers(repo)
    # Six samples: KID and precision/recall against the 12 reference images' stored features (KID on
    # subsets of 3, half the samples), no Inception Score (it needs 10 splits).
    assert json.loads((repo / "metrics/fid.json").read_text()) == {
        "fid": report["fid"], "kid": report["kid"], "precision": report["precision"],
        "recall": report["recall"], "n_samples": 6, "reference_n": 12, "comparable": False}
    kid = report["kid_detail"]
    assert kid["subset_size"] == 3 and kid["std"] > 0 and "half the 6 samples" in kid["error_bar"], kid
    assert report["precision_recall"]["n"] == 6 and "pool3" in report["precision_recall"]["features"]
    assert report["weights"] == "final" and report["checkpoint_step"] == 4
    # A FID that is not comparable is never on the chart of published numbers.
    published = (repo / "plots/fid_published.csv").read_text()
    assert "BigGAN (quoted)" in published and "ours" not in published, published
    assert "ours" in (repo / "plots/fid_measured.csv").read_text()

    fid_rows = _live_rows(repo, "fid", "kid", "kid_std")
    assert [int(r["step"]) for r in fid_rows] == [2, 4], fid_rows
    assert all(math.isfinite(float(r[c])) for r in fid_rows for c in ("fid", "kid", "kid_std")), fid_rows
    best = json.loads((repo / "reports/train.json").read_text())["best_weights"]
    kids = {int(r["step"]): float(r["kid"]) for r in fid_rows}
    assert best["metric"] == "kid" and best["step"] == min(kids, key=kids.get), (best, kids)
    assert torch.load(repo / "models/ema_best.pt", weights_only=True)["step"] == best["step"]
    loss_rows = _live_rows(repo, "loss", "lr")
    assert [int(r["step"]) for r in loss_rows] == [1, 2, 3, 4], loss_rows
    assert all(math.isfinite(float(r["loss"])) for r in loss_rows), loss_rows
    train_json = json.loads((repo / "reports/train.json").read_text())
    assert train_json["resumed_from_step"] == 0, train_json
    live = json.loads((repo / "dvclive/metrics.json").read_text())  # DVCLive's summary: the stage's metrics
    assert live["step"] == 4 and live["loss"] == float(loss_rows[-1]["loss"]) and live["kid"] == kids[4], live
    assert {"final_loss", "images_per_second", "parameters", "best_step", "fid", "kid_std", "lr"} <= set(live)

    with np.load(repo / "samples/samples.npz") as f:
        assert f["images"].shape == (6, 32, 32, 3) and f["images"].dtype == np.uint8
        assert f["seeds"].tolist() == list(range(6))
        assert int(f["checkpoint_step"]) == 4

    for png in ("sample_grid.png", "denoise_strip.png", "fid_comparison.png", "loss_curve.png",
                "fid_curve.png"):
        with Image.open(repo / "plots" / png) as im:
            im.load()
            assert im.format == "PNG" and im.width > 0 and im.height > 0, png

    # --- dvc plots show renders every plot --------------------------------------------------------
    html_dir = tmp_path / "dvc_plots"  # outside the repo: the tree stays clean for exp run
    run.dvc("plots", "show", "-o", str(html_dir))
    html = (html_dir / "index.html").read_text()
    for title in ("Training loss", "FID of this model during training", "KID of this model during training",
                  "FID beside published numbers", "FID measured by this pipeline"):
        assert title in html, f"plot {title!r} missing from dvc plots show"
    _keep_artifacts(repo, html_dir, "repro")

    # --- nothing changed: a second repro runs nothing --------------------------------------------
    run.commit("toy run")  # dvc.lock and the .gitignore files DVC wrote, as after a real run
    ckpt = repo / "models/checkpoint.pt"
    ckpt_mtime = ckpt.stat().st_mtime_ns
    second = run.dvc("repro")
    out = second.stdout + second.stderr
    assert not _ran(out), f"second dvc repro ran stages:\n{out}"
    for name in STAGE_NAMES:
        assert f"Stage '{name}' didn't change, skipping" in out, f"{name}:\n{out}"
    assert "Data and pipelines are up to date." in out, out
    status = run.dvc("status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
    assert ckpt.stat().st_mtime_ns == ckpt_mtime
    _check_reruns_follow_imports(run, repo)

    # --- an experiment on a sampling param reruns only sample -> evaluate -> plots ---------------
    exp = run.dvc("exp", "run", "-S", "sample.n=5")
    out = exp.stdout + exp.stderr
    assert _ran(out) == AFTER_SAMPLING, f"exp run ran {sorted(_ran(out))}:\n{out}"
    assert ckpt.stat().st_mtime_ns == ckpt_mtime, "exp run touched the training checkpoint"
    assert json.loads((repo / "metrics/fid.json").read_text())["n_samples"] == 5
    assert params_file.read_yaml(repo / "params.yaml")["sample"]["n"] == 5
    _assert_metrics_are_numbers(repo)
    with Image.open(repo / "plots/fid_comparison.png") as im:
        im.load()
    status = run.dvc("status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
    run.dvc("plots", "show", "-o", str(tmp_path / "dvc_plots_exp"))
    _keep_artifacts(repo, tmp_path / "dvc_plots_exp", "exp_sample_n5")

    # --- two processes: the data-parallel stages rerun under torchrun -------------------------------
    # Two more steps: the one-process checkpoint at step 4 continues on two processes.
    one_proc_losses = [float(r["loss"]) for r in _live_rows(repo, "loss")]
    with np.load(repo / "data/fid_ref.npz") as f:
        one_proc_ref = {k: f[k] for k in ("mu", "sigma")}
    exp = run.dvc("exp", "run", "-S", "distributed.nproc_per_node=2", "-S", "train.steps=6")
    out = exp.stdout + exp.stderr
    # plots reruns only if fid.json changed
    assert _ran(out) - {"plots"} == DATA_PARALLEL, f"exp run ran {sorted(_ran(out))}:\n{out}"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for name in DATA_PARALLEL:
        assert lock[name]["params"]["params.yaml"]["distributed"]["nproc_per_node"] == 2, name
        assert "--nproc-per-node 2" in lock[name]["cmd"], lock[name]["cmd"]
    train_json = json.loads((repo / "reports/train.json").read_text())
    assert train_json["resumed_from_step"] == 4, train_json
    assert train_json["world_history"] == [[0, 4, 1], [4, 6, 2]], train_json
    losses = [float(r["loss"]) for r in _live_rows(repo, "loss")]
    assert losses[:4] == one_proc_losses and len(losses) == 6 and all(map(math.isfinite, losses))
    # Inception batches split over two processes. Not bit for bit here: torchrun runs each of several
    # processes on one CPU thread (OMP_NUM_THREADS=1), the single process used two, and the thread
    # count moves the last float32 bits of the convolutions (tests/test_distributed.py compares
    # equal thread counts, bit for bit).
    with np.load(repo / "data/fid_ref.npz") as f:
        for key, value in one_proc_ref.items():
            np.testing.assert_allclose(f[key], value, rtol=1e-5, atol=1e-7)
    assert json.loads((repo / "metrics/fid.json").read_text())["n_samples"] == 5
    print("\n".join(f"{seconds:6.1f}s  {cmd}" for cmd, seconds in run.timings))
