"""The training loop, top to bottom: data, model, EMA, resume, steps, checkpoints, logs.

:func:`train` reads top to bottom; what it carries from step to step is one
:class:`~ddpm_cifar.training.state.TrainState` (model, EMA, optimizer, loss scaler, noise generator,
step, world history), which ``train_state.resume`` restores from a checkpoint (exactly),
:func:`train_step` advances and ``train_state.save`` writes. What the run reports (logs, bar, W&B)
goes through one :class:`~ddpm_cifar.training.runlog.RunLogger`.

Data parallel: inside a process group (see :mod:`ddpm_cifar.runtime.distributed`) the model is wrapped in
DistributedDataParallel and ``train.batch_size`` stays the global micro-batch: rank r of w takes
images [r*b, (r+1)*b) of it, b = batch_size / w. The images, their timesteps and their noise are
drawn for the whole global batch on every rank and then sliced, so they do not depend on the world
size; only the order of floating-point sums in the gradient all-reduce does. Rank 0 alone writes
checkpoints, logs and W&B.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..diffusion.process import GaussianDiffusion
from ..models import checkpoint
from ..models.unet import count_parameters
from ..runtime.config import DiffusionConfig, ModelConfig, TrainConfig, to_dict
from ..runtime.distributed import broadcast_from_main, mean_over_ranks, rank_and_world
from ..runtime.errors import UserError
from .batches import BatchSource
from .runlog import RunLogger
from .state import CheckpointMeta, TrainOutputs, TrainState, diverged, fingerprint, resume, save
from .tracking import Tracker

# The training-time evaluation as the caller hands it in (ddpm_cifar.evaluation.scoring.training_evaluation):
# (EMA model, diffusion) -> {"fid": ..., "kid": ..., "kid_std": ...}, called on every rank, which all get
# the same values.
ScoreFn = Callable[[torch.nn.Module, GaussianDiffusion], dict[str, float]]


@dataclass(frozen=True)
class TrainingEval:
    """What scores the EMA weights during training: ``fn``; the ``columns`` it returns, in the FID log's
    order ("fid" first); ``id``, what the values depend on besides the weights (when it changed since the
    checkpoint, the curve logged so far is dropped); ``n``, the images it samples."""

    fn: ScoreFn
    columns: tuple[str, ...] = ("fid",)
    id: str = ""
    n: int = 0


@dataclass
class TrainResult:
    step: int
    resumed_from: int
    final_loss: float
    images_per_second: float  # all ranks together
    precision: str
    parameters: int
    world_size: int  # processes of this run
    world_history: list[list[int]]  # [first step, last step, processes] for every stretch of training
    ema: torch.nn.Module  # this rank's EMA weights
    fids: list[tuple[int, float]] = field(default_factory=list)
    kids: list[tuple[int, float]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # metric, step and score of the best weights kept

    def metrics(self) -> dict[str, Any]:
        """The numbers that can differ between experiments (DVC metrics, beside DVCLive's ``step`` and last
        ``loss``, ``lr``); ``fid`` only when measured."""
        out: dict[str, Any] = {"final_loss": round(self.final_loss, 6),
                               "images_per_second": round(self.images_per_second, 2),
                               "parameters": self.parameters}
        if self.fids:
            out["fid"] = self.fids[-1][1]
        if self.kids:
            out["kid"] = self.kids[-1][1]
        if self.best:
            out["best_step"] = self.best["step"]
        return out

    def report(self) -> dict[str, Any]:
        """How the run went: provenance beside the metrics."""
        return {"resumed_from_step": self.resumed_from, "precision": self.precision,
                "world_size": self.world_size, "world_history": self.world_history,
                "last_fid": self.fids[-1][1] if self.fids else None,
                "last_kid": self.kids[-1][1] if self.kids else None, "best_weights": self.best}


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of the optimizer step taken after ``step`` steps: ``cfg.lr``, warmed up
    linearly over ``cfg.warmup_steps`` as in Ho et al.'s code (lr x min(1, step / warmup), so the
    first step's is 0)."""
    if cfg.warmup_steps == 0:
        return cfg.lr
    return cfg.lr * min(1.0, step / cfg.warmup_steps)


def train_step(state: TrainState, net: torch.nn.Module, data: BatchSource, diffusion: GaussianDiffusion,
               cfg: TrainConfig) -> tuple[float, float]:
    """One optimizer step of ``cfg.grad_accum`` micro-steps; returns the loss, averaged over ranks,
    and the learning rate the step used.

    ``net`` is ``state.model`` or its DistributedDataParallel wrapper."""
    rank, world = rank_and_world()
    device = state.noise_gen.device
    share = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    autocast_dtype = torch.bfloat16 if state.precision == "bf16" else torch.float16
    total = 0.0
    for micro in range(cfg.grad_accum):
        position = (state.step * cfg.grad_accum + micro) * cfg.batch_size
        x0 = data.batch(position, cfg.batch_size, share)  # (batch_size / world, C, H, W)
        if device.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), device=device,
                          generator=state.noise_gen)[share]
        noise = torch.randn((cfg.batch_size, *x0.shape[1:]), device=device, generator=state.noise_gen)[share]
        ctx = (torch.autocast(device.type, autocast_dtype) if state.precision != "fp32"
               else contextlib.nullcontext())
        # DDP averages the ranks' gradients (= the global batch mean, as the shares are equal), once
        # per optimizer step: the other micro-steps only accumulate.
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or world == 1 else net.no_sync()  # type: ignore[operator]
        with sync:
            with ctx:
                loss = diffusion.loss(net, x0, t, noise) / cfg.grad_accum
            state.scaler.scale(loss).backward()
        total += loss.item()
    lr = learning_rate(cfg, state.step)
    for group in state.opt.param_groups:  # the warm-up: a function of the step, so a resumed run agrees
        group["lr"] = lr
    if cfg.max_grad_norm is not None:
        state.scaler.unscale_(state.opt)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.max_grad_norm)
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    state.step += 1
    state.ema.update(state.model, state.step)
    return mean_over_ranks(total, device), lr


def _check_inputs(images: np.ndarray, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig,
                  cfg: TrainConfig, world: int) -> None:
    expected = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise UserError(f"the data are {images.shape[1:]} images but the model expects {expected} "
                        "(model.image_size, model.channels)")
    cfg.fid_sampler.check_steps(diffusion_cfg.timesteps, "train.fid_sampler")
    if cfg.batch_size % world:
        raise UserError(f"train.batch_size {cfg.batch_size} does not divide among {world} processes: "
                        "it is the global batch, and every rank takes an equal share")


def _sample_grid(state: TrainState, diffusion: GaussianDiffusion, model_cfg: ModelConfig,
                 cfg: TrainConfig) -> np.ndarray:
    """16 images of the EMA weights with the training-time FID's sampler, for W&B."""
    from ..diffusion.generate import generate_images  # only when W&B is on

    return generate_images(state.ema.model, diffusion, list(range(16)), cfg.fid_sampler, batch_size=16,
                           shape=(model_cfg.channels, model_cfg.image_size, model_cfg.image_size),
                           device=state.noise_gen.device, progress=False)


def _data_parallel(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """The model in training mode, wrapped in DistributedDataParallel inside a process group."""
    model.train()
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def train(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig, *, images: np.ndarray,
          data_id: str, outputs: TrainOutputs, device: torch.device, tracker: Tracker | None = None,
          evaluation: TrainingEval | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train, resuming from ``outputs.checkpoint`` when it was made by the same configuration.

    ``evaluation`` scores the EMA weights every ``cfg.fid_every`` steps (its curve restarts when its
    ``id`` changed since the checkpoint), and ``cfg.best_metric`` picks the best of them for
    ``outputs.ema_best``. In a process group every rank calls this with the same arguments;
    ``tracker`` (started here, continuing the checkpoint's W&B run; the caller finishes it) and
    ``log`` are used on rank 0 only.
    """
    fid_id = evaluation.id if evaluation else ""
    rank, world = rank_and_world()
    _check_inputs(images, model_cfg, diffusion_cfg, cfg, world)
    diffusion = GaussianDiffusion(diffusion_cfg).to(device)
    fp = fingerprint(model_cfg, diffusion_cfg, cfg, data_id, device)
    meta = CheckpointMeta(checkpoint.model_payload(model_cfg, diffusion_cfg), fp, to_dict(cfg), fid_id)
    state = TrainState.create(model_cfg, cfg, device, rank)
    data = BatchSource(images, cfg.seed, device)
    columns = evaluation.columns if evaluation else ("fid",)
    logger = RunLogger(outputs.live, tracker or Tracker(), main=rank == 0, log=log, columns=columns)
    found = resume(state, outputs.checkpoint, fp=fp, fid_id=fid_id, cfg=cfg, log=logger.message)
    if state.step >= cfg.steps and state.step > 0:
        logger.message(f"checkpoint is already at step {state.step} = train.steps: nothing to train")
    net = _data_parallel(state.model, device, world)
    t0, images_seen = time.perf_counter(), 0
    logger.start(state.step, cfg.steps, keep_fids=found.keep_fids, wandb_run_id=found.wandb_run_id)
    try:
        while state.step < cfg.steps:
            loss, lr = train_step(state, net, data, diffusion, cfg)
            if not math.isfinite(loss):  # averaged over ranks: every rank stops here at the same step
                raise diverged(f"the loss at step {state.step} is {loss}", state, outputs.checkpoint,
                               meta.train_config)
            images_seen += cfg.batch_size * cfg.grad_accum
            logger.step(state.step, loss, lr)
            # FID before the checkpoint: a checkpoint at step k promises that step k's FID row is
            # written, so an interruption during the FID cannot leave a gap in the curve.
            if evaluation is not None and cfg.fid_every and (state.step % cfg.fid_every == 0
                                                             or state.step == cfg.steps):
                _evaluate(state, evaluation, diffusion, logger, cfg)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                save(state, outputs, meta, logger)
            if cfg.sample_grid_every and state.step % cfg.sample_grid_every == 0 and logger.wants_images():
                logger.images("samples", _sample_grid(state, diffusion, model_cfg, cfg), state.step)
        if state.resumed_from == state.step:
            if evaluation is not None and cfg.fid_every and not broadcast_from_main(bool(logger.evals)):
                # the curve was dropped for a new reference: measure the final weights
                _evaluate(state, evaluation, diffusion, logger, cfg)
            save(state, outputs, meta, logger)  # nothing to train: rewrite ema.pt, which DVC removed
        result = _result(state, logger, world, images_per_second=images_seen / (time.perf_counter() - t0)
                         if images_seen else 0.0)
        logger.finish(result.metrics())  # the summary DVCLive keeps: the stage's metrics file
    finally:
        logger.close()
    return result


def _result(state: TrainState, logger: RunLogger, world: int, images_per_second: float) -> TrainResult:
    """What the run reports, from its state and its logger's series."""
    return TrainResult(
        step=state.step, resumed_from=state.resumed_from, final_loss=logger.final_loss,
        images_per_second=images_per_second, precision=state.precision,
        parameters=count_parameters(state.model), world_size=world,
        world_history=state.world_history(world), ema=state.ema.model, fids=logger.series("fid"),
        kids=logger.series("kid"), best=state.best.describe() if state.best else None,
    )


def _evaluate(state: TrainState, evaluation: TrainingEval, diffusion: GaussianDiffusion, logger: RunLogger,
              cfg: TrainConfig) -> None:
    """Score the EMA weights at this step: the log row, then the best weights when they improved."""
    scores = evaluation.fn(state.ema.model, diffusion)
    logger.evaluation(state.step, scores, evaluation.n or cfg.fid_samples)
    state.consider(cfg.best_metric, scores)
