"""scripts/run_preset.py: where the quick run's data comes from, and how a preset becomes `-S` args."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from committed import committed_text

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_preset", ROOT / "scripts" / "run_preset.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def preset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    module = _script()
    monkeypatch.setattr(module, "LOCAL_COPY", tmp_path / "shared" / "cifar10-jpeg.tar.gz")
    return module


def test_official_when_the_download_can_be_reached(preset: ModuleType,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: True)
    assert preset.data_source(None)[:2] == ("official", preset.OFFICIAL_MD5)


def test_offline_the_copy_beside_the_checkout(preset: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: False)
    preset.LOCAL_COPY.parent.mkdir(parents=True)
    preset.LOCAL_COPY.write_bytes(b"x")
    source, md5, why = preset.data_source(None)
    assert source == str(preset.LOCAL_COPY) and md5 is None and "offline" in why


def test_offline_without_a_copy_is_one_line_naming_both_ways(preset: ModuleType,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: False)
    with pytest.raises(SystemExit) as exc:
        preset.data_source(None)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("error: ")
    assert "SOURCE=" in message and str(preset.LOCAL_COPY) in message and "cannot be reached" in message


def test_a_given_source_is_made_absolute(preset: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setattr(preset, "reachable", lambda url, timeout=5.0: pytest.fail("must not probe"))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    source, md5, _ = preset.data_source("cifar-10-python.tar.gz")
    assert source == str(archive) and Path(source).is_absolute() and md5 == preset.OFFICIAL_MD5
    folder = tmp_path / "images"
    folder.mkdir()
    assert preset.data_source("images")[:2] == (str(folder), None)
    with pytest.raises(SystemExit, match="no such file"):
        preset.data_source("missing.tar.gz")


def test_the_quick_preset_becomes_set_args_dvc_reads_back() -> None:
    overlay = _script().load_overlay(ROOT / "configs" / "quick.yaml")
    args = _script().set_args(overlay)
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[::2] == ["-S"] * len(pairs)
    assert yaml.safe_load(pairs["model.dim_mults"]) == [1, 2, 4]
    # a block is set key by key: the keys of the study's sampler the preset does not name stay
    assert yaml.safe_load(pairs["sample.sampler.name"]) == "dpmpp_2m"
    assert yaml.safe_load(pairs["sample.sampler.steps"]) == 20 and "sample.sampler.spacing" not in pairs
    sections = {key.split(".")[0] for key in overlay}
    assert sections <= {"model", "diffusion", "train", "sample", "fid"}, "the data source is the script's"


def test_help_runs() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_preset.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--source" in proc.stdout


def test_a_preset_starts_from_the_committed_study_whatever_the_workspace_holds() -> None:
    """After `dvc exp apply` or a --workspace run, params.yaml holds another experiment: the preset's
    unlisted keys must still get the study's values, or `make quick` after `make paper-recipe` would
    run the paper's network at the quick size."""
    from ddpm_cifar.runtime import config

    script = _script()
    study = config.parse_yaml(committed_text("params.yaml"), "HEAD:params.yaml")
    quick = config.read_yaml(ROOT / "configs" / "quick.yaml")
    paper = config.read_yaml(ROOT / "configs" / "ddpm-paper.yaml")
    workspace = copy.deepcopy(study)  # the paper recipe applied
    for dotted, value in script.flatten(paper).items():
        script.set_in(workspace, dotted, value)
    changes = script.plan(study, workspace, script.flatten(quick))
    assert changes["model.arch"] == "unet" and changes["model.dim"] == 16  # study's, then quick's
    assert changes["train.adam_betas"] == study["train"]["adam_betas"] == [0.9, 0.99]
    assert changes["sample.sampler.variance"] == "posterior" and "sample.n" in changes
    assert changes["sample.sampler.name"] == "dpmpp_2m" and changes["sample.sampler.spacing"] == "quadratic"
    script.check(workspace, changes)  # exits on invalid params
    # On the committed study itself only the preset's values that differ are set.
    flat_study = script.flatten(study)
    assert script.plan(study, study, script.flatten(quick)) == {
        k: v for k, v in script.flatten(quick).items() if flat_study[k] != v}


def test_set_values_read_like_params_yaml() -> None:
    sets = ["train.lr=5e-4", "sample.strip_seeds=[1, 2]", "sample.sampler.steps=50",
            "train.fid_sampler={steps: 5}"]
    overlay = _script().with_sets({"train.lr": 1.0}, sets)
    # 5e-4 is a number, as DVC reads it (plain YAML 1.1 would give the string "5e-4")
    assert overlay == {"train.lr": 5e-4, "sample.strip_seeds": [1, 2], "sample.sampler.steps": 50,
                       "train.fid_sampler.steps": 5}
