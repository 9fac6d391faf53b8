"""Optional Weights & Biases logging that never stops a run.

Disabled by default. When enabled it runs online if it can and falls back to offline mode (no
key, no network) with a warning; offline runs can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .config import WandbConfig


class Tracker:
    """The no-op tracker; :class:`WandbTracker` overrides what it logs."""

    mode = "disabled"

    def log(self, values: dict[str, float], step: int) -> None:
        pass

    def log_images(self, key: str, images: np.ndarray, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, run: Any, wandb: Any, mode: str):
        self.run, self.wandb, self.mode = run, wandb, mode

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_images(self, key: str, images: np.ndarray, step: int) -> None:
        self.run.log({key: [self.wandb.Image(im) for im in images]}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: WandbConfig, config: dict[str, Any], run_dir: str | Path,
                 resume_id: str | None = None) -> Tracker:
    if not cfg.enabled:
        return Tracker()
    import wandb

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    kwargs = dict(project=cfg.project, name=cfg.run_name, entity=cfg.entity, config=config,
                  dir=str(run_dir), id=resume_id, resume="allow" if resume_id else None)
    if cfg.mode == "online":
        try:
            run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=30), **kwargs)
            return WandbTracker(run, wandb, "online")
        except Exception as exc:  # noqa: BLE001 - any login/network failure falls back to offline
            warnings.warn(f"W&B online init failed ({str(exc).splitlines()[0][:120]}); "
                          "logging offline instead (upload later with `wandb sync`)", stacklevel=2)
    run = wandb.init(mode="offline", **kwargs)
    return WandbTracker(run, wandb, "offline")
