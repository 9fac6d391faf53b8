"""Optional Weights & Biases logging that never stops a run.

Disabled by default. When enabled it runs online if it can and falls back to offline mode (no
key, no network) with a warning; offline runs can be uploaded later with ``wandb sync``.

A tracker is made before training and started by :func:`ddpm_cifar.training.loop.train` once it knows
whether it resumes: a resumed run continues the W&B run whose id its checkpoint holds.

wandb is an optional dependency (the ``wandb`` extra): only runs with ``wandb.enabled: true`` import
it, and those stop with a one-line error before training where it is not installed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.config import WandbConfig
from ..runtime.errors import UserError

INSTALL_HINT = "pip install 'ddpm-cifar[wandb]'"


def import_wandb() -> Any:
    """The ``wandb`` module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import wandb
    except ModuleNotFoundError as exc:
        if exc.name != "wandb":  # installed, but something it needs is not: its own error says what
            raise
        raise UserError(f"wandb.enabled is true but wandb is not installed: {INSTALL_HINT} "
                        "(or set wandb.enabled: false)") from None
    return wandb


class Tracker:
    """The no-op tracker; :class:`WandbTracker` overrides what it logs."""

    mode = "disabled"
    run_id: str | None = None  # the W&B run, once started

    def start(self, resume_id: str | None = None) -> None:
        """Begin the run; ``resume_id`` names an earlier run to continue (None: a new one)."""

    def info(self) -> dict[str, Any]:
        """What the run was, for the training report (nothing when disabled)."""
        return {}

    def log(self, values: dict[str, float], step: int) -> None:
        pass

    def log_images(self, key: str, images: np.ndarray, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, cfg: WandbConfig, config: dict[str, Any], run_dir: Path, name: str | None):
        self.cfg, self.config, self.run_dir, self.name = cfg, config, run_dir, name
        self.mode = "not started"
        self.run: Any = None
        self.wandb: Any = None

    def start(self, resume_id: str | None = None) -> None:
        wandb = import_wandb()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # resume "allow": continue the run with this id, or start it under this id if W&B has none.
        kwargs = dict(project=self.cfg.project, name=self.name, entity=self.cfg.entity, config=self.config,
                      dir=str(self.run_dir), id=resume_id, resume="allow" if resume_id else None)
        self.wandb = wandb
        if self.cfg.mode == "online":
            try:
                self._started(wandb.init(mode="online", settings=wandb.Settings(init_timeout=30), **kwargs),
                              "online")
                return
            except Exception as exc:  # noqa: BLE001 - any login/network failure falls back to offline
                warnings.warn(f"W&B online init failed ({str(exc).splitlines()[0][:120]}); "
                              "logging offline instead (upload later with `wandb sync`)", stacklevel=2)
        self._started(wandb.init(mode="offline", **kwargs), "offline")

    def _started(self, run: Any, mode: str) -> None:
        # Read now: the report is written after the run is finished.
        self.run, self.mode, self.run_id, self.run_name = run, mode, run.id, run.name

    def info(self) -> dict[str, Any]:
        if self.run is None:
            return {}
        return {"wandb_run_id": self.run_id, "wandb_mode": self.mode, "wandb_run_name": self.run_name}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_images(self, key: str, images: np.ndarray, step: int) -> None:
        self.run.log({key: [self.wandb.Image(im) for im in images]}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def make_tracker(cfg: WandbConfig, config: dict[str, Any], run_dir: str | Path,
                 default_name: str | None = None) -> Tracker:
    """A tracker for ``cfg``, not yet started. ``default_name`` names the run when
    ``wandb.run_name`` is null (the train stage passes the DVC experiment's name)."""
    if not cfg.enabled:
        return Tracker()
    import_wandb()  # not installed: stop now, before any training
    name = cfg.run_name if cfg.run_name is not None else default_name
    return WandbTracker(cfg, config, Path(run_dir), name)
