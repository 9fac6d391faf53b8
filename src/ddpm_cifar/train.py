"""The training loop, top to bottom: data, model, EMA, resume, steps, checkpoints, logs.

Resume is exact: the checkpoint holds the model, EMA, optimizer, loss-scaler and RNG states, and
the data order is a pure function of (seed, position), so a run interrupted at step k and resumed
follows the same trajectory as an uninterrupted one (bit for bit on CPU).

Data parallel: inside a process group (see :mod:`ddpm_cifar.distributed`) the model is wrapped in
DistributedDataParallel and ``train.batch_size`` stays the global micro-batch: rank r of w takes
images [r*b, (r+1)*b) of it, b = batch_size / w. The images, their timesteps and their noise are
drawn for the whole global batch on every rank and then sliced, so they do not depend on the world
size; only the order of floating-point sums in the gradient all-reduce does. Rank 0 alone writes
checkpoints, logs and W&B.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint
from .config import DiffusionConfig, ModelConfig, TrainConfig, to_dict
from .diffusion import GaussianDiffusion
from .distributed import all_ranks_agree, broadcast_from_main, mean_over_ranks, rank_and_world
from .ema import EMA
from .errors import UserError
from .fileio import atomic_path
from .networks import build_model
from .tracking import Tracker
from .unet import count_parameters

# Train keys that do not change the trajectory: a checkpoint still resumes when only these differ
# (raising ``steps`` continues a finished run).
NON_TRAJECTORY_KEYS = (
    "steps", "checkpoint_every", "fid_every", "fid_samples", "fid_sampler", "fid_sample_steps",
    "fid_spacing", "fid_batch_size", "sample_grid_every",
)

# Bump when a code change alters what a checkpoint means (network layout, loss, data order), so
# that old checkpoints start a fresh run instead of silently resuming under the new code.
# 2: the EMA counts steps like ema-pytorch (one step later than before) and may warm up.
TRAJECTORY_VERSION = 2

# Called on every rank (the FID may be computed by all of them together); returns the FID.
FidFn = Callable[[torch.nn.Module, GaussianDiffusion], float]


@dataclass
class TrainOutputs:
    checkpoint: Path  # full state, for resume
    ema: Path  # EMA weights and configs, for sampling
    loss_log: Path  # TSV: step, loss, lr
    fid_log: Path  # TSV: step, fid


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

    def metrics(self) -> dict[str, Any]:
        """The numbers that can differ between experiments (DVC metrics); ``fid`` only when measured."""
        out: dict[str, Any] = {"steps": self.step, "final_loss": round(self.final_loss, 6),
                               "images_per_second": round(self.images_per_second, 2),
                               "parameters": self.parameters}
        if self.fids:
            out["fid"] = self.fids[-1][1]
        return out

    def report(self) -> dict[str, Any]:
        """How the run went: provenance beside the metrics."""
        return {"resumed_from_step": self.resumed_from, "precision": self.precision,
                "world_size": self.world_size, "world_history": self.world_history,
                "last_fid": self.fids[-1][1] if self.fids else None}


def fingerprint(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig,
                data_id: str, device: torch.device) -> str:
    """Hash of everything that shapes the training trajectory.

    Device type and precision are in it because RNG and loss-scaler states do not carry over
    between CPU and GPU, or between fp16 and bf16.
    """
    train = {k: v for k, v in to_dict(cfg).items() if k not in NON_TRAJECTORY_KEYS}
    model = to_dict(model_cfg)
    if model["arch"] == "unet":
        del model["arch"]  # as before model.arch existed, so that those checkpoints still resume
    blob = json.dumps([TRAJECTORY_VERSION, model, to_dict(diffusion_cfg), train, data_id,
                       device.type, precision_for(device, cfg.amp)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def precision_for(device: torch.device, amp: bool) -> str:
    if not amp or device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class BatchSource:
    """Deterministic, augmenting batches from a uint8 (N, H, W, C) array.

    Image position p (counting from the start of training) maps to epoch p // N and to the
    (p % N)-th entry of that epoch's permutation, seeded by (seed, epoch): the batch at any step
    can be rebuilt after a restart without replaying the ones before it.
    """

    def __init__(self, images: np.ndarray, seed: int, device: torch.device):
        # (N, H, W, C) uint8 -> (N, C, H, W) uint8 on the device: CIFAR-10 is 150 MB, so the whole
        # set lives on the device and batching is an index, with no loader processes.
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
        self.n, self.seed = len(images), seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def batch(self, start: int, size: int, part: slice = slice(None)) -> torch.Tensor:
        """Images at positions [start, start + size), randomly h-flipped, float in [-1, 1].

        ``part`` selects a rank's share of that batch; the images and flips are those of the whole
        batch, so a share does not depend on how the batch is split.
        """
        pos = torch.arange(start, start + size)
        epochs = pos // self.n
        idx = torch.empty(size, dtype=torch.long)
        for epoch in epochs.unique().tolist():  # one or two epochs per batch
            mask = epochs == epoch
            idx[mask] = self._permutation(epoch)[pos[mask] % self.n]
        # The flip decision is seeded by position too, for the same reason.
        g = torch.Generator().manual_seed(self.seed * 7_919 + start)
        flip = torch.rand(size, generator=g) < 0.5
        idx, flip = idx[part], flip[part].to(self.images.device)
        x = self.images[idx.to(self.images.device)].float() / 127.5 - 1  # (b, C, H, W)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _why_not_resume(ckpt: dict[str, Any], fp: str, cfg: TrainConfig, model: torch.nn.Module) -> str | None:
    """None if ``ckpt`` can continue this run; else the reason, for the log."""
    if ckpt.get("fingerprint") != fp:
        return "was made with other params, data, device or precision"
    if int(ckpt["step"]) > cfg.steps:
        return f"is at step {ckpt['step']}, past train.steps {cfg.steps}"
    own = model.state_dict()
    theirs = ckpt.get("model", {})
    if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
        return "holds weights of another network layout"
    return None


def _read_log(path: Path, max_step: int) -> list[list[str]]:
    """Rows of a TSV log up to ``max_step``; torn last lines from a crash are dropped."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[:1], rows[1:]
    keep = [r for r in body if len(r) == len(header[0]) and r[0].isdigit() and int(r[0]) <= max_step]
    return keep


class TsvLog:
    def __init__(self, path: Path, header: list[str], keep_until: int | None):
        """Open ``path`` for appending, keeping its rows up to step ``keep_until`` (None: none).

        The kept rows are rewritten atomically first, so a crash right after a resume cannot
        lose the history.
        """
        rows = _read_log(path, keep_until) if keep_until is not None else []
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


class NullLog:
    """What ranks other than 0 write their logs to."""

    def write(self, *values: object) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _per_rank(states: Any) -> list[torch.Tensor]:
    """A checkpoint's RNG states, one per rank (checkpoints from before DDP hold one tensor)."""
    return [states] if isinstance(states, torch.Tensor) else list(states)


def train(
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    cfg: TrainConfig,
    *,
    images: np.ndarray,
    data_id: str,
    outputs: TrainOutputs,
    device: torch.device,
    tracker: Tracker | None = None,
    fid_fn: FidFn | None = None,
    fid_id: str = "",
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train, resuming from ``outputs.checkpoint`` when it was made by the same configuration.

    ``fid_id`` names what the training-time FID is measured against (Inception weights and
    reference statistics); when it changed since the checkpoint, the old FID curve is dropped.
    In a process group every rank calls this with the same arguments; ``tracker`` and ``log`` are
    used on rank 0 only. The tracker is started here, continuing the W&B run that the checkpoint
    resumed from names; the caller finishes it.
    """
    rank, world = rank_and_world()
    main = rank == 0
    if not main:
        tracker, log = Tracker(), lambda _: None
    expected = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise UserError(f"the data are {images.shape[1:]} images but the model expects {expected} "
                        "(model.image_size, model.channels)")
    if fid_fn is not None and cfg.fid_every and cfg.fid_sample_steps > diffusion_cfg.timesteps:
        raise UserError(f"train.fid_sample_steps {cfg.fid_sample_steps} exceeds diffusion.timesteps "
                        f"{diffusion_cfg.timesteps}")
    if cfg.batch_size % world:
        raise UserError(f"train.batch_size {cfg.batch_size} does not divide among {world} processes: "
                        "it is the global batch, and every rank takes an equal share")
    tracker = tracker or Tracker()
    diffusion = GaussianDiffusion(diffusion_cfg).to(device)
    fp = fingerprint(model_cfg, diffusion_cfg, cfg, data_id, device)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)  # the same initial weights on every rank
    if rank:  # dropout masks: a stream of its own per rank; rank 0 keeps the one-process stream
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    ema = EMA(model, decay=cfg.ema_decay, update_every=cfg.ema_update_every, start_step=cfg.ema_start_step,
              inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power)
    precision = precision_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    # Shared by all ranks (same seed, same draws): timesteps and noise are drawn for the global
    # batch and sliced, like the images.
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    data = BatchSource(images, cfg.seed, device)

    # Rank 0 decides whether to resume; the others follow, reading the same file.
    step, keep_fids = 0, False
    history: list[list[int]] = []  # [first step, last step, processes] of each stretch of training
    ckpt: dict[str, Any] | None = None
    if main and outputs.checkpoint.exists():
        ckpt = checkpoint.load(outputs.checkpoint)
        why_not = _why_not_resume(ckpt, fp, cfg, model)
        if why_not is None:
            step, keep_fids = int(ckpt["step"]), ckpt.get("fid_id", "") == fid_id
        else:
            log(f"{outputs.checkpoint} {why_not}: starting fresh")
    step, keep_fids = broadcast_from_main((step, keep_fids))
    # A resumed run continues its W&B run (tracker is the no-op one on other ranks).
    tracker.start(ckpt.get("wandb_run_id") if step and ckpt is not None else None)
    if step:
        if not main:
            if not outputs.checkpoint.exists():
                raise UserError(f"cannot read {outputs.checkpoint}, which rank 0 resumes from: every rank "
                                "needs the run's files (a shared filesystem across nodes)")
            ckpt = checkpoint.load(outputs.checkpoint)
        assert ckpt is not None and int(ckpt["step"]) == step
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        noise_gen.set_state(ckpt["rng"]["noise"])
        saved_world = len(_per_rank(ckpt["rng"]["torch"]))
        if saved_world == world:
            torch.set_rng_state(_per_rank(ckpt["rng"]["torch"])[rank])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(_per_rank(ckpt["rng"]["cuda"])[rank])
        else:  # the dropout streams of other ranks: reseeded, reproducibly
            torch.manual_seed(cfg.seed + 1_000_003 * rank + step)
        history = [list(h) for h in ckpt.get("world_history", [[0, step, saved_world]])]
        log(f"resuming from {outputs.checkpoint} at step {step}")
        if saved_world != world:
            log(f"the checkpoint was saved by {saved_world} processes, this run has {world}: "
                "data order and noise continue exactly, dropout masks are reseeded")
        if not keep_fids:
            log("the FID reference or Inception weights changed: the training FID curve starts over")
    ckpt = None  # free the optimizer state copies before training
    resumed_from = step
    if step >= cfg.steps and step > 0:
        log(f"checkpoint is already at step {step} = train.steps: nothing to train")

    fids: list[tuple[int, float]] = []
    recent: list[float] = []
    loss_log: TsvLog | NullLog = NullLog()
    fid_log: TsvLog | NullLog = NullLog()
    if main:
        fid_keep = step if step and keep_fids else None
        fids = [(int(r[0]), float(r[1])) for r in _read_log(outputs.fid_log, fid_keep)] if fid_keep else []
        # The running loss shown and reported spans a resume.
        recent = [float(r[1]) for r in _read_log(outputs.loss_log, step)][-100:] if step else []
        loss_log = TsvLog(outputs.loss_log, ["step", "loss", "lr"], step if step else None)
        fid_log = TsvLog(outputs.fid_log, ["step", "fid"], fid_keep)

    def gather_rng(state: torch.Tensor) -> list[torch.Tensor]:
        if world == 1:
            return [state]
        states: list[Any] | None = [None] * world if main else None
        torch.distributed.gather_object(state, states, dst=0)
        return states or []

    def world_history() -> list[list[int]]:
        if step == resumed_from:
            return history
        if history and history[-1][2] == world and history[-1][1] == resumed_from:
            return [*history[:-1], [history[-1][0], step, world]]
        return [*history, [resumed_from, step, world]]

    def save_checkpoint() -> None:
        # Every rank takes part: RNG states are gathered, and replicas are compared.
        if not all_ranks_agree(list(ema.model.parameters())):
            raise RuntimeError(f"step {step}: EMA weights differ across ranks")
        rng: dict[str, Any] = {"torch": gather_rng(torch.get_rng_state()), "noise": noise_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = gather_rng(torch.cuda.get_rng_state())
        if not main:
            return
        loss_log.flush()
        fid_log.flush()
        payload = checkpoint.model_payload(model_cfg, diffusion_cfg)
        checkpoint.save(outputs.checkpoint, {
            **payload, "fingerprint": fp, "step": step, "model": model.state_dict(),
            "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng, "train_config": to_dict(cfg), "fid_id": fid_id, "world_size": world,
            "world_history": world_history(),
            **({"wandb_run_id": tracker.run_id} if tracker.run_id else {}),
        })
        checkpoint.save(outputs.ema, {**payload, "step": step, "ema": ema.state_dict()})

    def run_fid() -> None:
        assert fid_fn is not None
        value = fid_fn(ema.model, diffusion)
        fids.append((step, value))
        fid_log.write(step, f"{value:.4f}")
        fid_log.flush()
        tracker.log({"fid": value}, step)
        log(f"step {step}: FID {value:.2f} ({cfg.fid_samples} samples, EMA weights)")

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    t0, images_seen = time.perf_counter(), 0
    share = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc="train", unit="step", disable=not main)
    try:
        while step < cfg.steps:
            total = 0.0
            for micro in range(cfg.grad_accum):
                position = (step * cfg.grad_accum + micro) * cfg.batch_size
                x0 = data.batch(position, cfg.batch_size, share)  # (batch_size / world, C, H, W)
                if device.type == "cuda":
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), device=device,
                                  generator=noise_gen)[share]
                noise = torch.randn((cfg.batch_size, *x0.shape[1:]), device=device,
                                    generator=noise_gen)[share]
                ctx = (torch.autocast(device.type, autocast_dtype) if precision != "fp32"
                       else contextlib.nullcontext())
                # DDP averages the ranks' gradients (= the global batch mean, as the shares are
                # equal), once per optimizer step: the other micro-steps only accumulate.
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or world == 1 else net.no_sync()  # type: ignore[operator]
                with sync:
                    with ctx:
                        loss = diffusion.loss(net, x0, t, noise) / cfg.grad_accum
                    scaler.scale(loss).backward()
                total += loss.item()
            if cfg.max_grad_norm is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            ema.update(model, step)
            images_seen += cfg.batch_size * cfg.grad_accum
            total = mean_over_ranks(total, device)

            loss_log.write(step, f"{total:.6f}", f"{cfg.lr:.3g}")
            recent = (recent + [total])[-100:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            tracker.log({"loss": total, "lr": cfg.lr}, step)
            # FID before the checkpoint: a checkpoint at step k promises that step k's FID row is
            # written, so an interruption during the FID cannot leave a gap in the curve.
            if fid_fn is not None and cfg.fid_every and (step % cfg.fid_every == 0 or step == cfg.steps):
                run_fid()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint()
            grid_due = cfg.sample_grid_every and step % cfg.sample_grid_every == 0
            if main and grid_due and tracker.mode != "disabled":
                from .sampling import generate_images

                grid = generate_images(ema.model, diffusion, list(range(16)), sampler=cfg.fid_sampler,
                                       steps=cfg.fid_sample_steps, spacing=cfg.fid_spacing, batch_size=16,
                                       shape=(model_cfg.channels, model_cfg.image_size,
                                              model_cfg.image_size), device=device, progress=False)
                tracker.log_images("samples", grid, step)
        if resumed_from == step:
            if fid_fn is not None and cfg.fid_every and not broadcast_from_main(bool(fids)):
                run_fid()  # the curve was dropped for a new reference: measure the final weights
            save_checkpoint()  # nothing to train: rewrite ema.pt, which DVC removed before the rerun
    finally:
        bar.close()
        loss_log.close()
        fid_log.close()
    elapsed = time.perf_counter() - t0
    return TrainResult(
        step=step,
        resumed_from=resumed_from,
        final_loss=sum(recent) / len(recent) if recent else float("nan"),
        images_per_second=images_seen / elapsed if images_seen else 0.0,
        precision=precision,
        parameters=count_parameters(model),
        world_size=world,
        world_history=world_history(),
        ema=ema.model,
        fids=fids,
    )
