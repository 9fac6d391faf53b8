"""Tests for ddpm_cifar.training.loop: exact resume, fresh starts, torn logs, and the batch source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from committed import committed_text
from conftest import require
from factories import (
    FakeWandb,
    one_thread,
    random_images,
    tiny_diffusion,
    tiny_model,
    tiny_train,
    train_outputs,
)

from ddpm_cifar.runtime.config import SamplerConfig, TrainConfig, WandbConfig
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.loaders import live_metric_path
from ddpm_cifar.training.batches import BatchSource
from ddpm_cifar.training.loop import TrainingEval, TrainOutputs, TrainResult, train
from ddpm_cifar.training.tracking import Tracker, make_tracker

IMAGES = random_images(n=12, size=8, seed=3)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@dataclass
class Run:
    result: TrainResult
    outputs: TrainOutputs
    messages: list[str]


def _train(root: Path, cfg: TrainConfig, tracker: Tracker | None = None) -> Run:
    messages: list[str] = []
    outputs = train_outputs(root)
    with one_thread():
        result = train(tiny_model(), tiny_diffusion(objective="pred_x0"), cfg, images=IMAGES,
                       data_id="random-12", outputs=outputs, device=CPU, tracker=tracker,
                       log=messages.append)
    return Run(result, outputs, messages)


def _rows(live: Path, name: str) -> list[str]:
    """The lines of DVCLive's history of ``name`` in ``live``."""
    return live_metric_path(live, name).read_text().splitlines()


def _assert_same_state(a: TrainOutputs, b: TrainOutputs) -> None:
    ca, cb = torch.load(a.checkpoint, weights_only=True), torch.load(b.checkpoint, weights_only=True)
    assert ca["step"] == cb["step"]
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    for pid, state in ca["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, cb["optimizer"]["state"][pid][k]), (pid, k)
    assert torch.equal(ca["rng"]["noise"], cb["rng"]["noise"])
    ea, eb = torch.load(a.ema, weights_only=True), torch.load(b.ema, weights_only=True)
    assert ea["step"] == eb["step"]
    for k in ea["ema"]:
        assert torch.equal(ea["ema"][k], eb["ema"][k]), k
    assert _rows(a.live, "loss") == _rows(b.live, "loss") and _rows(a.live, "lr") == _rows(b.live, "lr")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Six steps in one go: the trajectory every resumed run must reproduce bit for bit."""
    return _train(tmp_path_factory.mktemp("straight"), tiny_train(steps=6))


def test_straight_run_outputs(straight: Run) -> None:
    assert straight.result.step == 6 and straight.result.resumed_from == 0
    assert straight.result.precision == "fp32"
    rows = _rows(straight.outputs.live, "loss")
    assert rows[0] == "step\tloss" and _rows(straight.outputs.live, "lr")[0] == "step\tlr"
    assert [r.split("\t")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert all(r.split("\t")[1] == "0.001" for r in _rows(straight.outputs.live, "lr")[1:])
    losses = [float(r.split("\t")[1]) for r in rows[1:]]
    assert all(np.isfinite(losses))
    assert straight.result.final_loss == pytest.approx(np.mean(losses), abs=1e-5)
    ckpt = torch.load(straight.outputs.checkpoint, weights_only=True)
    # The raw weights moved away from their initialisation, and the EMA lags behind them.
    torch.manual_seed(0)
    from ddpm_cifar.models.unet import UNet

    init = UNet(tiny_model()).state_dict()
    assert any(not torch.equal(init[k], ckpt["model"][k]) for k in init)
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in init)


class _Crash(Tracker):
    """Kills the run (like a Ctrl-C) when step ``at`` is logged."""

    def __init__(self, at: int):
        self.at = at

    def log(self, values: dict[str, float], step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_exactly(straight: Run, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, tiny_train(steps=6), tracker=_Crash(at=5))  # last checkpoint: step 3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    assert len(_rows(tmp_path / "dvclive", "loss")) == 1 + 5  # rows 4 and 5 are past the checkpoint
    resumed = _train(tmp_path, tiny_train(steps=6))
    assert resumed.result.resumed_from == 3 and resumed.result.step == 6
    assert any("resuming" in m and "step 3" in m for m in resumed.messages)
    _assert_same_state(resumed.outputs, straight.outputs)
    # The reported running loss spans the resume (steps 1-3 come back from the log, every digit).
    assert resumed.result.final_loss == straight.result.final_loss


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    wandb_cfg = WandbConfig(enabled=True, project="p", run_name=None, entity=None, mode="online")

    def tracked(cfg: TrainConfig) -> Run:
        tracker = make_tracker(wandb_cfg, {}, tmp_path / "wandb")
        try:
            return _train(tmp_path, cfg, tracker=tracker)
        finally:
            tracker.finish()

    def stored_id() -> str | None:
        return torch.load(tmp_path / "checkpoint.pt", weights_only=True).get("wandb_run_id")

    tracked(tiny_train(steps=3))
    assert fake.inits[-1]["id"] is None and fake.inits[-1]["resume"] is None  # a new run...
    assert stored_id() == "new-1"  # ...whose id the checkpoint keeps
    resumed = tracked(tiny_train(steps=5))
    assert resumed.result.resumed_from == 3
    assert fake.inits[-1]["id"] == "new-1" and fake.inits[-1]["resume"] == "allow"
    assert [step for _, step in fake.logged][-2:] == [4, 5]  # the run goes on where it stopped
    assert stored_id() == "new-1"
    fresh = tracked(tiny_train(steps=5, seed=1))  # a new trajectory: a new W&B run
    assert fresh.result.resumed_from == 0 and fake.inits[-1]["id"] is None and stored_id() == "new-3"
    _train(tmp_path, tiny_train(steps=6, seed=1))  # W&B off: no run, no id
    assert stored_id() is None and len(fake.inits) == 3


def test_wandb_gets_sample_grids_of_the_ema_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeWandb()
    fake.Image = lambda image: image  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = make_tracker(WandbConfig(enabled=True, project="p", run_name=None, entity=None, mode="offline"),
                           {}, tmp_path / "wandb")
    try:
        cfg = tiny_train(steps=4, sample_grid_every=2, fid_sampler=SamplerConfig("ddpm", 3))
        _train(tmp_path, cfg, tracker=tracker)
    finally:
        tracker.finish()
    grids = [(values["samples"], step) for values, step in fake.logged if "samples" in values]
    assert [step for _, step in grids] == [2, 4]
    assert len(grids[0][0]) == 16 and grids[0][0][0].shape == (8, 8, 3) and grids[0][0][0].dtype == np.uint8


def test_metrics_hold_numbers_and_the_report_the_rest(straight: Run) -> None:
    metrics, report = straight.result.metrics(), straight.result.report()
    assert set(metrics) == {"final_loss", "images_per_second", "parameters"}  # no FID measured
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics["parameters"] == straight.result.parameters
    # DVCLive's summary, the stage's metrics file: its live values and then the run's
    summary = json.loads((straight.outputs.live / "metrics.json").read_text())
    assert summary == {**metrics, "step": 6, "lr": 0.001,
                       "loss": float(_rows(straight.outputs.live, "loss")[-1].split("\t")[1])}
    assert report == {"resumed_from_step": 0, "precision": "fp32", "world_size": 1,
                      "world_history": [[0, 6, 1]], "last_fid": None, "last_kid": None, "best_weights": None}
    with_fid = replace(straight.result, fids=[(3, 50.0), (6, 40.0)])
    assert with_fid.metrics()["fid"] == 40.0 and with_fid.report()["last_fid"] == 40.0


def test_raising_steps_continues_a_finished_run(straight: Run, tmp_path: Path) -> None:
    first = _train(tmp_path, tiny_train(steps=3))
    assert first.result.step == 3
    second = _train(tmp_path, tiny_train(steps=6))
    assert second.result.resumed_from == 3 and second.result.step == 6
    _assert_same_state(second.outputs, straight.outputs)


def test_nothing_to_train_keeps_the_run(tmp_path: Path) -> None:
    first = _train(tmp_path, tiny_train(steps=3))
    rows = _rows(first.outputs.live, "loss")
    model = torch.load(first.outputs.checkpoint, weights_only=True)["model"]
    again = _train(tmp_path, tiny_train(steps=3))
    assert again.result.step == 3 and again.result.resumed_from == 3
    assert any("nothing to train" in m for m in again.messages)
    assert _rows(again.outputs.live, "loss") == rows
    after = torch.load(again.outputs.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(model[k], after[k]) for k in model)


def test_finished_run_rewrites_a_missing_ema_file(tmp_path: Path) -> None:
    # What `dvc repro` does after any change to src/: it deletes the non-persistent models/ema.pt
    # and reruns the stage, whose persistent checkpoint is already at train.steps.
    first = _train(tmp_path, tiny_train(steps=3))
    ema = torch.load(first.outputs.ema, weights_only=True)["ema"]
    first.outputs.ema.unlink()
    again = _train(tmp_path, tiny_train(steps=3))
    assert again.result.step == 3
    rewritten = torch.load(again.outputs.ema, weights_only=True)["ema"]
    assert all(torch.equal(ema[k], rewritten[k]) for k in ema)


def test_changed_lr_starts_fresh(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    _train(tmp_path, tiny_train(steps=3))
    changed = _train(tmp_path, tiny_train(steps=6, lr=5e-4))
    assert changed.result.resumed_from == 0 and changed.result.step == 6
    assert any("starting fresh" in m for m in changed.messages)
    assert not any("resuming" in m for m in changed.messages)
    rows = _rows(changed.outputs.live, "lr")
    assert [r.split("\t")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert all(r.split("\t")[1] == "0.0005" for r in rows[1:])
    # It is exactly a fresh run with the new lr.
    fresh = _train(tmp_path_factory.mktemp("fresh"), tiny_train(steps=6, lr=5e-4))
    _assert_same_state(changed.outputs, fresh.outputs)


@pytest.mark.parametrize("change", [{"seed": 1}, {"ema_decay": 0.5}, {"grad_accum": 1}, {"ema_power": None},
                                    {"ema_power": 0.75}, {"ema_inv_gamma": 2.0}, {"warmup_steps": 2}])
def test_other_trajectory_keys_start_fresh(tmp_path: Path, change: dict) -> None:
    _train(tmp_path, tiny_train(steps=2))
    again = _train(tmp_path, tiny_train(steps=3, **change))
    assert again.result.resumed_from == 0
    assert any("starting fresh" in m for m in again.messages)


def test_non_trajectory_keys_still_resume(tmp_path: Path) -> None:
    _train(tmp_path, tiny_train(steps=2))
    again = _train(tmp_path, tiny_train(steps=3, checkpoint_every=1, fid_samples=16,
                                        fid_sampler=SamplerConfig("ddim", 3, "trailing", variance="beta")))
    assert again.result.resumed_from == 2


def test_a_checkpoint_of_an_older_version_starts_fresh_in_one_line(tmp_path: Path) -> None:
    first = _train(tmp_path, tiny_train(steps=2))
    raw = torch.load(first.outputs.checkpoint, weights_only=True)
    torch.save({**raw, "format": "ddpm_cifar.checkpoint/1"}, first.outputs.checkpoint)
    again = _train(tmp_path, tiny_train(steps=3))
    assert again.result.resumed_from == 0 and again.result.step == 3
    assert [m for m in again.messages if "older version" in m] == [
        f"{first.outputs.checkpoint} is from an older version of this pipeline: starting fresh"]


def test_warmup_sets_the_lr_the_optimizer_uses(tmp_path: Path) -> None:
    run = _train(tmp_path, tiny_train(steps=5, warmup_steps=3))
    # lr x min(1, k / 3) after k steps, as Ho et al.'s code: 0 for the first step
    assert [float(r.split("\t")[1]) for r in _rows(run.outputs.live, "lr")[1:]] == pytest.approx(
        [0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3], rel=1e-15)
    ckpt = torch.load(run.outputs.checkpoint, weights_only=True)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [pytest.approx(1e-3, rel=1e-12)]
    # The first step, at lr 0, leaves the weights where they started: the lr reached Adam.
    first = _train(tmp_path / "first", tiny_train(steps=1, warmup_steps=3))
    torch.manual_seed(0)
    from ddpm_cifar.models.unet import UNet

    init = UNet(tiny_model()).state_dict()
    weights = torch.load(first.outputs.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(init[k], weights[k]) for k in init)
    no_warmup = torch.load(_train(tmp_path / "plain", tiny_train(steps=1)).outputs.checkpoint,
                           weights_only=True)["model"]
    assert any(not torch.equal(init[k], no_warmup[k]) for k in init)


def test_interrupted_warmup_resumes_exactly(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    cfg = tiny_train(steps=6, warmup_steps=5)  # the checkpoint at step 3 falls inside the warm-up
    straight = _train(tmp_path_factory.mktemp("warm-straight"), cfg)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, cfg, tracker=_Crash(at=5))
    resumed = _train(tmp_path, cfg)
    assert resumed.result.resumed_from == 3
    _assert_same_state(resumed.outputs, straight.outputs)


@pytest.mark.parametrize("tail", ["4\t0.12", "1", "4\t0.123456\t0.0", "3\t0.5", "4"],
                         ids=["half-row", "prefix-of-a-later-step", "extra-field", "earlier-step",
                              "step-only"])
def test_torn_last_line_is_dropped_on_resume(straight: Run, tmp_path: Path, tail: str) -> None:
    _train(tmp_path, tiny_train(steps=3))
    log = live_metric_path(tmp_path / "dvclive", "loss")
    text = log.read_text()
    assert text.endswith("\n")
    log.write_text(text + tail)  # a crash mid-write: no newline at the end
    resumed = _train(tmp_path, tiny_train(steps=6))
    assert resumed.result.resumed_from == 3
    assert log.read_text() == live_metric_path(straight.outputs.live, "loss").read_text()


# -- BatchSource ---------------------------------------------------------------------------------

N = 10
SOURCE_IMAGES = random_images(n=N, size=4, seed=11)


def _identify(batch: torch.Tensor) -> list[tuple[int, bool]]:
    """(stored image index, flipped?) of each item of a (B, C, H, W) batch in [-1, 1]."""
    out = []
    for x in batch:
        assert x.min() >= -1 and x.max() <= 1
        u8 = ((x + 1) * 127.5).round()
        torch.testing.assert_close(x, u8 / 127.5 - 1, rtol=0, atol=1e-6)  # exactly a stored pixel value
        hwc = u8.to(torch.uint8).permute(1, 2, 0).numpy()
        matches = [(i, flip) for i in range(N) for flip in (False, True)
                   if np.array_equal(hwc, SOURCE_IMAGES[i][:, ::-1] if flip else SOURCE_IMAGES[i])]
        assert len(matches) == 1, "an item must be one stored image, as is or mirrored left-right"
        out.append(matches[0])
    return out


def test_batches_are_stored_images_or_their_horizontal_flips() -> None:
    source = BatchSource(SOURCE_IMAGES, seed=0, device=CPU)
    found = _identify(source.batch(0, 40))
    flips = [f for _, f in found]
    assert any(flips) and not all(flips)
    assert 0.2 < np.mean(flips) < 0.8


def test_every_image_once_per_epoch_across_batch_boundaries() -> None:
    source = BatchSource(SOURCE_IMAGES, seed=0, device=CPU)
    # Batches of 4 over 10 images: the batches at 8, 28 straddle epochs, 20 starts one.
    order = [i for start in range(0, 40, 4) for i, _ in _identify(source.batch(start, 4))]
    epochs = [order[e * N:(e + 1) * N] for e in range(4)]
    for e, epoch in enumerate(epochs):
        assert sorted(epoch) == list(range(N)), e
    assert len({tuple(e) for e in epochs}) == 4  # a new shuffle every epoch
    assert epochs[0] != list(range(N))
    # The order is a function of position only: one batch spanning four epochs agrees.
    big = BatchSource(SOURCE_IMAGES, seed=0, device=CPU)
    assert [i for i, _ in _identify(big.batch(3, 35))] == order[3:38]


def test_same_position_same_batch_whatever_came_before() -> None:
    fresh = BatchSource(SOURCE_IMAGES, seed=5, device=CPU).batch(17, 6)
    used = BatchSource(SOURCE_IMAGES, seed=5, device=CPU)
    for start, size in [(0, 4), (33, 9), (18, 2), (5, 30), (100, 3)]:
        used.batch(start, size)
    assert torch.equal(used.batch(17, 6), fresh)
    assert torch.equal(used.batch(17, 6), fresh)  # and again


def test_seed_changes_the_order() -> None:
    a = [i for i, _ in _identify(BatchSource(SOURCE_IMAGES, seed=0, device=CPU).batch(0, N))]
    b = [i for i, _ in _identify(BatchSource(SOURCE_IMAGES, seed=1, device=CPU).batch(0, N))]
    assert sorted(a) == sorted(b) == list(range(N))
    assert a != b


def test_interruption_during_training_fid_leaves_no_gap_in_the_fid_curve(tmp_path: Path) -> None:
    """Step 2 is both an FID and a checkpoint step; dying inside its FID must redo that FID."""
    outputs = train_outputs(tmp_path)
    cfg = tiny_train(steps=4, checkpoint_every=2, fid_every=2)
    calls: list[int] = []

    def dying_fid(model: torch.nn.Module, diffusion: object) -> dict[str, float]:
        calls.append(1)
        raise KeyboardInterrupt

    with one_thread(), pytest.raises(KeyboardInterrupt):
        train(tiny_model(), tiny_diffusion(), cfg, images=IMAGES, data_id="d", outputs=outputs,
              device=CPU, evaluation=TrainingEval(dying_fid), log=lambda _: None)
    assert calls == [1]
    assert not outputs.checkpoint.exists()  # step 2 was not checkpointed before its FID

    with one_thread():
        result = train(tiny_model(), tiny_diffusion(), cfg, images=IMAGES, data_id="d",
                       outputs=outputs, device=CPU, evaluation=TrainingEval(lambda m, d: {"fid": 1.5}),
                       log=lambda _: None)
    assert [s for s, _ in result.fids] == [2, 4]
    assert [r.split("\t")[0] for r in _rows(outputs.live, "fid")] == ["step", "2", "4"]


def test_checkpoint_bytes_are_reproducible(tmp_path: Path) -> None:
    """Equal payloads must give equal files, or DVC reruns sampling after a no-op training rerun."""
    from ddpm_cifar.models import checkpoint

    payload = {"step": 1, "w": torch.arange(6.0)}
    checkpoint.save(tmp_path / "a.pt", payload)
    checkpoint.save(tmp_path / "b.pt", payload)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_lowering_steps_below_the_checkpoint_starts_fresh(tmp_path: Path) -> None:
    _train(tmp_path, tiny_train(steps=4))
    again = _train(tmp_path, tiny_train(steps=2))
    assert again.result.resumed_from == 0 and again.result.step == 2
    assert any("past train.steps 2" in m for m in again.messages)
    assert torch.load(again.outputs.ema, weights_only=True)["step"] == 2


def _retrain_with_new_fid_reference(tmp_path: Path, second_steps: int) -> tuple[TrainResult, TrainOutputs]:
    """Train 2 steps with FID 5.0 against reference "old", then again to ``second_steps`` against "new"."""
    outputs = train_outputs(tmp_path)
    kw = dict(images=IMAGES, data_id="d", outputs=outputs, device=CPU, log=lambda _: None)
    with one_thread():
        train(tiny_model(), tiny_diffusion(), tiny_train(steps=2, fid_every=1),
              evaluation=TrainingEval(lambda m, d: {"fid": 5.0}, id="old"), **kw)
        result = train(tiny_model(), tiny_diffusion(), tiny_train(steps=second_steps, fid_every=1),
                       evaluation=TrainingEval(lambda m, d: {"fid": 1.0}, id="new"), **kw)
    return result, outputs


def test_a_new_fid_reference_restarts_the_fid_curve_but_not_training(tmp_path: Path) -> None:
    result, outputs = _retrain_with_new_fid_reference(tmp_path, second_steps=3)
    assert result.resumed_from == 2
    assert result.fids == [(3, 1.0)]
    assert _rows(outputs.live, "fid") == ["step\tfid", "3\t1.0"]


def test_images_of_another_size_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.image_size"):
        train(tiny_model(), tiny_diffusion(), tiny_train(), images=np.zeros((4, 16, 16, 3), np.uint8),
              data_id="d", outputs=train_outputs(tmp_path), device=CPU)


def test_a_finished_run_with_a_new_fid_reference_measures_its_final_weights(tmp_path: Path) -> None:
    result, outputs = _retrain_with_new_fid_reference(tmp_path, second_steps=2)
    assert result.resumed_from == 2 and result.fids == [(2, 1.0)]
    assert _rows(outputs.live, "fid") == ["step\tfid", "2\t1.0"]


# -- divergence: a non-finite loss or weights stop the run, keeping the last good checkpoint --------

def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, step: int, grad_accum: int = 2) -> None:
    """The diffusion loss turns NaN from optimizer step ``step`` on, as a diverging run's does."""
    from ddpm_cifar.diffusion.process import GaussianDiffusion

    loss, calls = GaussianDiffusion.loss, [0]

    def diverging(self: GaussianDiffusion, *args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        value = loss(self, *args, **kwargs)
        return value * float("nan") if (calls[0] - 1) // grad_accum + 1 >= step else value

    monkeypatch.setattr(GaussianDiffusion, "loss", diverging)


def _diverged(step: int, ckpt: Path, kept: int | None, what: str = "the loss at step {step} is nan") -> str:
    kept_text = f"{ckpt} keeps step {kept}, the last good checkpoint" if kept else "no checkpoint was written"
    return (f"training diverged: {what.format(step=step)}; {kept_text}: lower train.lr (now 0.001) in "
            "params.yaml and rerun `dvc repro` (a changed train.lr trains afresh)")


def test_a_non_finite_loss_stops_training_keeping_the_last_good_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_loss_at(monkeypatch, step=5)
    with pytest.raises(UserError) as info:
        _train(tmp_path, tiny_train(steps=6))  # checkpoints at 3 and 6
    outputs = train_outputs(tmp_path)
    assert str(info.value) == _diverged(5, outputs.checkpoint, kept=3)
    ckpt, ema = torch.load(outputs.checkpoint, weights_only=True), torch.load(outputs.ema, weights_only=True)
    assert ckpt["step"] == 3 and ema["step"] == 3
    weights = (ckpt["model"], ckpt["ema"], ema["ema"])
    assert all(torch.isfinite(w).all() for part in weights for w in part.values())
    # no NaN row
    assert [r.split("\t")[0] for r in _rows(outputs.live, "loss")] == ["step", "1", "2", "3", "4"]


def test_a_run_that_diverges_before_its_first_checkpoint_writes_none(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_loss_at(monkeypatch, step=1)
    with pytest.raises(UserError) as info:
        _train(tmp_path, tiny_train(steps=6))
    outputs = train_outputs(tmp_path)
    assert str(info.value) == _diverged(1, outputs.checkpoint, kept=None)
    assert not outputs.checkpoint.exists() and not outputs.ema.exists()


def test_weights_that_turn_non_finite_under_a_finite_loss_are_not_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm_cifar.training.ema import EMA

    update = EMA.update

    def overflowing(self: EMA, model: torch.nn.Module, step: int) -> None:
        update(self, model, step)
        if step == 6:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(EMA, "update", overflowing)
    with pytest.raises(UserError) as info:
        _train(tmp_path, tiny_train(steps=6))
    outputs = train_outputs(tmp_path)
    key = next(iter(torch.load(outputs.ema, weights_only=True)["ema"]))
    what = f"the ema weights at step {{step}} hold NaN or infinite values, in {key}"
    assert str(info.value) == _diverged(6, outputs.checkpoint, kept=3, what=what)
    assert torch.load(outputs.checkpoint, weights_only=True)["step"] == 3
    assert torch.load(outputs.ema, weights_only=True)["step"] == 3


def test_a_lower_lr_after_divergence_trains_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the divergence message advises: with a lower train.lr the run starts over and finishes."""
    with monkeypatch.context() as patch:
        _nan_loss_at(patch, step=5)
        with pytest.raises(UserError, match="lower train.lr"):
            _train(tmp_path, tiny_train(steps=6))
    again = _train(tmp_path, tiny_train(steps=6, lr=5e-4))
    assert again.result.resumed_from == 0 and again.result.step == 6
    assert torch.load(again.outputs.ema, weights_only=True)["step"] == 6


def _corrupt_checkpoint(path: Path, **changes: object) -> None:
    raw = torch.load(path, weights_only=True)
    raw.update(changes)
    torch.save(raw, path)  # torch.save, not checkpoint.save: that refuses to write such a file


def test_a_checkpoint_with_non_finite_weights_is_not_resumed_nor_copied_to_ema(tmp_path: Path) -> None:
    first = _train(tmp_path, tiny_train(steps=3))
    ema = torch.load(first.outputs.checkpoint, weights_only=True)["ema"]
    key = next(iter(ema))
    _corrupt_checkpoint(first.outputs.checkpoint, ema={**ema, key: torch.full_like(ema[key], float("nan"))})
    first.outputs.ema.unlink()  # as DVC does before rerunning train, which rewrites it from the checkpoint
    with pytest.raises(UserError) as info:
        _train(tmp_path, tiny_train(steps=3))
    assert str(info.value).startswith(f"{first.outputs.checkpoint} is not a usable checkpoint (its ema "
                                      f"weights hold NaN or infinite values, in {key}): remove it")
    assert not first.outputs.ema.exists()


@pytest.mark.parametrize("step", ["three", 1.5])
def test_a_checkpoint_whose_step_is_not_a_whole_number_is_one_line_on_resume(tmp_path: Path,
                                                                           step: object) -> None:
    first = _train(tmp_path, tiny_train(steps=3))
    _corrupt_checkpoint(first.outputs.checkpoint, step=step)
    with pytest.raises(UserError) as info:
        _train(tmp_path, tiny_train(steps=4))
    assert str(info.value).startswith(f"{first.outputs.checkpoint} is not a usable checkpoint (its step is "
                                      f"{step!r}, not a whole number): remove it and rerun `dvc repro` to "
                                      "train afresh")


def _nan_on_one_rank_worker(rank: int, world: int, init_file: str, root: str, messages: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if rank == 1:  # only this rank's share of the batch diverges: the averaged loss is NaN on both
        with pytest.MonkeyPatch.context() as patch:
            _nan_loss_at(patch, step=5, grad_accum=2)
            _train_ranked(root, rank, messages)
    else:
        _train_ranked(root, rank, messages)
    dist.destroy_process_group()


def _train_ranked(root: str, rank: int, messages: str) -> None:
    try:
        train(tiny_model(), tiny_diffusion(), tiny_train(steps=6), images=IMAGES, data_id="d",
              outputs=train_outputs(Path(root)), device=CPU, log=lambda _: None)
    except UserError as exc:
        Path(messages, f"rank{rank}.txt").write_text(str(exc))


@pytest.mark.slow  # two processes
def test_every_rank_stops_at_the_same_non_finite_loss(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_nan_on_one_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path)),
             nprocs=2, join=True)
    lines = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None
             for r in (0, 1)]
    # Both name the checkpoint of step 3 that rank 0 wrote (tiny_train checkpoints every 3 steps).
    assert lines[0] == lines[1] == _diverged(5, tmp_path / "checkpoint.pt", kept=3), lines
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3


# -- the train stage -----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~11 s on 2 cores: two runs of the stage as a subprocess
def test_stage_splits_metrics_from_report_and_continues_its_wandb_run(tmp_path: Path) -> None:
    require("wandb")  # the real one, offline (the wandb extra; the test extra includes it)
    data = tmp_path / "data" / "cifar10"
    data.mkdir(parents=True)
    np.savez(data / "train.npz", images=random_images(n=8, size=32), labels=np.zeros(8, np.int64))
    (data / "meta.json").write_text(json.dumps({"source": "random", "official": False}))
    raw = yaml.safe_load(committed_text("params.yaml"))  # as committed, not a workspace experiment's
    raw["model"].update(arch="unet", image_size=32, channels=3, dim=8, dim_mults=[1, 2], num_res_blocks=1,
                        full_attn=[False, True], attn_heads=1, attn_dim_head=8)
    raw["diffusion"]["timesteps"] = 20
    raw["sample"]["sampler"]["steps"] = raw["train"]["fid_sampler"]["steps"] = 5  # at most the 20 timesteps
    raw["train"].update(steps=2, batch_size=4, grad_accum=1, checkpoint_every=1, fid_every=0, amp=False)
    raw["wandb"].update(enabled=True, mode="offline", run_name=None)
    raw["distributed"].update(nnodes=1, nproc_per_node=1)

    def stage(steps: int) -> tuple[dict, dict]:
        raw["train"]["steps"] = steps
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path), "WANDB_SILENT": "true",
               "DVC_EXP_NAME": "exp-tiny"}
        for name in ("WANDB_MODE", "WANDB_API_KEY", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(name, None)
        done = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return (json.loads((tmp_path / "dvclive" / "metrics.json").read_text()),
                json.loads((tmp_path / "reports" / "train.json").read_text()))

    metrics, report = stage(2)
    assert set(metrics) == {"step", "loss", "lr", "final_loss", "images_per_second", "parameters"}
    assert metrics["step"] == 2
    assert report["resumed_from_step"] == 0 and report["device"] == "cpu"
    assert report["wandb_mode"] == "offline" and report["wandb_run_name"] == "exp-tiny"
    metrics, again = stage(3)
    assert again["resumed_from_step"] == 2 and metrics["step"] == 3
    assert again["wandb_run_id"] == report["wandb_run_id"]  # the same W&B run, continued
