"""Damaged files that the pipeline reads back: each stops its stage with one line that names the file
and says how to make it again, never with a traceback; and every such hint is a command that works as
written.

The first tests run the stages' own code in-process on damaged files and compare the whole line. The
slow test at the end builds a toy DVC project with the real dvc.yaml's outputs (same paths, same
``persist`` and ``cache`` flags, the same order of stages) whose stages write small valid files, the
inception and plots stages being the real ones; it damages each file, takes the hint from the error
line, runs its commands and checks that the file reads back good.
"""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from committed import committed_text
from factories import one_thread, random_images, tiny_diffusion, tiny_model, tiny_train, train_outputs

from ddpm_cifar.data.splits import load_meta
from ddpm_cifar.diffusion import generate
from ddpm_cifar.evaluation import fid, inception, plots, reports
from ddpm_cifar.evaluation.scoring import Scores
from ddpm_cifar.models import checkpoint
from ddpm_cifar.runtime.config import SamplerConfig
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.fileio import file_digest
from ddpm_cifar.runtime.loaders import live_metric_path
from ddpm_cifar.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sysconfig.get_path("scripts"))

SAMPLES_FIX = "remove it and rerun `dvc repro`, whose sample stage writes it again"
NOT_NPZ = "truncated, corrupt or another kind of file: its bytes are not in the expected format"


def _run_stage(name: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """Run stages/<name>.py in this process, in the current folder; the line it exits with ('' when it
    finishes). A traceback fails the test with the exception itself."""
    monkeypatch.setattr(sys, "argv", [f"stages/{name}.py", *args])
    try:
        runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="__main__")
    except SystemExit as exc:
        return str(exc.code)
    return ""


# --- the evaluate stage and samples/samples.npz ------------------------------------------------------

def _write_samples(path: Path, **members: Any) -> None:
    """A sample set as the sample stage writes it, with ``members`` changed (None: left out)."""
    good = dict(images=random_images(4, size=8), seeds=np.arange(4), config=json.dumps({"n": 4}),
                checkpoint_step=3)
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in {**good, **members}.items() if v is not None})


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _cut_in_half(path: Path) -> None:
    _write_samples(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGED_SAMPLES: dict[str, tuple[Callable[[Path], None], str]] = {
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), NOT_NPZ),
    "empty": (lambda p: p.write_bytes(b""), "empty or cut short"),
    "bad-zip": (_cut_in_half, "truncated or corrupt: a damaged zip archive"),
    "object-array": (lambda p: _write_samples(p, images=np.array([{"a": 1}], dtype=object)),
                     "it holds arrays of Python objects, which a safe load refuses"),
    "missing-key": (lambda p: _write_samples(p, config=None), "it has no 'config' array"),
    "one-array": (lambda p: p.write_bytes(_npy(random_images(4, size=8))),
                  "it holds a single array, not named arrays"),
    "float-images": (lambda p: _write_samples(p, images=np.zeros((4, 8, 8, 3), np.float32)),
                     "its 'images' is float32, not uint8"),
    "images-without-channels": (lambda p: _write_samples(p, images=np.zeros((4, 8, 8), np.uint8)),
                                "its 'images' has shape (4, 8, 8), not (N, H, W, 3)"),
    "seeds-of-other-images": (lambda p: _write_samples(p, seeds=np.arange(5)),
                              "its 'seeds' has shape (5,): N is 4 in 'images'"),
    "config-not-json": (lambda p: _write_samples(p, config="{sampler: ddpm"),
                        "its 'config' is not the JSON text of an object"),
    "step-not-a-number": (lambda p: _write_samples(p, checkpoint_step="three"),
                          "its 'checkpoint_step' is <U5, not integers"),
}


@pytest.fixture
def evaluate_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, e2e_random_inception: Path) -> Path:
    """A folder the evaluate stage runs in: params, reference statistics and Inception weights good."""
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load(committed_text("params.yaml"))
    params["fid"]["inception_weights"] = str(e2e_random_inception)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    dim = inception.FEATURE_DIM
    fid.save_reference("data/fid_ref.npz", fid.FidStats(np.zeros(dim), np.eye(dim), 5), {})
    Path("samples").mkdir()
    return tmp_path


@pytest.mark.parametrize("kind", DAMAGED_SAMPLES)
def test_damaged_samples_stop_evaluate_with_one_line(evaluate_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                     kind: str) -> None:
    damage, why = DAMAGED_SAMPLES[kind]
    damage(Path("samples/samples.npz"))
    line = _run_stage("evaluate", monkeypatch)
    assert line == f"error: samples/samples.npz is not a sample set .npz ({why}): {SAMPLES_FIX}"
    assert not Path("metrics/fid.json").exists()


@pytest.mark.slow  # ~25 s on 2 cores: Inception, and the square roots of 2048 x 2048 covariances
def test_good_samples_are_scored(evaluate_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_samples(Path("samples/samples.npz"))
    assert _run_stage("evaluate", monkeypatch) == ""
    report = json.loads(Path("reports/fid.json").read_text())
    assert report["n_samples"] == 4 and report["checkpoint_step"] == 3


def test_samples_round_trip(tmp_path: Path) -> None:
    images = random_images(5, size=8)
    generate.save_samples(tmp_path / "s.npz", images, seeds=[3, 4, 5, 6, 7], config={"n": 5},
                          checkpoint_step=9)
    got = generate.load_samples(tmp_path / "s.npz")
    assert np.array_equal(got.images, images) and got.seeds.tolist() == [3, 4, 5, 6, 7]
    assert got.config == {"n": 5} and got.checkpoint_step == 9


def test_missing_samples_say_which_stage_writes_them(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        generate.load_samples(tmp_path / "samples.npz")
    assert str(info.value) == (f"{tmp_path}/samples.npz not found: run `dvc repro`, whose sample stage "
                               "writes it")


# --- the plots stage: reports, logs and baselines -------------------------------------------------------

def _report(name: str | None = None) -> dict[str, Any]:
    info = inception.InceptionInfo("inception.pth", "0" * 64, official=False)
    out = reports.fid_report(Scores(n=4, fid=12.5), sample_cfg={"sampler": {"name": "ddpm"}}, ref_meta={},
                             info=info)
    return {**out, "name": name, "enabled": True} if name else out


def _plots_inputs(root: Path) -> None:
    (root / "reports").mkdir(exist_ok=True)
    (root / "metrics").mkdir(exist_ok=True)
    (root / "reports/fid.json").write_text(json.dumps(_report()))
    off = {"name": reports.PRETRAINED, "enabled": False}  # what the pretrained stage writes when disabled
    (root / "reports/pretrained_fid.json").write_text(json.dumps(off))
    (root / "dvclive/plots/metrics").mkdir(parents=True, exist_ok=True)
    (root / LOSS_LOG).write_text("step\tloss\n1\t0.5\n2\t0.4\n")
    (root / FID_LOG).write_text("step\tfid\n2\t300.5\n")
    (root / KID_LOG).write_text("step\tkid\n2\t0.25\n")
    (root / KID_STD_LOG).write_text("step\tkid_std\n2\t0.01\n")
    shutil.copy(ROOT / "baselines.yaml", root / "baselines.yaml")


EVALUATE_FIX = "remove it and rerun `dvc repro`, whose evaluate stage writes it again"
PRETRAINED_FIX = "remove it and rerun `dvc repro`, whose pretrained stage writes it again"
LOG_FIX = ("remove it and rerun `dvc repro`, whose train stage starts it again (from the step training "
           "resumes at)")
BASELINES_FIX = "restore it with `git checkout baselines.yaml`"
FID_REPORT, PRETRAINED_REPORT = "reports/fid.json", "reports/pretrained_fid.json"
LOSS_LOG, FID_LOG = "dvclive/plots/metrics/loss.tsv", "dvclive/plots/metrics/fid.tsv"
KID_LOG, KID_STD_LOG = "dvclive/plots/metrics/kid.tsv", "dvclive/plots/metrics/kid_std.tsv"
# file, its damaged content, what it should be, why it is not, the fix
DAMAGED_PLOT_INPUTS = {
    "fid-report-not-json": (FID_REPORT, '{"fid": 12.', "an FID report",
                            "not JSON: Expecting ',' delimiter at line 1 column 11", EVALUATE_FIX),
    "fid-report-binary": (FID_REPORT, b"\xff\xfe\x00garbage", "an FID report", "not UTF-8 text",
                          EVALUATE_FIX),
    "fid-report-a-list": (FID_REPORT, "[1, 2]", "an FID report", "it holds a JSON array, not an object",
                          EVALUATE_FIX),
    "fid-report-without-fid": (FID_REPORT, json.dumps({**_report(), "fid": None}), "an FID report",
                               "its 'fid' is null, not a finite number", EVALUATE_FIX),
    "fid-report-nan": (FID_REPORT, json.dumps({**_report(), "fid": float("nan")}), "an FID report",
                       "its 'fid' is NaN, not a finite number", EVALUATE_FIX),
    "pretrained-report-empty": (PRETRAINED_REPORT, "", "an FID report",
                                "not JSON: Expecting value at line 1 column 1", PRETRAINED_FIX),
    "pretrained-report-enabled-without-fid": (
        PRETRAINED_REPORT, json.dumps({"name": reports.PRETRAINED, "enabled": True}), "an FID report",
        "it has no 'fid'", PRETRAINED_FIX),
    "loss-log-binary": (LOSS_LOG, np.random.default_rng(0).bytes(300), "a training log", "not UTF-8 text",
                        LOG_FIX),
    "loss-log-bad-number": (LOSS_LOG, "step\tloss\n1\t0.5\n2\tx\n", "a training log",
                            "line 3 is '2\\tx', not a step and 1 finite number", LOG_FIX),
    "fid-log-other-columns": (FID_LOG, "step\tloss\n1\t0.5\n", "a training log",
                              "its header is 'step\\tloss', not 'step\\tfid'", LOG_FIX),
    "kid-log-other-steps": (KID_LOG, "step\tkid\n3\t0.25\n", "a training log",
                            "its steps are not those of fid.tsv beside it", LOG_FIX),
    "baselines-not-yaml": ("baselines.yaml", "baselines: [name: x\n", "a list of baselines",
                           "not YAML: expected ',' or ']', but got '<stream end>' at line 2 column 1",
                           BASELINES_FIX),
    "baselines-without-fid": ("baselines.yaml", "baselines:\n  - name: x\n    samples: 1\n",
                              "a list of baselines", "baseline 1 has no 'fid'", BASELINES_FIX),
}


@pytest.mark.parametrize("kind", DAMAGED_PLOT_INPUTS)
def test_damaged_plot_inputs_stop_plots_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str) -> None:
    rel, content, what, why, fix = DAMAGED_PLOT_INPUTS[kind]
    monkeypatch.chdir(tmp_path)
    _plots_inputs(tmp_path)
    path = Path(rel)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert _run_stage("plots", monkeypatch) == f"error: {rel} is not {what} ({why}): {fix}"


def test_a_kid_history_without_its_std_stops_plots_with_one_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _plots_inputs(tmp_path)
    Path(KID_STD_LOG).unlink()
    expected = f"error: {KID_STD_LOG} not found: run `dvc repro`, whose train stage writes it"
    assert _run_stage("plots", monkeypatch) == expected


def test_good_plot_inputs_are_drawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _plots_inputs(tmp_path)
    # A line torn by a crash mid-write (no newline at the end) is not a damaged log.
    with open(LOSS_LOG, "a") as f:
        f.write("3\t0.3")
    assert _run_stage("plots", monkeypatch) == ""
    assert Path("plots/loss_curve.png").is_file() and Path("plots/fid_published.csv").is_file()


# --- training's own logs, read back on resume ------------------------------------------------------------

@pytest.mark.parametrize(("content", "why"), [
    (b"step\tloss\n1\t0.5\n\xff\xfe\n", "not UTF-8 text"),
    (b"step\tloss\n1\tnan\n2\t0.4\n", "line 2 is '1\\tnan', not a step and 1 finite number"),
])
def test_a_damaged_loss_log_stops_a_resume_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         content: bytes, why: str) -> None:
    monkeypatch.chdir(tmp_path)
    outputs = train_outputs(Path("metrics"))
    args = dict(images=random_images(12, size=8, seed=3), data_id="x", outputs=outputs,
                device=torch.device("cpu"), log=lambda _: None)
    with one_thread():
        train(tiny_model(), tiny_diffusion(), tiny_train(steps=3), **args)
        live_metric_path(outputs.live, "loss").write_bytes(content)
        with pytest.raises(UserError) as info:
            train(tiny_model(), tiny_diffusion(), tiny_train(steps=4), **args)
    log = "metrics/dvclive/plots/metrics/loss.tsv"
    assert str(info.value) == f"{log} is not a training log ({why}): {LOG_FIX}"


# --- the sample cache: a damaged batch is sampled again ---------------------------------------------------

def test_a_damaged_cached_batch_or_key_is_sampled_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    from ddpm_cifar.diffusion.process import GaussianDiffusion
    from ddpm_cifar.models.unet import UNet

    net, diffusion = UNet(tiny_model()).eval(), GaussianDiffusion(tiny_diffusion())
    options = dict(batch_size=2, shape=(3, 8, 8), device="cpu", progress=False, cache_key="k")
    spec = SamplerConfig("ddim", 2)
    with one_thread():
        clean = generate.generate_images(net, diffusion, [0, 1, 2, 3], spec, **options)
        cache = tmp_path / "partial"
        generate.generate_images(net, diffusion, [0, 1, 2, 3], spec, cache_dir=cache, **options)
        other_shape = np.zeros((2, 8, 8), np.uint8)
        for damage in (lambda: (cache / "00000002-2.npy").write_bytes(b"\x93NUMPY garbage"),
                       lambda: np.save(cache / "00000000-2.npy", other_shape),
                       lambda: (cache / "key.txt").write_bytes(b"\xff\xfe")):
            damage()
            again = generate.generate_images(net, diffusion, [0, 1, 2, 3], spec, cache_dir=cache, **options)
            assert np.array_equal(again, clean)


# --- every hint, run in a toy DVC project -----------------------------------------------------------------

INCEPTION = "data/inception/inception-random-seed0.pth"

# The toy stages: each writes its outputs as small valid files; inception and plots are the real ones.
TOY_STAGES = r'''
import json, sys
from pathlib import Path
import numpy as np

name = sys.argv[1]
for folder in ("models", "metrics", "reports", "plots", "samples"):
    Path(folder).mkdir(exist_ok=True)
if name == "fetch":
    Path("data/cifar10").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        np.savez(f"data/cifar10/{split}.npz", images=np.zeros((4, 32, 32, 3), np.uint8),
                 labels=np.zeros(4, np.int64))
    Path("data/cifar10/meta.json").write_text(json.dumps({"source": "toy", "official": False}))
elif name == "ref_stats":
    from ddpm_cifar.evaluation import fid
    from ddpm_cifar.runtime.fileio import file_digest
    meta = {"reference": "toy", "inception_sha256": file_digest(sys.argv[2])}
    fid.save_reference("data/fid_ref.npz", fid.FidStats(np.zeros(3), np.eye(3), 4), meta)
elif name == "train":
    import torch
    from ddpm_cifar.models import checkpoint
    from ddpm_cifar.models.unet import UNet
    from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig
    model_cfg = ModelConfig(image_size=8, channels=3, dim=8, dim_mults=(1,), num_res_blocks=1,
                            full_attn=(False,), attn_heads=1, attn_dim_head=8, dropout=0.0, arch="unet")
    payload = checkpoint.model_payload(model_cfg, DiffusionConfig(timesteps=10, beta_schedule="linear",
                                                                  objective="pred_noise", min_snr_gamma=None))
    torch.manual_seed(0)
    weights = UNet(model_cfg).state_dict()
    checkpoint.save("models/checkpoint.pt", {**payload, "step": 2, "model": weights, "ema": weights})
    checkpoint.save("models/ema.pt", {**payload, "step": 2, "ema": weights})
    checkpoint.save("models/ema_best.pt", {**payload, "step": 2, "ema": weights})
    Path("dvclive/plots/metrics").mkdir(parents=True, exist_ok=True)
    Path("dvclive/plots/metrics/loss.tsv").write_text("step\tloss\n1\t0.9\n2\t0.8\n")
    Path("dvclive/plots/metrics/fid.tsv").write_text("step\tfid\n2\t300.0\n")
    Path("dvclive/metrics.json").write_text(json.dumps({"step": 2, "loss": 0.8}))
    Path("reports").mkdir(exist_ok=True)
    Path("reports/train.json").write_text(json.dumps({"resumed_from_step": 0}))
elif name == "sample":
    from ddpm_cifar.diffusion import generate
    images = np.zeros((4, 8, 8, 3), np.uint8)
    generate.save_samples("samples/samples.npz", images, seeds=range(4), config={"n": 4},
                          checkpoint_step=2)
    for png in ("sample_grid", "denoise_strip"):
        Path(f"plots/{png}.png").write_bytes(b"png")
elif name == "frontier":
    Path("plots/frontier.csv").write_text("sampler,curve,nfe,fid,kid\n")
    Path("plots/frontier.png").write_bytes(b"png")
elif name in ("evaluate", "pretrained"):
    from ddpm_cifar.evaluation import reports
    from ddpm_cifar.evaluation.inception import InceptionInfo
    from ddpm_cifar.evaluation.scoring import Scores
    report = reports.fid_report(Scores(n=4, fid=12.5), sample_cfg={"n": 4}, ref_meta={},
                                info=InceptionInfo("x", "0" * 64, False))
    if name == "pretrained":
        report = {"name": reports.PRETRAINED, "enabled": False}
    stem = "fid" if name == "evaluate" else "pretrained_fid"
    Path("reports").mkdir(exist_ok=True)
    Path(f"reports/{stem}.json").write_text(json.dumps(report))
    Path(f"metrics/{stem}.json").write_text(json.dumps(reports.metrics_of(report)))
'''


def _toy_dvc_yaml() -> dict[str, Any]:
    """The real dvc.yaml's stages with their outputs and the data they depend on, commands replaced by
    TOY_STAGES's (the inception and plots stages: the real scripts)."""
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def fill(entry: Any) -> Any:
        text = yaml.safe_dump(entry).replace("${fid.inception_weights}", INCEPTION)
        return yaml.safe_load(text)

    stages = {}
    for name, stage in real.items():
        deps = [fill(d) for d in stage.get("deps", []) if not str(d).startswith(("src/", "stages/"))]
        cmd = f"python toy_stages.py {name}" + (f" {INCEPTION}" if name == "ref_stats" else "")
        if name in ("inception", "plots"):
            cmd = f"python {ROOT}/stages/{name}.py"
        stages[name] = {"cmd": cmd, **({"params": ["fid.inception_weights"]} if name == "inception" else {}),
                        "deps": deps or ["toy_stages.py"], "outs": [fill(o) for o in stage["outs"]]}
    return {"stages": stages}


class Toy:
    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "DVC_"))}
        self.env.update(PATH=f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                        DVC_SITE_CACHE_DIR=str(root.parent / "dvc-site-cache"), CUDA_VISIBLE_DEVICES="",
                        WANDB_MODE="disabled")

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(shlex.split(command), cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc


def _make_toy(root: Path) -> Toy:
    root.mkdir()
    toy = Toy(root)
    params = yaml.safe_load(committed_text("params.yaml"))
    params["fid"]["inception_weights"] = INCEPTION
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text(yaml.safe_dump(_toy_dvc_yaml(), sort_keys=False))
    (root / "toy_stages.py").write_text(TOY_STAGES)
    shutil.copy(ROOT / "baselines.yaml", root / "baselines.yaml")
    (root / "scripts").mkdir()
    for script in ("make_random_inception.py", "get_inception.py"):
        shutil.copy(ROOT / "scripts" / script, root / "scripts" / script)
    for command in ("git init -q", "git config user.email toy@example.invalid", "git config user.name toy",
                    "git config commit.gpgsign false", "dvc init -q", "dvc repro", "git add -A",
                    "git commit -q -m toy"):
        toy.run(command)
    return toy


def _hints(message: str) -> list[tuple[str | None, str]]:
    """(what to remove first or None, command) for each backticked command in ``message``."""
    hints = []
    for found in re.finditer(r"`([^`]+)`", message):
        removal = re.search(r"remove (\S+) and (?:re)?run $", message[: found.start()])
        hints.append((removal[1] if removal else None, found[1]))
    return hints


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(2048))


def _other_inception(path: Path) -> None:
    inception.save_random_inception(path, seed=1)  # good weights, but not those the statistics were made with


def _check_same_inception() -> None:
    reports.check_same_inception(fid.load_reference("data/fid_ref.npz").meta,
                                 inception.InceptionInfo(INCEPTION, file_digest(INCEPTION), official=False))


# file damaged, how, the checked read the stage does, the commands its hints must hold
HINTED: list[tuple[str, Callable[[Path], None], Callable[[], object], list[str]]] = [
    ("samples/samples.npz", _cut_in_half, lambda: generate.load_samples("samples/samples.npz"),
     ["dvc repro"]),
    ("models/checkpoint.pt", _random_bytes, lambda: checkpoint.load("models/checkpoint.pt"),
     ["dvc repro", "dvc checkout --force models/checkpoint.pt"]),
    ("models/ema.pt", _random_bytes, lambda: checkpoint.load_model("models/ema.pt"),
     ["dvc repro", "dvc checkout --force models/ema.pt"]),
    ("data/fid_ref.npz", _random_bytes, lambda: fid.load_reference("data/fid_ref.npz"), ["dvc repro"]),
    (FID_REPORT, _random_bytes, lambda: reports.load_report(FID_REPORT, "evaluate"), ["dvc repro"]),
    (PRETRAINED_REPORT, _random_bytes, lambda: reports.load_report(PRETRAINED_REPORT, "pretrained"),
     ["dvc repro"]),
    (LOSS_LOG, _random_bytes, lambda: plots.load_training_log("dvclive", ("loss",)), ["dvc repro"]),
    (FID_LOG, _random_bytes, lambda: plots.load_training_log("dvclive", ("fid",)), ["dvc repro"]),
    ("data/cifar10/meta.json", _random_bytes, lambda: load_meta(Path("data/cifar10")),
     ["dvc checkout --force data/cifar10", "dvc repro"]),
    ("baselines.yaml", _random_bytes, lambda: reports.load_baselines("baselines.yaml"),
     ["git checkout baselines.yaml"]),
    (INCEPTION, _random_bytes, lambda: inception.load_inception(INCEPTION),
     ["dvc repro", f"python scripts/make_random_inception.py {INCEPTION} --seed 0"]),
    (INCEPTION, _other_inception, _check_same_inception, ["dvc repro ref_stats"]),
]


class _Download(io.BytesIO):
    """What urlopen returns, serving ``data``."""

    headers: dict[str, str] = {}


def test_the_official_inception_hint_replaces_a_damaged_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, e2e_random_inception: Path) -> None:
    """`python scripts/get_inception.py PATH`, the hint for a damaged official file, with the download
    served here (the test runs offline): the damaged file is replaced by one that loads."""
    monkeypatch.chdir(tmp_path)
    path = Path("data/inception") / inception.OFFICIAL_INCEPTION_FILENAME
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError) as info:
        inception.load_inception(path)
    [(removal, command)] = _hints(str(info.value))
    assert removal is None and command == f"python scripts/get_inception.py {path}"
    good = e2e_random_inception.read_bytes()
    monkeypatch.setattr(inception, "OFFICIAL_INCEPTION_SHA256_PREFIX", file_digest(e2e_random_inception)[:8])
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: _Download(good))
    monkeypatch.setattr(sys, "argv", shlex.split(command)[1:])
    runpy.run_path(str(ROOT / "scripts" / "get_inception.py"), run_name="__main__")
    assert path.read_bytes() == good
    inception.load_inception(path)


@pytest.mark.slow  # ~1 min on 2 cores: a DVC project, two dozen dvc and stage runs
def test_every_hint_restores_a_good_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = _make_toy(tmp_path / "toy")
    monkeypatch.chdir(toy.root)  # the stages name their files relative to the project, as the hints do
    for rel, damage, read, expected in HINTED:
        for command in expected:
            damage(Path(rel))
            with pytest.raises(UserError) as info:
                read()
            message = str(info.value)
            assert "\n" not in message and rel in message, message
            hints = _hints(message)
            assert [c for _, c in hints] == expected, message
            removal = dict((c, r) for r, c in hints)[command]
            if removal is not None:
                assert removal == "it", message
                Path(rel).unlink()
            toy.run(command)
            read()  # good again
            assert Path(rel).is_file()
