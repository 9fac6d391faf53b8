"""The run logger: one call per event, rank-aware, owning the logs' truncation on resume and W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm_cifar.training.runlog import RunLogger, read_log
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
    return RunLogger(tmp_path / "loss.tsv", tmp_path / "fid.tsv", tracker, main=main, log=lambda _: None)


def _steps(path: Path) -> list[int]:
    return [int(r[0]) for r in read_log(path, 10**9)]


def test_a_fresh_run_writes_every_step_to_the_log_bar_and_tracker(tmp_path: Path) -> None:
    tracker = Recorder()
    logger = _logger(tmp_path, tracker)
    logger.start(0, 3, keep_fids=False, wandb_run_id=None)
    for step, loss in ((1, 0.5), (2, 0.3), (3, 0.1)):
        logger.step(step, loss, 1e-3)
    logger.evaluation(3, {"fid": 12.5}, n_samples=10)
    logger.close()
    assert _steps(tmp_path / "loss.tsv") == [1, 2, 3] and _steps(tmp_path / "fid.tsv") == [3]
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
    assert _steps(tmp_path / "loss.tsv") == [1, 2, 3]
    assert _steps(tmp_path / "fid.tsv") == [1, 2] and second.series("fid") == [(1, 9.0), (2, 8.0)]
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
    assert _steps(tmp_path / "fid.tsv") == [] and second.series("fid") == []
    assert _steps(tmp_path / "loss.tsv") == [1]


def test_other_ranks_write_nothing_and_start_no_run(tmp_path: Path) -> None:
    tracker = Recorder()
    logger = _logger(tmp_path, tracker, main=False)
    logger.start(0, 2, keep_fids=False, wandb_run_id=None)
    logger.step(1, 1.0, 1e-3)
    logger.evaluation(1, {"fid": 5.0}, n_samples=10)
    logger.close()
    assert not (tmp_path / "loss.tsv").exists() and not (tmp_path / "fid.tsv").exists()
    assert tracker.started == [] and tracker.logged == []
    # every rank knows the curve has a point (the final-FID decision)
    assert logger.series("fid") == [(1, 5.0)]
