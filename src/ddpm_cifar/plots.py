"""Figures: sample grids, the denoising strip and our FID beside the baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .fileio import atomic_path  # noqa: E402


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
    """Horizontal bars: quoted baselines in grey, other models we measured (``measured``: fid_report
    dicts with a ``name``, e.g. the pretrained DDPM) in orange, our model highlighted.

    A non-comparable FID (unofficial Inception weights or reference) is drawn hatched and labelled
    as such, so the figure cannot be read as a like-for-like comparison with the quoted numbers.
    Measured bars share our samples count, reference and Inception, so they compare with ours.
    """
    comparable = bool(ours["comparable"])
    names = [f"{b['name']}\n(quoted, {b['samples']} samples)" for b in baselines]
    names += [f"{m['name']}\n({m['n_samples']} samples)" for m in measured]
    names.append(f"ours, measured\n({ours['n_samples']} samples)")
    values = [float(b["fid"]) for b in baselines] + [float(m["fid"]) for m in measured] + [float(ours["fid"])]
    colors = (["#9e9e9e"] * len(baselines) + ["#ff7f0e"] * len(measured)
              + ["#1f77b4" if comparable else "#d62728"])
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(values) + 1.6))
    bars = ax.barh(range(len(values)), values, color=colors)
    for i, m in enumerate([*measured, ours]):
        if not m["comparable"]:
            bars[len(baselines) + i].set_hatch("//")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(values)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("FID (lower is better)")
    ax.set_xlim(0, max(values) * 1.2)
    if comparable:
        ax.set_title("FID on CIFAR-10")
    else:
        ax.set_title("FID on CIFAR-10: measured bars are NOT comparable to the quoted numbers",
                     color="#d62728")
        why = "\n".join(f"- {r}" for r in ours["not_comparable_because"])
        fig.text(0.01, 0.01, "Not comparable because:\n" + why, fontsize=7, va="bottom", color="#d62728")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(ours["not_comparable_because"]), 1, 1))
    _save_fig(fig, path)


def _save_fig(fig: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
