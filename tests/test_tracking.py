"""W&B logging must work with no key and no network, and cost nothing when disabled."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ddpm_cifar.config import WandbConfig
from ddpm_cifar.tracking import Tracker, make_tracker


def test_disabled_tracker_is_a_noop_and_does_not_import_wandb(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would now raise
    tracker = make_tracker(WandbConfig(False, "p", None, None, "online"), {}, tmp_path)
    assert type(tracker) is Tracker and tracker.mode == "disabled"
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert not any(tmp_path.iterdir())


def test_online_without_key_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a stored key
    with pytest.warns(UserWarning, match="offline"):
        tracker = make_tracker(WandbConfig(True, "denoise-diffusion-model", "t", None, "online"),
                               {"lr": 1e-4}, tmp_path / "runs")
    try:
        assert tracker.mode == "offline"
        tracker.log({"loss": 0.5, "lr": 1e-4}, step=1)
        tracker.log_images("samples", np.zeros((2, 8, 8, 3), np.uint8), step=1)
    finally:
        tracker.finish()
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
