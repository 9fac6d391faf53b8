"""Checkpoints that carry their own model and diffusion config.

Everything is saved as plain tensors and Python primitives so that loading works with
``torch.load(weights_only=True)``: a checkpoint file cannot run code on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..diffusion.process import GaussianDiffusion
from ..runtime.config import DiffusionConfig, ModelConfig, parse_section, to_dict
from ..runtime.errors import ConfigError, UserError
from ..runtime.fileio import atomic_path, load_weights_only, why_unreadable
from .networks import LoadedModel, build_model

# Bump when what a checkpoint holds changes meaning; a file of another version is refused in one line.
FORMAT_NAME = "ddpm_cifar.checkpoint"
FORMAT = f"{FORMAT_NAME}/2"


class OlderCheckpoint(UserError):
    """A checkpoint this pipeline wrote, but in a format of an older version."""


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (with the format tag added) atomically."""
    # Through a file object: given a path, torch.save names the zip's inner folder after the
    # (random) temporary file, so equal payloads would get different bytes and DVC would see a
    # changed output and rerun everything downstream.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)


def _recovery(path: Path) -> str:
    """How to get past an unreadable file, by what the pipeline uses it for."""
    if path.name == "ema.pt":
        # Non-persistent in dvc.yaml: repro reruns train, which rewrites a missing ema.pt from the
        # finished checkpoint without training again.
        return (f"remove it and rerun `dvc repro`, which rewrites it from the training checkpoint, "
                f"or restore the last good one with `dvc checkout {path}`")
    if path.name == "checkpoint.pt":
        return (f"remove it to start training afresh, or restore the last good one with "
                f"`dvc checkout {path}`")
    return "give a checkpoint the pipeline wrote (models/ema.pt or models/checkpoint.pt)"


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
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
    return ckpt


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
    if weights not in ckpt:
        raise UserError(f"{path} has no {weights!r} weights (it has: {', '.join(sorted(ckpt))})")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit the stored model config: {str(exc)[:200]}") from exc
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, model_cfg, GaussianDiffusion(diffusion_cfg).to(device), int(ckpt["step"]))
