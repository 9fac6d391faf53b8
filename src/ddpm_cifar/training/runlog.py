"""What a training run reports as it goes, in one place: DVCLive's logs (the histories `dvc plots` draws
and the summary `dvc exp show` lists, both while the run goes on), the progress bar with its running
loss, W&B, and the log lines.

:class:`RunLogger` is rank-aware: on ranks other than 0 every call is a no-op, so the training
loop makes one call per event whatever its rank. On resume it cuts DVCLive's histories back to the
resumed step (the evaluation's only while they stay comparable), atomically, and rewrites the summary
to match, so that the logs of a run killed between checkpoints end equal to an uninterrupted run's.

DVCLive's own ``next_step()``/``sync()`` are not called per step: each call re-reads every history file
(for DVC Studio), which makes a run quadratic in its steps (benchmarks/live_logging.py). The summary is
written by :func:`write_summary` instead, and ``end()`` (one sync) closes a finished run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..runtime.fileio import atomic_path, write_json
from ..runtime.loaders import live_metrics_dir, load_live_metric
from .tracking import Tracker

if TYPE_CHECKING:
    from dvclive import Live

RUNNING_LOSS_STEPS = 100  # the loss shown on the bar and reported as final: a mean of the last steps
STEP_VALUES = ("loss", "lr")  # logged at every optimizer step


def write_summary(live: Live) -> None:
    """DVCLive's summary with its step, replaced atomically: ``Live.make_summary()`` rewrites the file in
    place, and a `dvc exp show` that read it meanwhile showed the running experiment without metrics
    (once in 8 calls during a quick run)."""
    live.summary["step"] = live.step  # as make_summary() does: end() takes the step back from here
    write_json(live.metrics_file, live.summary)


def cut_back(live_dir: Path, keep: dict[str, int]) -> dict[str, list[tuple[int, float]]]:
    """Cut each history in ``keep`` ({name: last step kept}) back to its step, atomically, and remove
    every other history; returns the rows kept. A torn last line from a crash is dropped."""
    folder = live_metrics_dir(live_dir)
    kept: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("*.tsv")) if folder.is_dir() else []:
        name = path.stem
        if name not in keep:
            path.unlink()
            continue
        kept[name] = load_live_metric(live_dir, name, max_step=keep[name])
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            f.write(f"step\t{name}\n" + "".join(f"{s}\t{v!r}\n" for s, v in kept[name]))
    return kept


class RunLogger:
    """The training run's DVCLive logs, bar, W&B run and messages; a no-op unless ``main``."""

    def __init__(self, live_dir: Path, tracker: Tracker, *, main: bool,
                 log: Callable[[str], None] = print, columns: tuple[str, ...] = ("fid",)):
        self.live_dir, self.main = live_dir, main
        self.columns = columns  # what each training-time evaluation logs
        self.tracker = tracker if main else Tracker()
        self._log = log if main else (lambda _: None)
        # (step, {column: value}) of the evaluations so far, resumed rows included
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.recent: list[float] = []  # the last RUNNING_LOSS_STEPS losses, across a resume
        self._live: Live | None = None  # on rank 0, once started
        self._bar: tqdm | None = None

    def start(self, step: int, total: int, *, keep_fids: bool, wandb_run_id: str | None) -> None:
        """Open the logs for a run resumed at ``step`` (0: fresh), and start W&B, continuing the run
        ``wandb_run_id`` when given."""
        self.tracker.start(wandb_run_id)
        if not self.main:
            return
        if step:
            self._resume_logs(step, keep_fids)
        from dvclive import Live  # here: it imports DVC, which only rank 0 of the train stage needs

        # dvcyaml=None: dvc.yaml declares the outputs, metrics and plots itself; save_dvc_exp=False:
        # experiments are `dvc exp run`'s business, never a side effect of training.
        self._live = Live(str(self.live_dir), resume=bool(step), save_dvc_exp=False, dvcyaml=None)
        self._bar = tqdm(total=total, initial=min(step, total), desc="train", unit="step")

    def _resume_logs(self, step: int, keep_fids: bool) -> None:
        """Cut the histories back to ``step`` and write the summary they imply, before DVCLive reads it."""
        keep = {name: step for name in STEP_VALUES}
        if keep_fids:
            keep.update({c: step for c in self.columns})
        kept = cut_back(self.live_dir, keep)
        by_step: dict[int, dict[str, float]] = {}
        for column in self.columns:
            for s, value in kept.get(column, []):
                by_step.setdefault(s, {})[column] = value
        self.evals = sorted(by_step.items())
        self.recent = [v for _, v in kept.get("loss", [])][-RUNNING_LOSS_STEPS:]
        summary: dict[str, float | int] = {name: rows[-1][1] for name, rows in kept.items() if rows}
        write_json(Path(self.live_dir) / "metrics.json", {**summary, "step": step})

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def message(self, text: str) -> None:
        self._log(text)

    def _metrics(self, step: int, values: dict[str, float]) -> None:
        assert self._live is not None
        self._live.step = step
        for name, value in values.items():
            self._live.log_metric(name, value)
        write_summary(self._live)  # what `dvc exp show` reads while the run goes on

    def step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step done: the histories and summary, the bar's running loss, W&B."""
        if self._live is None or self._bar is None:
            return
        self._metrics(step, {"loss": loss, "lr": lr})
        self.recent = (self.recent + [loss])[-RUNNING_LOSS_STEPS:]
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.4f}")
        self.tracker.log({"loss": loss, "lr": lr}, step)

    def evaluation(self, step: int, scores: dict[str, float], n_samples: int) -> None:
        """A training-time evaluation (``scores`` holds every column): its rows are on disk when this
        returns."""
        self.evals.append((step, {c: scores[c] for c in self.columns}))
        if self._live is None:
            return
        self._metrics(step, {c: scores[c] for c in self.columns})
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

    @property
    def final_loss(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def finish(self, summary: dict[str, float | int]) -> None:
        """A finished run: ``summary`` joins the live one (the stage's metrics file) and DVCLive ends."""
        if self._live is None:
            return
        self._live.summary.update(summary)
        self._live.end()

    def close(self) -> None:
        """Finished or not (an error, a kill): the bar goes; the logs are complete up to their last row."""
        if self._bar is not None:
            self._bar.close()
