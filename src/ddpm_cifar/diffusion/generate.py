"""Sampling images: one per seed, in batches of one shape (:class:`FixedBatch`), finished batches
cached so that an interrupted run resumes, split over a process group's ranks, quantised to uint8;
and the denoising strip's frames. The samplers themselves are in :mod:`ddpm_cifar.diffusion.samplers`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..runtime.config import SampleConfig, SamplerConfig
from ..runtime.distributed import gather_to_all, gather_to_main, rank_and_world, shard
from ..runtime.fileio import atomic_path
from ..runtime.loaders import Array, Source, json_text, load_npz
from .process import GaussianDiffusion, Model
from .samplers import SAMPLING_VERSION, final, run_sampler

# auto: the network under bf16 autocast on a CUDA device that supports it, float32 elsewhere;
# fp32: never autocast. The samplers' own arithmetic is float32 either way.
PRECISIONS = ("auto", "fp32")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether the network runs under bf16 autocast on ``device`` at ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


class FixedBatch:
    """The network called on batches of exactly ``size`` images, the last one padded.

    Kernels are chosen by tensor shape, so a network called on 1 image and on 64 rounds
    differently. With every call the same shape, image i's arithmetic is the same whatever else is
    sampled beside it: same seed, same pixels, for any number of images (on the same device and
    thread count). The padding rows repeat the last image and are dropped from the output.
    """

    def __init__(self, model: Model, size: int):
        if size < 1:
            raise ValueError(f"batch size must be at least 1, got {size}")
        self.model = model
        self.size = size

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pad = -b % self.size
        if pad:
            x = torch.cat((x, x[-1:].expand(pad, *x.shape[1:])))  # (B + pad, C, H, W)
            t = torch.cat((t, t[-1:].expand(pad)))
        out = [self.model(xc, tc) for xc, tc in zip(x.split(self.size), t.split(self.size))]
        return torch.cat(out)[:b]


def for_sampling(model: torch.nn.Module, device: torch.device | str, compile: bool = False) -> Model:
    """The network as samplers should call it: on CUDA in channels_last memory layout (faster
    convolutions; the inputs are converted at each call) and, with ``compile``, through
    torch.compile. On CPU the model is returned as it is: neither helps there (see benchmarks/)."""
    device = torch.device(device)
    if device.type != "cuda":
        return model
    model = model.to(memory_format=torch.channels_last)
    net: Model = torch.compile(model) if compile else model

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x.contiguous(memory_format=torch.channels_last), t)

    return call


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, quantised as a saved PNG would be."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def generate_images(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    spec: SamplerConfig,
    *,
    batch_size: int,
    shape: tuple[int, int, int],
    device: torch.device | str,
    precision: str = "auto",
    progress: bool = True,
    desc: str = "sample",
    cache_dir: str | Path | None = None,
    cache_key: str = "",
) -> np.ndarray:
    """Sample one image per seed with ``spec``, in batches; returns uint8 (N, H, W, C).

    With ``cache_dir``, each finished batch is saved there, so an interrupted run resumes at the
    first missing batch; ``cache_key`` identifies the run (model and settings) the batches belong to.

    Under bf16 autocast (``precision``, :func:`use_bf16`) only the network runs in bf16; the sampler's own
    arithmetic stays in float32. The network always sees ``batch_size`` images (the last batch is
    padded), so an image does not depend on how many others are sampled.
    """
    device = torch.device(device)
    spec.check_steps(diffusion.num_timesteps)
    use_amp = use_bf16(precision, device)
    net = FixedBatch(model, batch_size)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key_file = cache_dir / "key.txt"
        if not key_file.is_file() or key_file.read_bytes() != cache_key.encode():
            shutil.rmtree(cache_dir, ignore_errors=True)  # batches of another run: unusable
            cache_dir.mkdir(parents=True)
            key_file.write_text(cache_key)
    out: list[np.ndarray] = []
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(seeds), batch_size):
            batch = seeds[start : start + batch_size]
            shard = cache_dir / f"{start:08d}-{len(batch)}.npy" if cache_dir is not None else None
            images = _cached_batch(shard, (len(batch), shape[1], shape[2], shape[0]))
            if images is None:
                with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                    x = final(run_sampler(net, diffusion, batch, spec, shape=shape, device=device))
                images = to_uint8(x)
                if shard is not None:
                    with atomic_path(shard) as tmp, open(tmp, "wb") as f:
                        np.save(f, images)
            out.append(images)
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)


def _cached_batch(path: Path | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The batch an interrupted run finished, or None when there is none or it is damaged: a cache, so a
    bad file is sampled again rather than refused."""
    if path is None or not path.is_file():
        return None
    try:
        images = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - damaged or foreign: any reader error means "sample it again"
        return None
    return images if images.dtype == np.uint8 and images.shape == shape else None


def frame_indices(steps: int, frames: int) -> set[int]:
    """SampleStep indices of ``frames`` states evenly spread from x_T (0) to x_0 (``steps``); all
    ``steps + 1`` states when fewer are available."""
    n_states = steps + 1  # x_T plus one state per step
    return {int(round(i)) for i in np.linspace(0, steps, min(frames, n_states))}


def denoising_frames(
    model: Model,
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    spec: SamplerConfig,
    *,
    frames: int,
    shape: tuple[int, int, int],
    device: torch.device | str,
    precision: str = "auto",
) -> tuple[np.ndarray, list[int]]:
    """States x_T ... x_0 of ``spec``'s chain at ``frames`` evenly spaced points of it.

    Returns uint8 (len(seeds), frames, H, W, C) and the timestep of each frame (-1 = x_0).
    """
    device = torch.device(device)
    spec.check_steps(diffusion.num_timesteps)
    wanted = frame_indices(spec.steps, frames)
    picked: list[np.ndarray] = []
    timesteps: list[int] = []
    bf16 = use_bf16(precision, device)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for s in run_sampler(model, diffusion, seeds, spec, shape=shape, device=device):
            if s.index in wanted:
                picked.append(to_uint8(s.x))
                timesteps.append(s.t)
    return np.stack(picked, axis=1), timesteps  # (B, F, H, W, C)


def generate_images_sharded(model: Model, diffusion: GaussianDiffusion, seeds: Sequence[int],
                            spec: SamplerConfig, *, batch_size: int, shape: tuple[int, int, int],
                            device: torch.device | str, progress: bool = True, desc: str = "sample",
                            cache_dir: str | Path | None = None, cache_key: str = "",
                            everywhere: bool = False) -> np.ndarray | None:
    """:func:`generate_images` split across the process group's ranks by batch.

    Returns uint8 (N, H, W, C) in seed order on rank 0 (on every rank with ``everywhere``) and None
    elsewhere. The progress bar is shown on rank 0 only.
    """
    rank, world = rank_and_world()
    if cache_dir is not None and world > 1:
        # Each rank resumes its own shard; the batch files of different shards must not mix.
        cache_dir = Path(cache_dir) / f"rank{rank}-of-{world}"
    mine = shard(list(seeds), batch_size, rank, world)
    local = generate_images(model, diffusion, mine, spec, batch_size=batch_size, shape=shape, device=device,
                            progress=progress and rank == 0, desc=desc, cache_dir=cache_dir,
                            cache_key=cache_key)
    if everywhere:
        return gather_to_all(local, len(seeds), batch_size)
    return gather_to_main(local, len(seeds), batch_size)


def sample_cache_key(ckpt_sha256: str, cfg: SampleConfig, device: torch.device) -> str:
    """What finished sample batches of the ``sample`` section's sampler depend on; the device too,
    since CUDA runs under bf16."""
    # batch_size too: the network always sees full batches of it, and its rounding depends on it
    return (f"{SAMPLING_VERSION}:{ckpt_sha256}:{cfg.sampler.key()}:{cfg.seed}:{cfg.compile}:"
            f"{cfg.batch_size}:{device.type}")


# The sample stage's output, as the evaluate stage reads it back.
SAMPLE_ARRAYS = {"images": Array("uint8", ("N", "H", "W", 3)), "seeds": Array("int", ("N",)),
                 "config": Array("text"), "checkpoint_step": Array("int")}
SAMPLES = Source("a sample set .npz", "remove it and rerun `dvc repro`, whose sample stage writes it again",
                 missing="run `dvc repro`, whose sample stage writes it")


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # uint8 (N, H, W, 3)
    seeds: np.ndarray  # (N,): image i was sampled from seeds[i]
    config: dict[str, Any]  # the sample section that made them
    checkpoint_step: int  # of the EMA weights sampled


def save_samples(path: str | Path, images: np.ndarray, *, seeds: Iterable[int], config: dict[str, Any],
                 checkpoint_step: int) -> None:
    """Write a sample set atomically, as :func:`load_samples` reads it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, images=images, seeds=np.asarray(list(seeds), dtype=np.int64), config=json.dumps(config),
                 checkpoint_step=np.int64(checkpoint_step))


def load_samples(path: str | Path) -> Samples:
    """A sample set as :func:`save_samples` writes it; anything else is one :class:`UserError` line."""
    arrays = load_npz(path, SAMPLE_ARRAYS, SAMPLES)
    step = int(arrays["checkpoint_step"])
    if step < 0:
        raise SAMPLES.refuse(path, f"its 'checkpoint_step' is {step}, not a step")
    config = json_text(path, "config", arrays["config"], SAMPLES)
    return Samples(arrays["images"], arrays["seeds"], config, step)
