"""The run logger: one call per event, rank-aware, owning DVCLive's histories (and their cut-back on
resume), its summary, and W&B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddpm_cifar.runtime.loaders import live_metric_path, load_live_metric
from ddpm_cifar.training.runlog import RunLogger
from ddpm_cifar.training.tracking import Tracker


class Recorder(Tracker):
    mode = "online"

    def __init__(self) -> None:
        self.started: list[str | None] = []
        self.logged: list[tuple[dict[str, Any], int]] = []

    def start(self, resume_id: str | None = None) -> None:
        self.started.append(resume_id)
        self.run_id = resume_id or "new"

    def log(self, values: dict[str, float], step: int) -> None:
        self.logged.append((values, step))


def _logger(tmp_path: Path, tracker: Tracker, *, main: bool = True) -> RunLogger:
    return RunLogger(tmp_path / "live", tracker, main=main, log=lambda _: None)


def _steps(tmp_path: Path, name: str) -> list[int]:
    path = live_metric_path(tmp_path / "live", name)
    return [step for step, _ in load_live_metric(tmp_path / "live", name)] if path.exists() else []


def _summary(tmp_path: Path) -> dict[str, float]:
    return json.loads((tmp_path / "live" / "metrics.json").read_text())


def test_a_fresh_run_writes_every_step_to_the_log_bar_and_tracker(tmp_path: Path) -> None:
    tracker = Recorder()
    logger = _logger(tmp_path, tracker)
    logger.start(0, 3, keep_fids=False, wandb_run_id=None)
    for step, loss in ((1, 0.5), (2, 0.3), (3, 0.1)):
        logger.step(step, loss, 1e-3)
    logger.evaluation(3, {"fid": 12.5}, n_samples=10)
    logger.close()
    assert _steps(tmp_path, "loss") == [1, 2, 3] and _steps(tmp_path, "lr") == [1, 2, 3]
    assert _steps(tmp_path, "fid") == [3]
    assert _summary(tmp_path) == {"loss": 0.1, "lr": 1e-3, "fid": 12.5, "step": 3}
    assert tracker.started == [None] and logger.run_id == "new"
    assert ({"fid": 12.5}, 3) in tracker.logged and len(tracker.logged) == 4
    assert abs(logger.final_loss - 0.3) < 1e-12 and logger.series("fid") == [(3, 12.5)]


def test_a_resume_keeps_rows_up_to_its_step_and_continues_the_w_and_b_run(tmp_path: Path) -> None:
    first = _logger(tmp_path, Recorder())
    first.start(0, 4, keep_fids=False, wandb_run_id=None)
    for step in range(1, 5):
        first.step(step, float(step), 1e-3)
        first.evaluation(step, {"fid": 10.0 - step}, n_samples=10)
    first.close()  # as if killed after step 4, resumed from the checkpoint at step 2
    tracker = Recorder()
    second = _logger(tmp_path, tracker)
    second.start(2, 4, keep_fids=True, wandb_run_id="abc")
    second.step(3, 30.0, 1e-3)
    second.close()
    assert _steps(tmp_path, "loss") == [1, 2, 3] and _steps(tmp_path, "lr") == [1, 2, 3]
    assert _steps(tmp_path, "fid") == [1, 2] and second.series("fid") == [(1, 9.0), (2, 8.0)]
    # the summary follows the rows: step 3's loss, the evaluation of step 2 (not the cut step 4's)
    assert _summary(tmp_path) == {"loss": 30.0, "lr": 1e-3, "fid": 8.0, "step": 3}
    assert tracker.started == ["abc"]
    assert second.recent == [1.0, 2.0, 30.0]  # the running loss spans the resume


def test_a_changed_fid_reference_drops_the_curve_on_resume(tmp_path: Path) -> None:
    first = _logger(tmp_path, Recorder())
    first.start(0, 2, keep_fids=False, wandb_run_id=None)
    first.step(1, 1.0, 1e-3)
    first.evaluation(1, {"fid": 5.0}, n_samples=10)
    first.close()
    second = _logger(tmp_path, Recorder())
    second.start(1, 2, keep_fids=False, wandb_run_id=None)
    second.close()
    assert _steps(tmp_path, "fid") == [] and second.series("fid") == []
    assert not live_metric_path(tmp_path / "live", "fid").exists()
    assert _steps(tmp_path, "loss") == [1] and "fid" not in _summary(tmp_path)


def test_other_ranks_write_nothing_and_start_no_run(tmp_path: Path) -> None:
    tracker = Recorder()
    logger = _logger(tmp_path, tracker, main=False)
    logger.start(0, 2, keep_fids=False, wandb_run_id=None)
    logger.step(1, 1.0, 1e-3)
    logger.evaluation(1, {"fid": 5.0}, n_samples=10)
    logger.close()
    assert not (tmp_path / "live").exists()
    assert tracker.started == [] and tracker.logged == []
    # every rank knows the curve has a point (the final-FID decision)
    assert logger.series("fid") == [(1, 5.0)]


def test_a_resume_cuts_a_torn_row_and_rows_past_the_checkpoint_and_ends_with_the_final_summary(
        tmp_path: Path) -> None:
    first = _logger(tmp_path, Recorder())
    first.start(0, 5, keep_fids=False, wandb_run_id=None)
    for step in range(1, 5):
        first.step(step, 1.0 / step, 1e-3)
    first.close()  # killed at step 4 while writing step 5's row, resumed from the checkpoint at step 3
    with open(live_metric_path(tmp_path / "live", "loss"), "a") as f:
        f.write("5\t0.2")
    (tmp_path / "live" / "metrics.json").write_text('{"step": 4, "lo')  # torn too
    second = _logger(tmp_path, Recorder())
    second.start(3, 5, keep_fids=True, wandb_run_id=None)
    for step in (4, 5):
        second.step(step, 1.0 / step, 1e-3)
    second.finish({"final_loss": 0.5, "parameters": 7})
    second.close()
    straight = _logger(tmp_path / "straight", Recorder())
    straight.start(0, 5, keep_fids=False, wandb_run_id=None)
    for step in range(1, 6):
        straight.step(step, 1.0 / step, 1e-3)
    straight.finish({"final_loss": 0.5, "parameters": 7})
    for name in ("loss", "lr"):
        assert (live_metric_path(tmp_path / "live", name).read_bytes()
                == live_metric_path(tmp_path / "straight" / "live", name).read_bytes())
    assert _summary(tmp_path) == _summary(tmp_path / "straight") == {
        "loss": 0.2, "lr": 1e-3, "step": 5, "final_loss": 0.5, "parameters": 7}
