"""A training run's state and its checkpoints: what a run carries from step to step
(:class:`TrainState`), when a checkpoint continues a run (its fingerprint), how a run resumes from
one and how it saves one.

Resume is exact: the checkpoint holds the model, EMA, optimizer, loss-scaler and RNG states, and
the data order is a pure function of (seed, position), so a run interrupted at step k and resumed
follows the same trajectory as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import checkpoint
from ..models.networks import build_model
from ..runtime.config import DiffusionConfig, ModelConfig, TrainConfig, to_dict
from ..runtime.distributed import all_ranks_agree, broadcast_from_main, rank_and_world
from ..runtime.errors import UserError
from .ema import EMA
from .runlog import RunLogger

# Train keys that do not change the trajectory: a checkpoint still resumes when only these differ
# (raising ``steps`` continues a finished run).
NON_TRAJECTORY_KEYS = (
    "steps", "checkpoint_every", "fid_every", "fid_samples", "fid_sampler", "fid_batch_size",
    "sample_grid_every", "best_metric",
)

# Bump when a code change alters what a checkpoint means (network layout, loss, data order), so
# that old checkpoints start a fresh run instead of silently resuming under the new code.
TRAJECTORY_VERSION = 3


@dataclass
class TrainOutputs:
    checkpoint: Path  # full state, for resume
    ema: Path  # EMA weights and configs, for sampling
    live: Path  # DVCLive's folder: the histories of loss, lr, fid (kid, kid_std) and the summary
    ema_best: Path | None = None  # the EMA weights of the best training-time score (None: not written)


@dataclass
class Best:
    """The EMA weights at the training-time evaluation with the lowest ``metric`` so far."""

    metric: str  # kid or fid (train.best_metric)
    step: int
    score: float
    ema: dict[str, torch.Tensor]  # a copy of the EMA state dict at ``step``

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "step": self.step, "score": self.score}


def fingerprint(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig,
                data_id: str, device: torch.device) -> str:
    """Hash of everything that shapes the training trajectory.

    Device type and precision are in it because RNG and loss-scaler states do not carry over
    between CPU and GPU, or between fp16 and bf16.
    """
    train = {k: v for k, v in to_dict(cfg).items() if k not in NON_TRAJECTORY_KEYS}
    blob = json.dumps([TRAJECTORY_VERSION, to_dict(model_cfg), to_dict(diffusion_cfg), train, data_id,
                       device.type, precision_for(device, cfg.amp)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def precision_for(device: torch.device, amp: bool) -> str:
    if not amp or device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class TrainState:
    """Everything a training run carries from one step to the next, and what a checkpoint holds of it."""

    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    noise_gen: torch.Generator  # timesteps and noise, drawn for the global batch on every rank
    precision: str  # fp32, bf16 or fp16: how the forward pass runs (from the device and train.amp)
    step: int = 0
    resumed_from: int = 0
    saved: int = 0  # the step of this run's last checkpoint, written or resumed from (0: none yet)
    best: Best | None = None  # train.best_metric's best EMA weights so far (in the checkpoint too)
    best_unwritten: bool = True  # outputs.ema_best is behind ``best`` (DVC removes it before a run)
    # [first step, last step, processes] of each earlier stretch of training (from the checkpoint)
    history: list[list[int]] = field(default_factory=list)

    @classmethod
    def create(cls, model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, rank: int) -> TrainState:
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg).to(device)  # the same initial weights on every rank
        if rank:  # dropout masks: a stream of its own per rank; rank 0 keeps the one-process stream
            torch.manual_seed(cfg.seed + 1_000_003 * rank)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        # lr: train_step sets each step's (the warm-up), before the step
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        ema = EMA(model, decay=cfg.ema_decay, update_every=cfg.ema_update_every,
                  start_step=cfg.ema_start_step, inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power)
        precision = precision_for(device, cfg.amp)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        # Shared by all ranks (same seed, same draws): timesteps and noise are drawn for the global
        # batch and sliced, like the images.
        noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        return cls(model, ema, opt, scaler, noise_gen, precision)

    def world_history(self, world: int) -> list[list[int]]:
        """The earlier stretches plus this run's, merged when it continues the last one."""
        history, start = self.history, self.resumed_from
        if self.step == start:
            return history
        if history and history[-1][2] == world and history[-1][1] == start:
            return [*history[:-1], [history[-1][0], self.step, world]]
        return [*history, [start, self.step, world]]

    def consider(self, metric: str | None, scores: dict[str, float]) -> None:
        """Keep the EMA weights when ``scores`` (this step's training-time evaluation) beat the best so
        far on ``metric`` (lower is better; a tie keeps the earlier step)."""
        if metric is None or metric not in scores:
            return
        if self.best is None or scores[metric] < self.best.score:
            weights = {k: v.detach().clone() for k, v in self.ema.model.state_dict().items()}
            self.best = Best(metric, self.step, scores[metric], weights)
            self.best_unwritten = True

    def state_dict(self, rng: dict[str, Any], world: int) -> dict[str, Any]:
        """The checkpoint's training part; ``rng`` holds every rank's generator states. The best weights
        are in it, so that a resumed run keeps the best of the steps before its checkpoint."""
        best = {"best": self.best.describe(), "best_ema": self.best.ema} if self.best else {"best": None}
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "world_history": self.world_history(world), **best}

    def load_state_dict(self, ckpt: dict[str, Any], *, rank: int, world: int, seed: int) -> int:
        """Continue from ``ckpt`` as rank ``rank`` of ``world``; returns how many processes saved it."""
        self.step = self.resumed_from = ckpt["step"]
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.noise_gen.set_state(ckpt["rng"]["noise"])
        saved_world = len(ckpt["rng"]["torch"])  # one generator state per rank
        if saved_world == world:
            torch.set_rng_state(ckpt["rng"]["torch"][rank])
            if self.noise_gen.device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank])
        else:  # the dropout streams of other ranks: reseeded, reproducibly
            torch.manual_seed(seed + 1_000_003 * rank + self.step)
        self.history = [list(h) for h in ckpt["world_history"]]
        if (best := ckpt.get("best")) is not None:
            self.best = Best(best["metric"], best["step"], best["score"], ckpt["best_ema"])
        return saved_world


@dataclass(frozen=True)
class Resumed:
    """What :func:`resume` found: the step to continue from (0: a fresh run), whether the FID curve
    logged so far still holds, and the W&B run to continue."""

    step: int = 0
    keep_fids: bool = False
    wandb_run_id: str | None = None


def _why_not_resume(ckpt: dict[str, Any], fp: str, cfg: TrainConfig, model: torch.nn.Module) -> str | None:
    """None if ``ckpt`` can continue this run; else the reason, for the log."""
    if ckpt.get("fingerprint") != fp:
        return "was made with other params, data, device or precision"
    if ckpt["step"] > cfg.steps:
        return f"is at step {ckpt['step']}, past train.steps {cfg.steps}"
    own = model.state_dict()
    theirs = ckpt.get("model", {})
    if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
        return "holds weights of another network layout"
    return None


def resume(state: TrainState, path: Path, *, fp: str, fid_id: str, cfg: TrainConfig,
           log: Callable[[str], None]) -> Resumed:
    """Load ``path`` into ``state`` when it continues this run (same fingerprint, not past
    ``cfg.steps``). Rank 0 decides and the others follow, reading the same file."""
    rank, world = rank_and_world()
    ckpt: dict[str, Any] | None = None
    found = Resumed()
    if rank == 0 and path.exists():
        try:
            ckpt = checkpoint.load(path)
            why_not = _why_not_resume(ckpt, fp, cfg, state.model)
        except checkpoint.OlderCheckpoint:
            ckpt, why_not = None, "is from an older version of this pipeline"
        if why_not is None:
            assert ckpt is not None
            found = Resumed(ckpt["step"], ckpt.get("fid_id") == fid_id, ckpt.get("wandb_run_id"))
        else:
            log(f"{path} {why_not}: starting fresh")
    found = broadcast_from_main(found)
    if not found.step:
        return found
    if rank:
        if not path.exists():
            raise UserError(f"cannot read {path}, which rank 0 resumes from: every rank "
                            "needs the run's files (a shared filesystem across nodes)")
        ckpt = checkpoint.load(path)
    assert ckpt is not None and ckpt["step"] == found.step
    try:
        saved_world = state.load_state_dict(ckpt, rank=rank, world=world, seed=cfg.seed)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # parts missing or of another shape
        raise UserError(f"{path} is not a usable checkpoint (it does not hold a whole training state: "
                        f"{type(exc).__name__}): remove it and rerun `dvc repro` to train afresh") from exc
    state.saved = found.step
    log(f"resuming from {path} at step {found.step}")
    if saved_world != world:
        log(f"the checkpoint was saved by {saved_world} processes, this run has {world}: "
            "data order and noise continue exactly, dropout masks are reseeded")
    if not found.keep_fids:
        log("the FID reference or Inception weights changed: the training FID curve starts over")
    if state.best is not None and (not found.keep_fids or state.best.metric != cfg.best_metric):
        log(f"the best weights so far (step {state.best.step}, {state.best.metric} {state.best.score:.4g}) "
            "were chosen by another measure: the best weights start over")
        state.best = None
    return found


def _gather_rng(state: torch.Tensor) -> list[torch.Tensor]:
    rank, world = rank_and_world()
    if world == 1:
        return [state]
    states: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(state, states, dst=0)
    return states or []


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about the run besides its state: configs, fingerprint, FID id."""

    payload: dict[str, Any]  # the model and diffusion configs (checkpoint.model_payload)
    fingerprint: str
    train_config: dict[str, Any]
    fid_id: str


def diverged(what: str, state: TrainState, checkpoint_path: Path, train_config: dict[str, Any]) -> UserError:
    """The one line that stops a run whose loss or weights are no longer finite (``what``, at
    ``state.step``): nothing of that state is saved, the last checkpoint stays."""
    kept = (f"{checkpoint_path} keeps step {state.saved}, the last good checkpoint" if state.saved
            else "no checkpoint was written")
    clip = " or set train.max_grad_norm" if train_config.get("max_grad_norm") is None else ""
    return UserError(f"training diverged: {what}; {kept}: lower train.lr (now {train_config['lr']:g}){clip} "
                     "in params.yaml and rerun `dvc repro` (a changed train.lr trains afresh)")


def save(state: TrainState, outputs: TrainOutputs, meta: CheckpointMeta, logger: RunLogger) -> None:
    """Checkpoint and EMA file at ``state.step``. Every rank takes part (RNG states are gathered and
    the EMA replicas compared); rank 0 writes. Weights that are not finite are never written: every rank
    sees the same weights (DDP keeps them equal), so all stop here together."""
    for part, module in (("model", state.model), ("ema", state.ema.model)):
        if bad := checkpoint.non_finite(module.state_dict()):
            raise diverged(f"the {part} weights at step {state.step} hold NaN or infinite values, in {bad}",
                           state, outputs.checkpoint, meta.train_config)
    if not all_ranks_agree(list(state.ema.model.parameters())):
        raise RuntimeError(f"step {state.step}: EMA weights differ across ranks")
    rng: dict[str, Any] = {"torch": _gather_rng(torch.get_rng_state()), "noise": state.noise_gen.get_state()}
    if state.noise_gen.device.type == "cuda":
        rng["cuda"] = _gather_rng(torch.cuda.get_rng_state())
    rank, world = rank_and_world()
    if rank:
        state.saved = state.step  # rank 0 writes it; every rank's divergence message names it alike
        return
    # A checkpoint at step k promises the logs' rows up to k: DVCLive has closed its file after each row.
    wandb = {"wandb_run_id": logger.run_id} if logger.run_id else {}
    checkpoint.save(outputs.checkpoint, {
        **meta.payload, "fingerprint": meta.fingerprint, **state.state_dict(rng, world),
        "train_config": meta.train_config, "fid_id": meta.fid_id, "world_size": world, **wandb,
    })
    checkpoint.save(outputs.ema, {**meta.payload, "step": state.step, "ema": state.ema.state_dict()})
    if outputs.ema_best is not None and state.best_unwritten:
        _save_best(state, outputs.ema_best, meta)
    state.saved = state.step


def _save_best(state: TrainState, path: Path, meta: CheckpointMeta) -> None:
    """The best EMA weights so far, or a file that says why there are none (DVC expects the output)."""
    if state.best is not None:
        best = state.best
        checkpoint.save(path, {**meta.payload, "step": best.step, "ema": best.ema, "best": best.describe()})
    else:
        metric = meta.train_config.get("best_metric")
        every = meta.train_config["fid_every"]
        why = ("train.best_metric is null" if metric is None else
               f"no training-time {metric} was measured yet (train.fid_every {every})")
        checkpoint.save(path, {**meta.payload, "step": state.step, "best": None,
                               "no_weights": f"{why}, so training kept no best weights"})
    state.best_unwritten = False
