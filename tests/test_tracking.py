"""W&B logging must work with no key and no network, and cost nothing when disabled."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from factories import FakeWandb

from ddpm_cifar.runtime.config import WandbConfig
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.training.tracking import Tracker, make_tracker


def test_disabled_tracker_is_a_noop_and_does_not_import_wandb(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would now raise
    tracker = make_tracker(WandbConfig(False, "p", None, None, "online"), {}, tmp_path)
    assert type(tracker) is Tracker and tracker.mode == "disabled"
    tracker.start("abc")
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert tracker.run_id is None and tracker.info() == {}
    assert not any(tmp_path.iterdir())


def test_enabled_without_wandb_installed_is_a_one_line_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the wandb extra were not installed
    with pytest.raises(UserError) as raised:
        make_tracker(WandbConfig(True, "p", None, None, "offline"), {}, tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "pip install 'ddpm-cifar[wandb]'" in message, message
    assert "wandb.enabled" in message
    # A tracker made while wandb was there fails the same way if it is gone when the run starts.
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    tracker = make_tracker(WandbConfig(True, "p", None, None, "offline"), {}, tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"pip install 'ddpm-cifar\[wandb\]'"):
        tracker.start()
    assert not any(tmp_path.iterdir())


def test_online_without_key_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("wandb")  # the real one (the wandb extra; the test extra includes it)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a stored key
    tracker = make_tracker(WandbConfig(True, "denoise-diffusion-model", "t", None, "online"),
                           {"lr": 1e-4}, tmp_path / "runs")
    with pytest.warns(UserWarning, match="offline"):
        tracker.start()
    try:
        assert tracker.mode == "offline"
        assert tracker.info() == {"wandb_run_id": tracker.run_id, "wandb_mode": "offline",
                                  "wandb_run_name": "t"}
        tracker.log({"loss": 0.5, "lr": 1e-4}, step=1)
        tracker.log_images("samples", np.zeros((2, 8, 8, 3), np.uint8), step=1)
    finally:
        tracker.finish()
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def _fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_start_continues_the_run_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             mode: str) -> None:
    fake = _fake_wandb(monkeypatch)
    config = {"train": {"lr": 1e-4}}
    tracker = make_tracker(WandbConfig(True, "proj", "mine", "team", mode), config, tmp_path)
    assert not fake.inits  # nothing happens before start
    tracker.start("run-7")
    init = fake.inits[-1]
    assert init["mode"] == mode and init["id"] == "run-7" and init["resume"] == "allow"
    assert init["project"] == "proj" and init["entity"] == "team" and init["config"] == config
    assert tracker.run_id == "run-7"
    assert tracker.info() == {"wandb_run_id": "run-7", "wandb_mode": mode, "wandb_run_name": "mine"}
    tracker = make_tracker(WandbConfig(True, "proj", "mine", "team", mode), config, tmp_path)
    tracker.start(None)
    assert fake.inits[-1]["id"] is None and fake.inits[-1]["resume"] is None  # a new run
    assert tracker.run_id == "new-2"


@pytest.mark.parametrize(("run_name", "default", "expected"),
                         [(None, "exp-jolly-bass", "exp-jolly-bass"), ("mine", "exp-jolly-bass", "mine"),
                          (None, None, None)])
def test_run_name_is_params_else_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             run_name: str | None, default: str | None,
                                             expected: str | None) -> None:
    fake = _fake_wandb(monkeypatch)
    cfg = WandbConfig(True, "p", run_name, None, "offline")
    make_tracker(cfg, {}, tmp_path, default_name=default).start()
    assert fake.inits[-1]["name"] == expected


def test_offline_run_takes_the_resumed_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real wandb, offline: the continued run keeps the id the checkpoint stored.
    require("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))
    tracker = make_tracker(WandbConfig(True, "p", None, None, "offline"), {}, tmp_path / "runs")
    tracker.start("abc123xy")
    try:
        assert tracker.run_id == "abc123xy" and tracker.mode == "offline"
    finally:
        tracker.finish()
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*-abc123xy"))
