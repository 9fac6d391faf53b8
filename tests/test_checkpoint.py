"""Tests for ddpm_cifar.models.checkpoint: what training writes loads back exactly, bad files are
UserErrors."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import one_thread, random_images, tiny_diffusion, tiny_model, tiny_train, train_outputs

from ddpm_cifar.models import checkpoint
from ddpm_cifar.models.unet import UNet
from ddpm_cifar.runtime.config import DiffusionConfig, ModelConfig
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.training.loop import TrainOutputs, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@dataclass(frozen=True)
class Trained:
    outputs: TrainOutputs
    model_cfg: ModelConfig
    diffusion_cfg: DiffusionConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    model_cfg = tiny_model(num_res_blocks=2)
    diffusion_cfg = tiny_diffusion(objective="pred_v", beta_schedule="cosine", min_snr_gamma=5.0)
    outputs = train_outputs(tmp_path_factory.mktemp("trained"))
    with one_thread():
        train(model_cfg, diffusion_cfg, tiny_train(steps=3), images=random_images(), data_id="random",
              outputs=outputs, device=torch.device("cpu"), log=lambda _: None)
    return Trained(outputs, model_cfg, diffusion_cfg)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 9, 19])


def test_load_model_gives_the_trained_ema_weights(trained: Trained) -> None:
    loaded = checkpoint.load_model(trained.outputs.ema)
    model, diffusion = loaded.net, loaded.diffusion
    assert loaded.step == 3 and loaded.shape == (3, 8, 8)
    x, t = _inputs()
    with torch.no_grad():
        got = model(x, t)

    # The same weights, rebuilt by hand from the raw files: the EMA file and the full checkpoint.
    for path in (trained.outputs.ema, trained.outputs.checkpoint):
        raw = torch.load(path, weights_only=True)
        manual = UNet(ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in raw["model_config"].items()}))
        manual.load_state_dict(raw["ema"])
        manual.eval()
        with torch.no_grad():
            assert torch.equal(manual(x, t), got), path

    # The EMA really differs from the raw weights (it averages after ema_start_step=1 of the 3 steps).
    raw = torch.load(trained.outputs.checkpoint, weights_only=True)
    assert any(not torch.equal(raw["model"][k], raw["ema"][k]) for k in raw["ema"])
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert diffusion.config == trained.diffusion_cfg


def test_load_model_can_pick_the_raw_weights(trained: Trained) -> None:
    model = checkpoint.load_model(trained.outputs.checkpoint, weights="model").net
    raw = torch.load(trained.outputs.checkpoint, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["model"][k]), k
    with pytest.raises(UserError, match="no 'model' weights"):
        checkpoint.load_model(trained.outputs.ema, weights="model")  # the EMA file has only 'ema'


def test_stored_config_is_the_config_used(trained: Trained) -> None:
    raw = torch.load(trained.outputs.ema, weights_only=True)
    assert raw["format"] == checkpoint.FORMAT
    assert raw["model_config"] == {
        "image_size": 8, "channels": 3, "dim": 16, "dim_mults": [1, 2], "num_res_blocks": 2,
        "full_attn": [False, True], "attn_heads": 2, "attn_dim_head": 8, "dropout": 0.0, "arch": "unet",
    }
    assert raw["diffusion_config"] == {
        "timesteps": 20, "beta_schedule": "cosine", "objective": "pred_v", "min_snr_gamma": 5.0,
    }
    assert checkpoint.configs(raw) == (trained.model_cfg, trained.diffusion_cfg)
    loaded = checkpoint.load_model(trained.outputs.ema)
    assert loaded.config == trained.model_cfg
    assert loaded.diffusion.config == trained.diffusion_cfg


def test_a_checkpoint_of_an_older_format_is_one_line_naming_it(trained: Trained, tmp_path: Path) -> None:
    raw = torch.load(trained.outputs.ema, weights_only=True)
    old = tmp_path / "ema.pt"
    torch.save({**raw, "format": "ddpm_cifar.checkpoint/1"}, old)
    message = (r"ddpm_cifar\.checkpoint/1 checkpoint, from an older version of this pipeline \(this one "
               r"reads ddpm_cifar\.checkpoint/2\): remove it and rerun `dvc repro`")
    with pytest.raises(checkpoint.OlderCheckpoint, match=message):
        checkpoint.load_model(old)


def test_torch_load_is_called_with_weights_only(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        assert kwargs.get("weights_only") is True, kwargs
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    checkpoint.load_model(trained.outputs.ema)
    checkpoint.load(trained.outputs.checkpoint)
    assert len(calls) == 2


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    # weights_only: a checkpoint holding an arbitrary Python object cannot run code on load.
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "obj": Path("x")}, path)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.load(path)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        checkpoint.load_model(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path)  # a folder is not a checkpoint file either


def _write_npy(path: Path) -> None:
    np.save(path, np.zeros(3))


def _write_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.txt", "x")


NOT_CHECKPOINTS = [
    pytest.param(lambda p: p.write_bytes(b""), id="empty"),
    pytest.param(lambda p: p.write_bytes(bytes(range(256))), id="binary"),
    pytest.param(lambda p: p.write_text('{"a": 1}\n'), id="json"),
    pytest.param(_write_npy, id="npy"),
    pytest.param(_write_zip, id="zip"),
    pytest.param(lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=2)), id="pickle"),
    pytest.param(lambda p: torch.save({"a": 1}, p), id="torch-dict"),
    pytest.param(lambda p: torch.save(torch.zeros(2), p), id="torch-tensor"),
    pytest.param(lambda p: torch.save({"format": "other/1"}, p), id="other-format"),
    pytest.param(lambda p: p.write_text("hello"), id="text"),
    pytest.param(lambda p: p.write_text("step\tloss\tlr\n1\t0.5\t0.001\n"), id="tsv"),
]


# What torch says of a file it will not load safely: advice to turn the safety off.
LIBRARY_ADVICE = ("weights_only", "allow_pickle", "pickle", "trust", "add_safe_globals", "http")


def _assert_one_line_without_library_advice(message: str) -> None:
    assert "\n" not in message, message
    assert not [w for w in LIBRARY_ADVICE if w in message.lower()], message


@pytest.mark.parametrize("write", NOT_CHECKPOINTS)
def test_non_checkpoint_file_is_a_user_error(tmp_path: Path, write) -> None:
    path = tmp_path / "not_a_checkpoint.pt"
    write(path)
    with pytest.raises(UserError, match="not_a_checkpoint.pt") as info:
        checkpoint.load_model(path)
    _assert_one_line_without_library_advice(str(info.value))


def _first_half(path: Path) -> None:
    # What a copy cut short leaves: the start of a real checkpoint (a kill mid-save cannot, saves are atomic).
    checkpoint.save(path, {"step": 3, "w": torch.randn(4096, generator=torch.Generator().manual_seed(0))})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("damage", [_first_half, _random_bytes], ids=["truncated", "random-bytes"])
@pytest.mark.parametrize(("name", "recovery"), [
    # tests/test_damaged_files.py runs these commands in a DVC project
    ("checkpoint.pt", "remove it and rerun `dvc repro` to train afresh, or restore the copy DVC last "
                      "recorded with `dvc checkout --force models/checkpoint.pt`"),
    ("ema.pt", "remove it and rerun `dvc repro`, which rewrites it from the training checkpoint, "
               "or restore the copy DVC last recorded with `dvc checkout --force models/ema.pt`"),
])
def test_unreadable_checkpoint_says_how_to_recover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   damage, name: str, recovery: str) -> None:
    monkeypatch.chdir(tmp_path)  # the stages run in the repository, with relative paths
    path = Path("models") / name
    path.parent.mkdir()
    damage(path)
    with pytest.raises(UserError) as info:
        checkpoint.load(path)
    message = str(info.value)
    _assert_one_line_without_library_advice(message)
    assert message.startswith(f"models/{name} is not a readable checkpoint (truncated")
    assert message.endswith(f"): {recovery}")


def test_a_checkpoint_that_would_run_code_does_not(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "step": RunsCode()}))
    with pytest.raises(UserError, match="checkpoint.pt is not a readable checkpoint") as info:
        checkpoint.load(path)
    assert not marker.exists()
    _assert_one_line_without_library_advice(str(info.value))
    # The same object inside torch's own zip format is refused by name.
    torch.save({"format": checkpoint.FORMAT, "step": RunsCode()}, path)
    with pytest.raises(UserError, match=r"holds a Python object \(posix.system\)") as info:
        checkpoint.load(path)
    assert not marker.exists()
    _assert_one_line_without_library_advice(str(info.value))


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    raw = torch.load(src, weights_only=True)
    for key, value in changes.items():
        raw[key] = value
    torch.save(raw, dst)
    return dst


def test_unknown_model_config_key_is_a_user_error(trained: Trained, tmp_path: Path) -> None:
    raw = torch.load(trained.outputs.ema, weights_only=True)
    path = _rewrite(trained.outputs.ema, tmp_path / "new.pt",
                    model_config={**raw["model_config"], "use_flash": True})
    with pytest.raises(UserError, match=r"model\.use_flash") as info:
        checkpoint.load_model(path)
    assert "cannot build" in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda raw: {"model_config": {k: v for k, v in raw["model_config"].items() if k != "dim"}},
         r"model\.dim"),
        (lambda raw: {"model_config": {**raw["model_config"], "dim": "16"}}, r"model\.dim"),
        (lambda raw: {"diffusion_config": {**raw["diffusion_config"], "objective": "pred_eps"}},
         "objective"),
        (lambda raw: {"diffusion_config": None}, "diffusion"),
        (lambda raw: {"model_config": {**raw["model_config"], "dim": 32}}, "do not fit"),
    ],
    ids=["missing-key", "wrong-type", "bad-choice", "not-a-mapping", "weights-do-not-fit"],
)
def test_unbuildable_checkpoint_is_a_user_error(trained: Trained, tmp_path: Path, change, match: str) -> None:
    raw = torch.load(trained.outputs.ema, weights_only=True)
    path = _rewrite(trained.outputs.ema, tmp_path / "bad.pt", **change(raw))
    with pytest.raises(UserError, match=match):
        checkpoint.load_model(path)


def test_checkpoint_without_config_is_a_user_error(trained: Trained, tmp_path: Path) -> None:
    raw = torch.load(trained.outputs.ema, weights_only=True)
    del raw["model_config"]
    torch.save(raw, tmp_path / "noconf.pt")
    with pytest.raises(UserError, match="cannot build"):
        checkpoint.load_model(tmp_path / "noconf.pt")


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.pt"
    checkpoint.save(path, {"step": 7, "x": torch.arange(3)})
    got = checkpoint.load(path)
    assert got["format"] == checkpoint.FORMAT
    assert got["step"] == 7 and torch.equal(got["x"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary files left behind


# --- what a checkpoint holds: a whole step, finite weights --------------------------------------------

@pytest.mark.parametrize("step", ["three", 2.5, None, -1, True],
                         ids=["text", "float", "none", "negative", "bool"])
def test_a_step_that_is_not_a_whole_number_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        step: object) -> None:
    monkeypatch.chdir(tmp_path)
    from factories import save_tiny_checkpoint

    path = save_tiny_checkpoint(Path("models/ema.pt"))
    _rewrite(path, path, step=step)
    with pytest.raises(UserError) as info:
        checkpoint.load_model(path)
    assert str(info.value) == (
        f"models/ema.pt is not a usable checkpoint (its step is {step!r}, not a whole number): remove it and "
        "rerun `dvc repro`, which rewrites it from the training checkpoint, or restore the copy DVC last "
        "recorded with `dvc checkout --force models/ema.pt`")


@pytest.mark.parametrize("part", ["ema", "model"])
def test_non_finite_weights_are_refused_at_load(trained: Trained, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, part: str) -> None:
    monkeypatch.chdir(tmp_path)
    raw = torch.load(trained.outputs.checkpoint, weights_only=True)
    key = sorted(raw[part])[1]
    raw[part][key] = raw[part][key].clone().fill_(float("nan"))
    Path("models").mkdir()
    torch.save(raw, "models/checkpoint.pt")
    with pytest.raises(UserError) as info:
        checkpoint.load_model(Path("models/checkpoint.pt"), weights=part)
    assert str(info.value) == (
        f"models/checkpoint.pt is not a usable checkpoint (its {part} weights hold NaN or infinite values, "
        f"in {key}): remove it and rerun `dvc repro` to train afresh, or restore the copy DVC last recorded "
        "with `dvc checkout --force models/checkpoint.pt`")


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    weights = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(UserError, match=r"not writing .*ema.pt: its ema weights hold NaN or infinite values, "
                                        r"in w"):
        checkpoint.save(tmp_path / "ema.pt", {"step": 1, "ema": weights})
    assert list(tmp_path.iterdir()) == []


def test_weights_that_are_not_a_state_dict_are_one_line(trained: Trained, tmp_path: Path) -> None:
    path = _rewrite(trained.outputs.ema, tmp_path / "ema.pt", ema="not weights")
    with pytest.raises(UserError, match=r"ema.pt is not a usable checkpoint \(its 'ema' weights are a str, "
                                        r"not a state dict\)"):
        checkpoint.load_model(path)
