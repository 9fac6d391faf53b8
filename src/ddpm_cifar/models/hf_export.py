"""Export a ``model.arch: ddpm`` checkpoint as a Hugging Face diffusers ``DDPMPipeline`` folder.

The reverse of :func:`~ddpm_cifar.models.ddpm_unet.load_diffusers_folder`. ``DdpmUNet``'s state dict
already carries ``UNet2DModel``'s names, so the weights are written unchanged; the configs are plain
JSON. diffusers is neither needed nor imported here: ``DDPMPipeline.from_pretrained(out_dir)`` reads

    out_dir/model_index.json
    out_dir/unet/config.json, out_dir/unet/diffusion_pytorch_model.safetensors
    out_dir/scheduler/scheduler_config.json

The scheduler samples as this project's ``ddpm`` sampler with ``spacing: uniform`` does, with the
``variance`` and ``clip_x0`` given (the checkpoint holds no sampler settings). What diffusers does
differently: its noise comes from torch.Generator (same seed, other images than ours), and at
``num_inference_steps=1`` it visits t = 0 where ours visits T - 1 (docs/hf_export.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..diffusion.process import BETA_SCHEDULES
from ..runtime.config import VARIANCE_NAMES, DiffusionConfig, plain
from ..runtime.errors import UserError
from . import checkpoint
from .ddpm_unet import CONFIG_NAME, FIXED_KEYS, SAFETENSORS_NAME, DdpmUNet, DdpmUNetConfig

# The diffusers release the exported folders are checked against (tests/test_hf_export.py).
DIFFUSERS_VERSION = "0.42.1"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_INDEX_NAME = "model_index.json"

# Our objective -> diffusers' prediction_type; its step() turns each into x0 as predict_x0_eps does.
PREDICTION_TYPES = {"pred_noise": "epsilon", "pred_x0": "sample", "pred_v": "v_prediction"}
# Our DDPM sigma^2 -> diffusers' variance_type: beta tilde is its fixed_small, beta its fixed_large
# (both recomputed from alpha_bar on a respaced chain, as ours are).
VARIANCE_TYPES = {"posterior": "fixed_small", "beta": "fixed_large"}
MAX_BETA = 0.999  # the cap of process.linear_betas and of diffusers' squaredcos_cap_v2


def unet_config(cfg: DdpmUNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config.json of ``cfg``: every key ``DdpmUNetConfig.from_diffusers`` reads,
    so that ``from_diffusers(unet_config(cfg)) == cfg`` (dropout included: diffusers has the key)."""
    values = {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}  # tuples -> JSON lists
    # The settings DdpmUNet does not vary, spelled out rather than left to diffusers' defaults (the
    # first accepted value of each is that default, and what DdpmUNet computes).
    fixed = {k: allowed[0] for k, allowed in FIXED_KEYS.items()}
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **values, **fixed}


def scheduler_config(cfg: DiffusionConfig, *, variance: str = "posterior",
                     clip_x0: bool = True) -> dict[str, Any]:
    """A ``DDPMScheduler`` config.json whose sampling is ours for ``cfg`` with the sampler settings given.

    The betas: ``linear`` is diffusers' ``linear`` with our rescaled ends (ours is that linspace, capped
    at 0.999; the cap only bites for T <= 20); ``cosine`` is ``squaredcos_cap_v2`` (the same alpha_bar
    and cap: our division by alpha_bar(0) cancels in the ratios). diffusers' ``sigmoid`` is GeoDiff's,
    another schedule than ours (Jabri et al.), so ours, and a capped linear one, go as ``trained_betas``:
    the exact float64 values, which diffusers rounds to float32 as it does its named schedules.
    """
    _check_variance(variance)
    if cfg.beta_schedule not in BETA_SCHEDULES or cfg.objective not in PREDICTION_TYPES:
        # DiffusionConfig checks both; a name added there without a mapping here must not pass silently.
        key = "beta_schedule" if cfg.beta_schedule not in BETA_SCHEDULES else "objective"
        raise UserError(f"diffusion.{key} {getattr(cfg, key)!r} has no diffusers DDPMScheduler equivalent")
    betas = BETA_SCHEDULES[cfg.beta_schedule](cfg.timesteps)  # (T,) float64, as GaussianDiffusion's
    scale = 1000 / cfg.timesteps  # linear_betas' rescaling, repeated so that beta_start/end are its ends
    schedule: dict[str, Any] = {"beta_start": scale * 1e-4, "beta_end": scale * 0.02, "trained_betas": None}
    if cfg.beta_schedule == "linear" and scale * 0.02 <= MAX_BETA:
        schedule["beta_schedule"] = "linear"
    elif cfg.beta_schedule == "cosine":
        schedule["beta_schedule"] = "squaredcos_cap_v2"
    else:
        # beta_schedule is ignored beside trained_betas; "linear" keeps the file valid for any scheduler.
        schedule.update(beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]),
                        trained_betas=betas.tolist())
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": cfg.timesteps, **schedule,
        "prediction_type": PREDICTION_TYPES[cfg.objective],
        "variance_type": VARIANCE_TYPES[variance],
        # Ours clamps the network's x0 to [-1, 1] (data range) before the posterior mean: diffusers'
        # clip_sample does the same; thresholding (Imagen's dynamic clipping) has no counterpart.
        "clip_sample": clip_x0, "clip_sample_range": 1.0,
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
        # linspace visits round(linspace(0, T-1, n)), our "uniform" spacing, for n >= 2 steps.
        "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def _check_variance(variance: str) -> None:
    if variance not in VARIANCE_TYPES:
        raise UserError(f"variance must be one of {', '.join(VARIANCE_NAMES)}; got {variance!r}")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_free(out: Path) -> None:
    """Refuse a file, or a folder with anything in it: an export never mixes with or replaces files."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"{out} exists and is not a folder: pick another output folder or delete it")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty (a previous export?): pick another output folder or delete it")


def export(checkpoint_path: str | Path, out_dir: str | Path, *, variance: str = "posterior",
           clip_x0: bool = True) -> Path:
    """Write ``checkpoint_path``'s EMA network and diffusion as a DDPMPipeline folder at ``out_dir``.

    The folder appears whole or not at all: it is built in a hidden sibling and renamed into place.
    Returns the folder written (absolute).
    """
    # abspath turns "." or "x/.." into a named folder (its temporary sibling is named after it) and,
    # unlike resolve, keeps a symlink a symlink, which _check_free refuses.
    out = Path(os.path.abspath(out_dir))
    _check_free(out)
    _check_variance(variance)  # before the slow load
    loaded = checkpoint.load_model(checkpoint_path)  # format, step and finite weights checked
    if loaded.config.arch != "ddpm" or not isinstance(loaded.net, DdpmUNet):
        raise UserError(f"{checkpoint_path}: model.arch is {loaded.config.arch!r}; only model.arch ddpm "
                        "(diffusers' UNet2DModel layout) can be exported to diffusers")
    scheduler = scheduler_config(loaded.diffusion.config, variance=variance, clip_x0=clip_x0)
    # safetensors wants contiguous CPU tensors that share no memory; EMA weights are kept as trained.
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.net.state_dict().items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    # Named as fileio.atomic_path names its temporary files (".<name>.<pid>.<random>.tmp").
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "unet" / CONFIG_NAME, unet_config(loaded.net.settings))
        save_file(state, str(tmp / "unet" / SAFETENSORS_NAME), metadata={"format": "pt"})
        _write_json(tmp / "scheduler" / SCHEDULER_CONFIG_NAME, scheduler)
        _write_json(tmp / MODEL_INDEX_NAME, {
            "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        })
        # mkdtemp's 0700 and safetensors' 0600 would hide the export from other users: the usual
        # umask-derived modes instead, as fileio.atomic_path gives its files.
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.rglob("*")):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        try:
            os.rename(tmp, out)  # replaces an empty folder; fails if another writer filled it meanwhile
        except OSError as exc:
            raise UserError(f"cannot move the export into {out} ({exc.strerror}): pick another output "
                            "folder or delete it") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
