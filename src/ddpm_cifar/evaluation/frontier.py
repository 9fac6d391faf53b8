"""Quality against sampler steps: each sampler setting of ``frontier.curves`` sampled on the first n of
the sample stage's seeds, scored like the samples (FID, KID) and timed, as one CSV row each, and the
figure of FID (and KID) against network evaluations per image.

The sample stage's images are reused for the setting that made them (same weights file, sampler
settings and seeds). A killed run keeps what it finished: each setting's sampled batches (the cache of
:func:`~ddpm_cifar.diffusion.generate.generate_images_sharded`) and each finished row, in the partial
folder, keyed by everything the row depends on.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..diffusion.generate import Samples, generate_images_sharded  # noqa: E402
from ..diffusion.process import GaussianDiffusion, Model  # noqa: E402
from ..diffusion.samplers import SAMPLING_VERSION, spaced_timesteps  # noqa: E402
from ..runtime.config import USES_ETA, USES_VARIANCE, FrontierConfig, SamplerConfig  # noqa: E402
from ..runtime.distributed import broadcast_from_main, is_main  # noqa: E402
from ..runtime.errors import ConfigError  # noqa: E402
from ..runtime.fileio import atomic_path, write_json  # noqa: E402
from ..runtime.params_file import parse_section  # noqa: E402
from .fid import Reference  # noqa: E402
from .inception import FidInceptionV3, InceptionInfo  # noqa: E402
from .scoring import score_sharded  # noqa: E402

COLUMNS = ("sampler", "curve", "steps", "nfe", "spacing", "eta", "variance", "clip_x0", "fid", "kid",
           "kid_std", "seconds_per_image", "n", "reused")
FINISHED = "finished.json"  # the rows a killed run finished, in the partial folder
ENABLE = "dvc exp run -S frontier.enabled=true"

Row = dict[str, Any]


@dataclass(frozen=True)
class Sampling:
    """The EMA network and how the frontier samples it: ``seed`` is sample.seed (image i: seed + i)."""

    net: Model
    diffusion: GaussianDiffusion
    shape: tuple[int, int, int]
    weights_sha256: str
    seed: int
    device: torch.device


@dataclass(frozen=True)
class Scoring:
    """What the images are scored with; ``reference_digest`` (of its file) keys the finished rows."""

    inception: FidInceptionV3
    info: InceptionInfo
    reference: Reference
    reference_digest: str
    batch_size: int


def nfe(spec: SamplerConfig, num_timesteps: int) -> int:
    """Network evaluations per image: one per visited timestep for all three samplers (DPM-Solver++(2M)
    reuses the previous step's x0 rather than evaluating twice; clipping x0 costs no evaluation)."""
    return len(spaced_timesteps(num_timesteps, spec.steps, spec.spacing))


def sampler_label(spec: SamplerConfig) -> str:
    """A sampler setting as a short label: "ddim 50 (quadratic)"."""
    return f"{spec.name} {spec.steps} ({spec.spacing})"


def curve_label(spec: SamplerConfig) -> str:
    """The settings besides the steps, so that two curves of one sampler stay two lines."""
    parts = [spec.spacing]
    if spec.name in USES_ETA:
        parts.append(f"eta {spec.eta:g}")
    if spec.name in USES_VARIANCE:
        parts.append(f"var {spec.variance}")
    if not spec.clip_x0:
        parts.append("no clip")
    return f"{spec.name} ({', '.join(parts)})"


def check_steps(cfg: FrontierConfig, num_timesteps: int) -> None:
    """Refuse, before any sampling, a step count above the loaded model's timesteps (params.yaml's
    diffusion section is checked when read, but the checkpoint carries its own)."""
    for i, curve in enumerate(cfg.curves):
        for spec in curve.samplers():
            spec.check_steps(num_timesteps, f"frontier.curves[{i}]")


def reused_images(samples: Samples, spec: SamplerConfig, weights_sha256: str, seeds: Sequence[int],
                  num_timesteps: int) -> np.ndarray | None:
    """The sample stage's first len(seeds) images when they are what sampling ``spec`` would give: the
    same weights file, sampler settings and seeds; else None."""
    cfg = samples.config
    if cfg.get("weights_sha256") != weights_sha256:  # an older samples.npz has none: never reused
        return None
    try:
        made = parse_section("sample.sampler", cfg.get("sampler"), SamplerConfig)
    except ConfigError:  # settings of another version: not comparable
        return None
    n = len(seeds)
    if not _same_chain(made, spec, num_timesteps) or len(samples.seeds) < n:
        return None
    return samples.images[:n] if samples.seeds[:n].tolist() == list(seeds) else None


def _same_chain(a: SamplerConfig, b: SamplerConfig, num_timesteps: int) -> bool:
    """The same settings, or spacings that visit the same timesteps (every one at steps = T: the
    committed 1000-step DDPM is the same chain whether its spacing says uniform or quadratic)."""
    same_but_spacing = dataclasses.replace(a, spacing=b.spacing).key() == b.key()
    return same_but_spacing and (a.spacing == b.spacing or spaced_timesteps(num_timesteps, a.steps, a.spacing)
                                 == spaced_timesteps(num_timesteps, b.steps, b.spacing))


def _setting_key(spec: SamplerConfig, n: int, batch_size: int, sampling: Sampling) -> str:
    """What a setting's sampled batches depend on (batch size too: the network always sees full batches,
    and its rounding depends on their shape)."""
    return (f"{SAMPLING_VERSION}:{sampling.weights_sha256}:{spec.key()}:{sampling.seed}:{n}:{batch_size}:"
            f"{sampling.device.type}")


def _cached_images(cache_dir: Path, key: str) -> int:
    """Images an interrupted run left in ``cache_dir`` for ``key`` (batch files are named
    ``<start>-<count>.npy``): sampling them now is free, so the timing leaves them out."""
    count = 0
    for key_file in cache_dir.rglob("key.txt"):  # one folder per rank under torchrun
        try:
            if key_file.read_text() == key:
                count += sum(int(p.stem.rsplit("-", 1)[1]) for p in key_file.parent.glob("*-*.npy"))
        except (OSError, ValueError, IndexError):  # a damaged cache is sampled again: count nothing
            continue
    return count


def _load_finished(partial: Path) -> dict[str, Row]:
    """The rows a killed run finished; a cache, so a damaged file means "none"."""
    try:
        data = json.loads((partial / FINISHED).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def measure(cfg: FrontierConfig, sampling: Sampling, scoring: Scoring, *, samples: Samples,
            partial: Path) -> list[Row]:
    """One row per sampler setting, in the order of ``cfg.samplers()``, on every rank (rank 0's are
    the ones to write). Rows finished by a killed run are taken as they are."""
    seeds = [sampling.seed + i for i in range(cfg.n)]
    finished = broadcast_from_main(_load_finished(partial) if is_main() else {})  # the same on every rank
    rows = []
    for spec in cfg.samplers():
        setting = _setting_key(spec, cfg.n, cfg.batch_size, sampling)
        # A finished row depends on its images and on what scored them; each setting's batches have a
        # folder of their own (a key that differs empties the folder).
        key = f"{setting}:{scoring.info.id}:{scoring.reference_digest}:{scoring.batch_size}"
        cache_dir = partial / f"{spec.name}-{spec.steps}-{hashlib.sha256(setting.encode()).hexdigest()[:12]}"
        row = finished.get(key)
        note = "finished by an earlier run"
        if row is None:
            row = _measure_one(spec, seeds, cfg.batch_size, sampling, scoring, samples, cache_dir, setting)
            note = "the sample stage's images" if row["reused"] else "sampled"
            if is_main():  # the row first, then its batches: a kill between the two loses nothing
                finished[key] = row
                write_json(partial / FINISHED, finished)
                shutil.rmtree(cache_dir, ignore_errors=True)
        if is_main():
            kid = f", KID {_fmt(row['kid'])} ± {_fmt(row['kid_std'])}" if row["kid"] is not None else ""
            print(f"frontier {sampler_label(spec)}: FID {_fmt(row['fid'])}{kid}, "
                  f"{_fmt(row['seconds_per_image']) or '?'} s/image ({note})", flush=True)
        rows.append(row)
    return rows


def _measure_one(spec: SamplerConfig, seeds: list[int], batch_size: int, sampling: Sampling, scoring: Scoring,
                 samples: Samples, cache_dir: Path, setting: str) -> Row:
    images = reused_images(samples, spec, sampling.weights_sha256, seeds, sampling.diffusion.num_timesteps)
    reused = images is not None
    seconds: float | None = samples.config.get("seconds_per_image") if reused else None
    if images is None:
        cached = _cached_images(cache_dir, setting)  # before sampling, which rewrites the cache's key
        start = time.perf_counter()
        images = generate_images_sharded(sampling.net, sampling.diffusion, seeds, spec, batch_size=batch_size,
                                         shape=sampling.shape, device=sampling.device, cache_dir=cache_dir,
                                         cache_key=setting, desc=f"frontier {sampler_label(spec)}",
                                         everywhere=True)
        assert images is not None  # everywhere: every rank has them
        # Per image sampled in this run: batches a killed run left are not in the time.
        fresh = len(seeds) - cached
        seconds = (time.perf_counter() - start) / fresh if fresh > 0 else None
    values = score_sharded(images, scoring.inception, scoring.reference, batch_size=scoring.batch_size,
                           device=sampling.device, full=False).values()
    return {"sampler": spec.name, "curve": curve_label(spec), "steps": spec.steps,
            "nfe": nfe(spec, sampling.diffusion.num_timesteps), "spacing": spec.spacing,
            "eta": spec.eta if spec.name in USES_ETA else None,
            "variance": spec.variance if spec.name in USES_VARIANCE else None, "clip_x0": spec.clip_x0,
            "fid": values["fid"], "kid": values.get("kid"), "kid_std": values.get("kid_std"),
            "seconds_per_image": seconds, "n": len(seeds), "reused": reused}


def _fmt(value: Any) -> str:
    """A CSV cell: empty for a value not measured, 6 significant digits for a float."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value).lower()
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_csv(path: str | Path, rows: Sequence[Row]) -> None:
    """The rows for ``dvc plots``, atomically; no rows: the header alone."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([_fmt(row[c]) for c in COLUMNS] for row in rows)


def save_plot(rows: Sequence[Row], path: str | Path, *, n: int, reasons: Sequence[str]) -> None:
    """FID against NFE (log x), one line per curve; beside it KID ± std when measured. ``reasons``: why
    the FIDs are not comparable with published ones (said under the title)."""
    has_kid = any(row["kid"] is not None for row in rows)
    fig, axes = plt.subplots(1, 2 if has_kid else 1, figsize=(11 if has_kid else 6.5, 4.2), squeeze=False)
    curves = list(dict.fromkeys(row["curve"] for row in rows))  # in the order of frontier.curves
    for i, curve in enumerate(curves):
        mine = sorted((r for r in rows if r["curve"] == curve), key=lambda r: r["nfe"])
        nfes = [r["nfe"] for r in mine]
        style = dict(marker="os^Dv<>"[i % 7], color=f"C{i}", label=curve)
        axes[0][0].plot(nfes, [r["fid"] for r in mine], **style)
        if has_kid:
            measured = [r for r in mine if r["kid"] is not None]
            axes[0][1].errorbar([r["nfe"] for r in measured], [r["kid"] for r in measured],
                                yerr=[r["kid_std"] for r in measured], capsize=3, **style)
    ticks = sorted({row["nfe"] for row in rows})
    for ax, name in zip(axes[0], ("FID", "KID (± std over subsets)")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
        ax.xaxis.set_minor_locator(plt.NullLocator())  # the NFEs measured, not log decades
        ax.set(xlabel="network evaluations per image (NFE, log scale)", ylabel=f"{name}, lower is better")
        ax.legend(fontsize=7)
    title = f"FID of this model against sampler steps ({n:,} samples)"
    if reasons:
        title += "\n" + textwrap.fill(f"not comparable with published FIDs: {'; '.join(reasons)}", 110)
    fig.suptitle(title, fontsize=9, color="#d62728" if reasons else "black")
    fig.tight_layout()
    _save_png(fig, path)


def write_disabled(csv_path: str | Path, png_path: str | Path) -> None:
    """What a disabled stage leaves (DVC wants both outputs): the header, and a figure saying how to turn
    the frontier on."""
    write_csv(csv_path, [])
    fig, ax = plt.subplots(figsize=(6.5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"The sampler frontier is off (frontier.enabled: false).\nTurn it on: {ENABLE}",
            ha="center", va="center", fontsize=10, family="monospace")
    _save_png(fig, png_path)


def _save_png(fig: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
