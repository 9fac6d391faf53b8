"""Figures: sample grids, the denoising strip, the training curves and our FID beside the baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from ..runtime.fileio import atomic_path  # noqa: E402
from ..runtime.loaders import TRAIN_LOG, live_metric_path, load_live_metric  # noqa: E402

# The training-time evaluation's histories (training/runlog.py logs them through DVCLive): KID and its
# std only when the reference has features, none at all with train.fid_every: 0.
EVAL_VALUES = ("fid", "kid", "kid_std")


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) image."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = im
    return grid


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> None:
    im = Image.fromarray(image)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def save_grid(images: np.ndarray, path: str | Path, scale: int = 2) -> None:
    save_png(image_grid(images), path, scale=scale)


def save_denoising_strip(frames: np.ndarray, timesteps: Sequence[int], path: str | Path) -> None:
    """frames: uint8 (seeds, F, H, W, C); one row per seed, x_T on the left, x_0 on the right."""
    n_seeds, n_frames = frames.shape[:2]
    fig, axes = plt.subplots(n_seeds, n_frames, figsize=(n_frames * 0.8, n_seeds * 0.9 + 0.4),
                             squeeze=False)
    for r in range(n_seeds):
        for c in range(n_frames):
            ax = axes[r][c]
            ax.imshow(frames[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                t = timesteps[c]
                label = "x_T" if c == 0 else ("x_0" if t < 0 else f"t={t}")
                ax.set_title(label, fontsize=6)
    fig.suptitle("denoising: x_T (left) to x_0 (right)", fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def save_fid_comparison(ours: dict[str, Any], baselines: Sequence[dict[str, Any]], path: str | Path,
                        measured: Sequence[dict[str, Any]] = ()) -> None:
    """Horizontal bars: quoted baselines in grey, other models we measured (``measured``: reports
    with a ``name``, e.g. the pretrained DDPM) in orange, our model in blue.

    A measured FID that is not comparable with published numbers (unofficial Inception weights or
    reference, too few samples) never shares an axis with them: it goes to a second panel, hatched,
    with the reasons printed under it.
    """
    ours_named = {**ours, "name": "ours, measured"}
    mine = [*measured, ours_named]
    same_axis = [m for m in mine if m["comparable"]]
    apart = [m for m in mine if not m["comparable"]]
    panels = [("FID on CIFAR-10 (lower is better)", _quoted_bars(baselines) + _measured_bars(same_axis))]
    if apart:
        panels.append(("Measured here: NOT comparable with the numbers on the left", _measured_bars(apart)))
    height = 0.55 * max(len(bars) for _, bars in panels) + 1.6
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels) ** 0.5 + 1, height), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels, strict=True):
        _draw_bars(ax, bars, title)
    reasons = list(dict.fromkeys(r for m in apart for r in m["not_comparable_because"]))
    if reasons:
        fig.text(0.01, 0.01, "Not comparable because:\n" + "\n".join(f"- {r}" for r in reasons),
                 fontsize=7, va="bottom", color="#d62728")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(reasons), 1, 1))
    _save_fig(fig, path)


# (label, value, colour, hatched) of one bar
_Bar = tuple[str, float, str, bool]


def _quoted_bars(baselines: Sequence[dict[str, Any]]) -> list[_Bar]:
    return [(f"{b['name']}\n(quoted, {b['samples']} samples)", float(b["fid"]), "#9e9e9e", False)
            for b in baselines]


def _measured_bars(reports: Sequence[dict[str, Any]]) -> list[_Bar]:
    bars = []
    for m in reports:
        colour = "#1f77b4" if m["name"].startswith("ours") else "#ff7f0e"
        label = f"{m['name']}\n({m['n_samples']} samples)"
        bars.append((label, float(m["fid"]), colour, not m["comparable"]))
    return bars


def _draw_bars(ax: Any, bars: Sequence[_Bar], title: str) -> None:
    labels, values, colours, hatched = zip(*bars, strict=True)
    drawn = ax.barh(range(len(values)), values, color=colours)
    for bar, hatch in zip(drawn, hatched, strict=True):
        if hatch:
            bar.set_hatch("//")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("FID (lower is better)")
    ax.set_xlim(0, max(values) * 1.2)
    ax.set_title(title, fontsize=9, color="#d62728" if any(hatched) else "black")


def save_training_curves(live_dir: str | Path, loss_png: str | Path, fid_png: str | Path) -> None:
    """The study's two figures from the training logs (DVCLive's histories in ``live_dir``): the loss, raw
    and smoothed, and the training-time FID of the EMA weights."""
    loss = load_training_log(live_dir, ("loss",))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(loss["step"], loss["loss"], color="#9ecae1", linewidth=0.6, label="loss")
    window = max(1, len(loss) // 50)
    ax.plot(loss["step"], loss["loss"].rolling(window, min_periods=1).mean(), color="#1f77b4",
            label=f"mean of {window} steps")
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, loss_png)
    # KID (with its std) only where it was logged; an absent FID history is an empty curve (fid_every: 0)
    values = EVAL_VALUES if live_metric_path(live_dir, "kid").exists() else ("fid",)
    _save_evaluation_curves(load_training_log(live_dir, values, missing=values == ("fid",)), fid_png)


def _save_evaluation_curves(log: pd.DataFrame, path: str | Path) -> None:
    """FID of the EMA weights during training and, when measured, KID with its band of ± one std
    over subsets beside it."""
    has_kid = "kid" in log.columns
    fig, axes = plt.subplots(1, 2 if has_kid else 1, figsize=(10 if has_kid else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(log["step"], log["fid"], marker="o", color="#1f77b4")
    ax.set(xlabel="step", ylabel="FID (lower is better)", title="FID of this model during training (EMA)")
    if log.empty:
        ax.text(0.5, 0.5, "no training-time FID (train.fid_every: 0)", ha="center", transform=ax.transAxes)
    if has_kid:
        ax = axes[0][1]
        low, high = log["kid"] - log["kid_std"], log["kid"] + log["kid_std"]
        ax.fill_between(log["step"], low, high, color="#ff7f0e", alpha=0.25, linewidth=0,
                        label="± 1 std over subsets")
        ax.plot(log["step"], log["kid"], marker="o", color="#ff7f0e", label="KID")
        ax.set(xlabel="step", ylabel="KID (lower is better)", title="KID of this model during training (EMA)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def load_training_log(live_dir: str | Path, values: Sequence[str], missing: bool = False) -> pd.DataFrame:
    """The histories of ``values`` as one frame (``step``, then a column each), checked: finite numbers,
    every history at the first one's steps. ``missing``: an absent history is empty (nothing was
    evaluated), not an error."""
    steps: list[int] | None = None
    columns: dict[str, list[float]] = {}
    for value in values:
        path = live_metric_path(live_dir, value)
        rows = [] if missing and not path.exists() else load_live_metric(live_dir, value)
        if steps is not None and [s for s, _ in rows] != steps:
            raise TRAIN_LOG.refuse(path, f"its steps are not those of {values[0]}.tsv beside it")
        steps = [s for s, _ in rows]
        columns[value] = [v for _, v in rows]
    frame = pd.DataFrame({"step": steps or [], **columns})
    return frame.astype({"step": int, **{value: float for value in values}})


def _save_fig(fig: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
