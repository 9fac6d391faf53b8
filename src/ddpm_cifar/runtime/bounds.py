"""The valid range of every params.yaml value, and where each bound comes from.

A value out of range would otherwise reach torch or numpy unchecked: a traceback deep in a stage,
NaN losses, or a host out of memory long after the stage started. Here it is a one-line
:class:`ConfigError` naming the key, raised while the params load, before any work.
:mod:`ddpm_cifar.runtime.config`'s dataclasses call :func:`check_fields` first thing in
``__post_init__``; checks that relate two fields of one section (``sample.seed + sample.n``, widths
of the U-Net) stay in that section's dataclass, and those that relate two sections in
:func:`ddpm_cifar.runtime.params_file.check_file`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` (``<`` on an ``open_`` side), and finite.

    ``why`` marks ``high`` as a size limit (the unit, then where the limit comes from): a larger
    value is "too large" and the message says why. Without it, the message states the interval.
    """

    low: float
    high: float = math.inf
    why: str = ""
    open_low: bool = False
    open_high: bool = False
    text: str = ""  # what "must be ..." says, where the default wording does not fit

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.why or self.high == math.inf:
            return "a positive finite number" if self.open_low else f"at least {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


# Sizes that several keys share. Each is far above what the study and the FID protocols use, and
# at or below what one machine can hold or finish.
STEPS_MAX = 10**9  # optimizer steps: 10^9 x 32 images is 640,000 epochs of CIFAR-10; DDPM trained 800,000
TIMESTEPS_MAX = 100_000  # sampling the full chain runs the network once per step; DDPM uses 1,000
BATCH_MAX = 65_536  # one batch is one tensor on one device
WIDTH_MAX = 4_096  # U-Net channels: a 3x3 convolution that wide is 604 MB of fp32 weights
SEED_MAX = 2**63 - 1  # the samplers hold per-image seeds in a torch int64 tensor

_STEPS = f"steps (train.steps is at most {STEPS_MAX:,})"
_TIMESTEPS = f"network evaluations per image (diffusion.timesteps is at most {TIMESTEPS_MAX:,})"
_BATCH = Bound(1, BATCH_MAX, "images (one batch is one tensor on one device, and no GPU holds the "
                             "activations of 65,536 images; the study uses 16-500)")
_WIDTH = ("channels (a 3x3 convolution 4,096 channels wide holds 151M weights, 604 MB in fp32, "
          "which Adam triples; the study's widest level has 512)")
_SEED = Bound(0, SEED_MAX, "(the samplers hold per-image seeds as torch int64)")
_FINITE_POSITIVE = Bound(0, open_low=True)
_FRACTION = Bound(0, 1, open_high=True)  # [0, 1)

BOUNDS: dict[str, Bound] = {
    "model.image_size": Bound(1, 1_024, "pixels (the training data are 32x32; pixel-space DDPMs go up "
                                        "to 256)"),
    "model.channels": Bound(1, 4, "channels (images are uint8 PNG pixels: grey, grey+alpha, RGB or RGBA)"),
    "model.dim": Bound(1, WIDTH_MAX, _WIDTH),
    "model.dim_mults": Bound(1, WIDTH_MAX, _WIDTH),  # each entry
    "model.num_res_blocks": Bound(1, 64, "blocks per level (each adds two 3x3 convolutions to every level; "
                                         "DDPM's U-Nets use 2-4)"),
    "model.attn_heads": Bound(1, WIDTH_MAX, _WIDTH),
    "model.attn_dim_head": Bound(0, WIDTH_MAX, _WIDTH),  # model.arch unet needs 1 or more (ModelConfig)
    "model.dropout": _FRACTION,
    "diffusion.timesteps": Bound(2, TIMESTEPS_MAX, "steps (sampling the full chain evaluates the network "
                                                   "once per step; DDPM uses 1,000)"),
    "diffusion.min_snr_gamma": Bound(0, open_low=True, text="a positive finite number or null"),
    "train.steps": Bound(1, STEPS_MAX, "optimizer steps (10^9 steps of 32 images are 640,000 epochs of "
                                       "CIFAR-10; DDPM trained 800,000)"),
    "train.batch_size": _BATCH,
    "train.grad_accum": Bound(1, BATCH_MAX, "micro-steps per optimizer step (each runs train.batch_size "
                                            "images; the study uses 2)"),
    # Adam moves every weight by up to about lr per step: past 1 it overwrites the weights.
    "train.lr": Bound(0, 1, "(Adam moves every weight by up to about lr per step, and the weights are of "
                            "order 0.01-1; DDPM-type models use 1e-5 to 1e-3)", open_low=True),
    "train.adam_betas": _FRACTION,  # each: torch.optim.Adam's own range
    "train.max_grad_norm": Bound(0, open_low=True, text="a positive finite number or null (no clipping)"),
    "train.ema_decay": _FRACTION,
    "train.ema_update_every": Bound(1, STEPS_MAX, _STEPS),
    "train.ema_start_step": Bound(0, STEPS_MAX, _STEPS),
    "train.ema_inv_gamma": _FINITE_POSITIVE,
    "train.ema_power": Bound(0, open_low=True, text="a positive finite number or null (no warm-up)"),
    "train.warmup_steps": Bound(0, STEPS_MAX, _STEPS),  # 0: no warm-up
    # The data order seeds torch generators with seed x 1,000,003 + epoch and seed x 7,919 + image
    # position (batches.py); both must stay below 2^64 for 10^9 steps of 65,536 x 65,536 images.
    "train.seed": Bound(0, 2**32 - 1, "(the data order seeds torch generators with seed x 1,000,003 + epoch "
                                      "and seed x 7,919 + image position, which must stay below 2^64)"),
    "train.checkpoint_every": Bound(1, STEPS_MAX, _STEPS),
    "train.fid_every": Bound(0, STEPS_MAX, _STEPS),  # 0: off
    "train.fid_samples": Bound(2, 100_000, "images (sampled anew for every training-time FID, each held as "
                                           "3 KB of uint8 and 16 KB of float64 Inception features; FID "
                                           "protocols use 10,000-50,000)"),
    "train.fid_batch_size": _BATCH,
    "train.sample_grid_every": Bound(0, STEPS_MAX, _STEPS),  # 0: off
    # The sample stage holds all n images as uint8 (3 KB each) and the evaluate stage their 2,048
    # float64 Inception features (16 KB each): 19 GB in all at 10^6, 20x the 50,000 of FID-50k.
    "sample.n": Bound(1, 1_000_000, "images (the sample stage holds each as 3 KB of uint8 and evaluate "
                                    "its 16 KB of float64 Inception features; FID protocols use "
                                    "10,000-50,000)"),
    # sample.sampler and train.fid_sampler (SamplerConfig)
    "sampler.steps": Bound(1, TIMESTEPS_MAX, _TIMESTEPS),
    "sampler.eta": Bound(0, 1),
    "sample.batch_size": _BATCH,
    "sample.seed": _SEED,  # and seed + n - 1 too (SampleConfig)
    "sample.grid_images": Bound(1, 4_096, "images (one PNG grid, 64 x 64 images and 4,400 pixels wide as "
                                          "saved)"),
    "sample.strip_seeds": _SEED,  # each
    "sample.strip_frames": Bound(1, 100, "frames (one 0.8-inch panel each in the strip's figure: 100 make "
                                         "it 80 inches wide)"),
    # Inception features are 2,048 float64 per reference image: 16 GB at 10^6; CIFAR-10 has 50,000.
    "fid.reference_count": Bound(0, 1_000_000, "images (each reference image's 2,048 float64 Inception "
                                               "features take 16 KB; CIFAR-10's sets hold 50,000 and "
                                               "10,000)", text="0 (all) or at least 2"),
    "fid.batch_size": _BATCH,
    # float32 pool3 features, 8 KB per image, kept in data/fid_ref.npz: 82 MB at the default 10,000
    "fid.reference_features": Bound(0, 1_000_000, "images (each reference image's 2,048 float32 Inception "
                                                  "features take 8 KB in data/fid_ref.npz; CIFAR-10's sets "
                                                  "hold 50,000 and 10,000)"),
    "frontier.n": Bound(4, 1_000_000, "images per sampler setting (each held as 3 KB of uint8 and 24 KB "
                                      "of Inception features; FID protocols use 10,000-50,000)"),
    "frontier.batch_size": _BATCH,
    "distributed.nnodes": Bound(1, BATCH_MAX, "machines (every process takes an equal share, at least one "
                                              "image, of train.batch_size, at most 65,536)"),
    "distributed.nproc_per_node": Bound(1, 256, "processes per machine (one per GPU, and the largest "
                                                "machines hold 16; each process loads its own model)"),
}

# Strings: an empty path would name the current folder, an empty project a W&B error mid-run.
_NON_EMPTY = r"(?s).*\S.*"
PATTERNS: dict[str, tuple[str, str]] = {
    "data.source": (_NON_EMPTY, "official or a path"),
    # fetch.py strips and lower-cases it before comparing
    "data.md5": (r"\s*[0-9a-fA-F]{32}\s*", "an MD5 (32 hexadecimal digits) or null"),
    "fid.inception_weights": (_NON_EMPTY, "a path"),
    "fid.reference": (_NON_EMPTY, "train, test or a path to a .npz"),
    "wandb.project": (_NON_EMPTY, "a W&B project name"),
    "pretrained.folder": (_NON_EMPTY, "a path"),
}


def check_field(key: str, value: Any, bound_key: str | None = None) -> None:
    """Check one typed value (as ``config`` coerced it) against its range; null always passes
    here, as the type check already allowed it only where it means something. ``bound_key`` is
    where its range is listed, when that is not ``key`` (a block used in two sections)."""
    if value is None:
        return
    bound_key = bound_key or key
    if bound_key in PATTERNS:
        pattern, text = PATTERNS[bound_key]
        if not re.fullmatch(pattern, value):
            raise ConfigError(f"{key} must be {text}, got {value!r}")
    bound = BOUNDS.get(bound_key)
    if bound is None:
        return
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_number(f"{key}[{i}]", item, bound)
    else:
        _check_number(key, value, bound)


def _check_number(key: str, value: float, bound: Bound) -> None:
    above_low = value > bound.low if bound.open_low else value >= bound.low  # False for NaN
    below_high = value < bound.high if bound.open_high else value <= bound.high
    not_finite = isinstance(value, float) and not math.isfinite(value)  # ints are exact, however large
    if not_finite or not above_low or not (below_high or bound.why):
        raise ConfigError(f"{key} must be {bound.describe()}, got {value}")
    if not below_high:
        raise ConfigError(f"{key} {value} is too large: at most {bound.high:,} {bound.why}")


def check_fields(section: str, cfg: Any, bounds_of: str | None = None) -> None:
    """Every field of the dataclass ``cfg``, read from params section ``section``; ``bounds_of``
    names the entries of BOUNDS to use when they are not listed under ``section``."""
    for field in dataclasses.fields(cfg):
        bound_key = f"{bounds_of}.{field.name}" if bounds_of else None
        check_field(f"{section}.{field.name}", getattr(cfg, field.name), bound_key)
