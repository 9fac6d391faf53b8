"""What a training run reports as it goes, in one place: the loss and FID logs (TSV files that
`dvc plots` reads), the progress bar with its running loss, W&B, and the log lines.

:class:`RunLogger` is rank-aware: on ranks other than 0 every call is a no-op, so the training
loop makes one call per event whatever its rank. On resume it keeps the logs' rows up to the
resumed step (and the FID rows only while they stay comparable) and drops the rest, atomically.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..runtime.fileio import atomic_path
from ..runtime.loaders import TRAIN_LOG, load_tsv
from .tracking import Tracker

RUNNING_LOSS_STEPS = 100  # the loss shown on the bar and reported as final: a mean of the last steps


def read_log(path: Path, max_step: int) -> list[list[str]]:
    """Rows of a TSV log up to ``max_step``, checked (a step, then finite numbers); a torn last line from a
    crash is dropped. A missing log has no rows."""
    if not path.exists():
        return []
    return load_tsv(path, TRAIN_LOG, max_step=max_step)


class TsvLog:
    """An append-only TSV log whose rows past a step are dropped when it is opened."""

    def __init__(self, path: Path, header: list[str], keep_until: int | None):
        """Open ``path`` for appending, keeping its rows up to step ``keep_until`` (None: none).

        The kept rows are rewritten atomically first, so a crash right after a resume cannot
        lose the history.
        """
        rows = read_log(path, keep_until) if keep_until is not None else []
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        self.file = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.writer(self.file, delimiter="\t", lineterminator="\n")

    def write(self, *values: object) -> None:
        self.writer.writerow(values)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class RunLogger:
    """The training run's logs, bar, W&B run and messages; a no-op unless ``main``."""

    def __init__(self, loss_log: Path, fid_log: Path, tracker: Tracker, *, main: bool,
                 log: Callable[[str], None] = print, columns: tuple[str, ...] = ("fid",)):
        self.loss_path, self.fid_path, self.main = loss_log, fid_log, main
        self.columns = columns  # of the training-time evaluation's log, after "step"
        self.tracker = tracker if main else Tracker()
        self._log = log if main else (lambda _: None)
        # (step, {column: value}) of the evaluations so far, resumed rows included
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.recent: list[float] = []  # the last RUNNING_LOSS_STEPS losses, across a resume
        self._loss: TsvLog | None = None
        self._fid: TsvLog | None = None
        self._bar: tqdm | None = None

    def start(self, step: int, total: int, *, keep_fids: bool, wandb_run_id: str | None) -> None:
        """Open the logs for a run resumed at ``step`` (0: fresh), and start W&B, continuing the run
        ``wandb_run_id`` when given."""
        self.tracker.start(wandb_run_id)
        if not self.main:
            return
        fid_keep = step if step and keep_fids else None
        if fid_keep:
            self.evals = [(int(r[0]), dict(zip(self.columns, map(float, r[1:]), strict=True)))
                          for r in read_log(self.fid_path, fid_keep)]
        if step:
            self.recent = [float(r[1]) for r in read_log(self.loss_path, step)][-RUNNING_LOSS_STEPS:]
        self._loss = TsvLog(self.loss_path, ["step", "loss", "lr"], step if step else None)
        self._fid = TsvLog(self.fid_path, ["step", *self.columns], fid_keep)
        self._bar = tqdm(total=total, initial=min(step, total), desc="train", unit="step")

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def message(self, text: str) -> None:
        self._log(text)

    def step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step done: the loss log, the bar's running loss, W&B."""
        if self._loss is None or self._bar is None:
            return
        self._loss.write(step, f"{loss:.6f}", f"{lr:.3g}")
        self.recent = (self.recent + [loss])[-RUNNING_LOSS_STEPS:]
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.4f}")
        self.tracker.log({"loss": loss, "lr": lr}, step)

    def evaluation(self, step: int, scores: dict[str, float], n_samples: int) -> None:
        """A training-time evaluation (``scores`` holds every column): its log row is on disk when this
        returns."""
        self.evals.append((step, {c: scores[c] for c in self.columns}))
        if self._fid is None:
            return
        self._fid.write(step, *(f"{scores[c]:.6g}" for c in self.columns))
        self._fid.flush()
        self.tracker.log({c: scores[c] for c in self.columns}, step)
        kid = f", KID {scores['kid']:.4g} ± {scores['kid_std']:.2g}" if "kid" in scores else ""
        self._log(f"step {step}: FID {scores['fid']:.2f}{kid} ({n_samples} samples, EMA weights)")

    def series(self, column: str) -> list[tuple[int, float]]:
        """(step, value) of one column of the evaluations so far."""
        return [(step, values[column]) for step, values in self.evals if column in values]

    def wants_images(self) -> bool:
        return self.main and self.tracker.mode != "disabled"

    def images(self, key: str, images: np.ndarray, step: int) -> None:
        self.tracker.log_images(key, images, step)

    def flush(self) -> None:
        """Before a checkpoint: every row up to its step is on disk."""
        for log in (self._loss, self._fid):
            if log is not None:
                log.flush()

    @property
    def final_loss(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def close(self) -> None:
        for log in (self._loss, self._fid):
            if log is not None:
                log.close()
        if self._bar is not None:
            self._bar.close()
