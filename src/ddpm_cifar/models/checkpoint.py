"""Checkpoints that carry their own model and diffusion config.

Everything is saved as plain tensors and Python primitives so that loading works with
``torch.load(weights_only=True)``: a checkpoint file cannot run code on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..diffusion.process import GaussianDiffusion
from ..runtime.config import DiffusionConfig, ModelConfig, to_dict
from ..runtime.errors import ConfigError, UserError
from ..runtime.fileio import atomic_path, load_weights_only, why_unreadable
from ..runtime.params_file import parse_section
from .networks import LoadedModel, build_model

# Bump when what a checkpoint holds changes meaning; a file of another version is refused in one line.
FORMAT_NAME = "ddpm_cifar.checkpoint"
FORMAT = f"{FORMAT_NAME}/2"


class OlderCheckpoint(UserError):
    """A checkpoint this pipeline wrote, but in a format of an older version."""


# The parts of a checkpoint that hold weights: never written, nor read back, with a NaN or an infinity.
WEIGHTS = ("model", "ema", "best_ema")


def non_finite(weights: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor in ``weights`` (a state dict) holding NaN or an
    infinity, or None."""
    for name, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (with the format tag added) atomically; weights that are not finite are refused."""
    for part in WEIGHTS:
        if isinstance(payload.get(part), dict) and (bad := non_finite(payload[part])):
            raise UserError(f"not writing {path}: its {part} weights hold NaN or infinite values, in {bad}")
    # Through a file object: given a path, torch.save names the zip's inner folder after the
    # (random) temporary file, so equal payloads would get different bytes and DVC would see a
    # changed output and rerun everything downstream.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)


def _recovery(path: Path) -> str:
    """How to get past an unreadable file, by what the pipeline uses it for. Both outputs are cached by
    DVC (models/checkpoint.pt though `persist: true`), so a checkout restores the copy of the last run that
    finished; a plain checkout refuses to overwrite a changed file, hence --force. tests/test_damaged_files.py
    runs each command in a DVC project."""
    restore = f"restore the copy DVC last recorded with `dvc checkout --force {path}`"
    if path.name in ("ema.pt", "ema_best.pt"):
        again = "rerun `dvc repro`, which rewrites it from the training checkpoint"
        # Non-persistent in dvc.yaml: repro reruns train, which rewrites a missing ema.pt from the
        # finished checkpoint without training again.
        return f"remove it and {again}, or {restore}"
    if path.name == "checkpoint.pt":
        return f"remove it and rerun `dvc repro` to train afresh, or {restore}"
    return "give a checkpoint the pipeline wrote (models/ema.pt or models/checkpoint.pt)"


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint this version wrote: the format tag, a whole step, and finite weights checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = load_weights_only(path, map_location)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises many types on foreign files
        raise UserError(
            f"{path} is not a readable checkpoint ({why_unreadable(exc)}): {_recovery(path)}") from exc
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if isinstance(fmt, str) and fmt.startswith(FORMAT_NAME + "/") and fmt != FORMAT:
        raise OlderCheckpoint(f"{path} is a {fmt} checkpoint, from an older version of this pipeline "
                              f"(this one reads {FORMAT}): {_recovery(path)}")
    if fmt != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} checkpoint: {_recovery(path)}")
    if why := _unusable(ckpt):
        raise UserError(f"{path} is not a usable checkpoint ({why}): {_recovery(path)}")
    return ckpt


def _unusable(ckpt: dict[str, Any]) -> str | None:
    """Why a checkpoint of the right format cannot be used (a step that is not a whole number, weights
    that are not a state dict or not finite), or None."""
    step = ckpt.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"its step is {step!r}, not a whole number"
    for part in WEIGHTS:
        weights = ckpt.get(part)
        if part in ckpt and not isinstance(weights, dict):
            return f"its {part!r} weights are a {type(weights).__name__}, not a state dict"
        if isinstance(weights, dict) and (bad := non_finite(weights)):
            return f"its {part} weights hold NaN or infinite values, in {bad}"
    return None


def model_payload(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> dict[str, Any]:
    return {"model_config": to_dict(model_cfg), "diffusion_config": to_dict(diffusion_cfg)}


def configs(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> tuple[ModelConfig, DiffusionConfig]:
    try:
        return (
            parse_section("model", ckpt["model_config"], ModelConfig),
            parse_section("diffusion", ckpt["diffusion_config"], DiffusionConfig),
        )
    except (KeyError, ConfigError) as exc:
        raise UserError(f"{path} holds a model config this version cannot build: {exc}") from exc


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> LoadedModel:
    """Rebuild the network from the config stored in the checkpoint (never from params.yaml), with
    its ``weights`` ("ema", or "model" for the raw weights of a training checkpoint)."""
    ckpt = load(path)
    model_cfg, diffusion_cfg = configs(ckpt, path)
    if isinstance(ckpt.get("no_weights"), str):  # models/ema_best.pt of a run that kept no best weights
        raise UserError(f"{path} holds no weights: {ckpt['no_weights']}; set sample.weights to final, or "
                        "train.best_metric to kid or fid with train.fid_every above 0, and rerun `dvc repro`")
    if weights not in ckpt:
        raise UserError(f"{path} has no {weights!r} weights (it has: {', '.join(sorted(ckpt))})")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit the stored model config: {str(exc)[:200]}") from exc
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, model_cfg, GaussianDiffusion(diffusion_cfg).to(device), ckpt["step"])
