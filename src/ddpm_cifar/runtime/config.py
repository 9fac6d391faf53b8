"""The typed configuration: one frozen dataclass per params.yaml section, and the sampler block that
two sections share. Each checks its own values when built (ranges: :mod:`.bounds`); a bad value is
a one-line :class:`ConfigError` naming the key. Reading params.yaml into them strictly is
:mod:`.params_file`'s job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from typing import Any

from .bounds import SEED_MAX, WIDTH_MAX, check_fields
from .errors import ConfigError

# The names ddpm_cifar.diffusion.samplers implements (a test keeps the two in step; config stays free
# of torch).
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m")
SPACING_NAMES = ("uniform", "trailing", "quadratic")
VARIANCE_NAMES = ("posterior", "beta")  # DDPM's sigma^2: beta tilde or beta
USES_ETA = ("ddim",)  # the samplers that read eta; the others ignore it
USES_VARIANCE = ("ddpm",)  # the samplers that read variance
MODEL_ARCHS = ("unet", "ddpm")
BEST_METRICS = ("kid", "fid")  # what train.best_metric may name (null: keep no best weights)
WEIGHTS = ("final", "best")  # the EMA weights sample and frontier read: models/ema.pt or models/ema_best.pt


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler runs, and how: everything the images depend on besides the network, the seeds,
    the batch shape and the precision. The same block configures the sample stage
    (``sample.sampler``) and the training-time FID (``train.fid_sampler``); ``where`` names the
    block in error messages."""

    name: str  # ddpm (ancestral), ddim or dpmpp_2m (DPM-Solver++(2M))
    steps: int  # network evaluations per image; fewer than diffusion.timesteps respaces the chain
    spacing: str = "uniform"  # which timesteps the steps visit: uniform, trailing or quadratic
    eta: float = 0.0  # DDIM's, in [0, 1]: 0 deterministic, 1 as noisy as DDPM; the others ignore it
    variance: str = "posterior"  # DDPM's sigma^2: posterior (beta tilde) or beta; the others ignore it
    clip_x0: bool = True  # clamp the network's x0 estimate to [-1, 1]
    where: InitVar[str] = "sampler"

    def __post_init__(self, where: str) -> None:
        check_fields(where, self, bounds_of="sampler")
        _check_choice(f"{where}.name", self.name, SAMPLER_NAMES)
        _check_choice(f"{where}.spacing", self.spacing, SPACING_NAMES)
        _check_choice(f"{where}.variance", self.variance, VARIANCE_NAMES)
        object.__setattr__(self, "eta", float(self.eta))  # 0 and 0.0 are the same setting

    def check_steps(self, num_timesteps: int, where: str = "sampler") -> None:
        """Refuse more steps than the diffusion has timesteps (``diffusion.timesteps``)."""
        if self.steps > num_timesteps:
            raise ConfigError(f"{where}.steps {self.steps} exceeds the model's diffusion.timesteps "
                              f"{num_timesteps}")

    def key(self) -> str:
        """The settings as text, for cache keys and the training-time FID's id: those this sampler
        reads, so that a setting it ignores (DDPM's eta) does not discard finished work."""
        parts = [self.name, str(self.steps), self.spacing]
        if self.name in USES_ETA:
            parts.append(f"eta={self.eta}")
        if self.name in USES_VARIANCE:
            parts.append(f"var={self.variance}")
        parts.append("clip" if self.clip_x0 else "noclip")
        return ":".join(parts)


@dataclass(frozen=True)
class DataConfig:
    source: str  # "official", a local cifar-10-python.tar.gz, or an image folder (dir or tar.gz)
    md5: str | None  # expected MD5 of an official-format archive; null accepts any

    def __post_init__(self) -> None:
        check_fields("data", self)


@dataclass(frozen=True)
class ModelConfig:
    image_size: int
    channels: int
    dim: int
    dim_mults: tuple[int, ...]
    num_res_blocks: int
    full_attn: tuple[bool, ...]  # per level. unet: softmax (True) or linear attention; ddpm: attention or not
    attn_heads: int
    attn_dim_head: int  # unet only: ddpm's single head spans all channels
    dropout: float
    # "unet": the study's network (unet.py); "ddpm": Ho et al.'s CIFAR-10 network (ddpm_unet.py), the
    # layout of the published google/ddpm-cifar10-32 weights.
    arch: str

    def __post_init__(self) -> None:
        check_fields("model", self)
        _check_choice("model.arch", self.arch, MODEL_ARCHS)
        if not self.dim_mults:
            raise ConfigError("model.dim_mults must list at least one level")
        widest = self.dim * max(self.dim_mults)
        if widest > WIDTH_MAX:
            raise ConfigError(f"model.dim x model.dim_mults gives {widest} channels at the widest level: at "
                              f"most {WIDTH_MAX:,} (a 3x3 convolution that wide is 604 MB of fp32 weights)")
        if self.arch == "unet":
            _check_unet(self)
        if self.arch == "ddpm":
            if self.attn_heads != 1:
                raise ConfigError(f"model.attn_heads must be 1 for model.arch ddpm (its attention has one "
                                  f"head spanning all channels), got {self.attn_heads}")
            odd = [self.dim * m for m in self.dim_mults if (self.dim * m) % 32]
            if odd:
                raise ConfigError(f"model.dim x model.dim_mults must be multiples of 32 for model.arch ddpm "
                                  f"(GroupNorm with 32 groups), got {odd[0]} channels")
        if len(self.full_attn) != len(self.dim_mults):
            raise ConfigError(
                f"model.full_attn has {len(self.full_attn)} entries but model.dim_mults has "
                f"{len(self.dim_mults)}: give one per level"
            )
        if self.image_size % 2 ** (len(self.dim_mults) - 1):
            raise ConfigError(
                f"model.image_size {self.image_size} is not divisible by "
                f"2^{len(self.dim_mults) - 1}, the U-Net's downsampling factor"
            )


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int
    beta_schedule: str  # linear | cosine | sigmoid
    objective: str  # pred_noise | pred_x0 | pred_v
    min_snr_gamma: float | None  # null: weight every objective like the plain noise MSE

    def __post_init__(self) -> None:
        check_fields("diffusion", self)
        _check_choice("diffusion.beta_schedule", self.beta_schedule, ("linear", "cosine", "sigmoid"))
        _check_choice("diffusion.objective", self.objective, ("pred_noise", "pred_x0", "pred_v"))


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimizer steps
    batch_size: int  # images per micro-step
    grad_accum: int  # micro-steps per optimizer step
    lr: float
    adam_betas: tuple[float, float]
    max_grad_norm: float | None
    # The EMA of the study's trainer (ema-pytorch, see ddpm_cifar.training.ema): updated once every
    # ema_update_every optimizer steps; a copy of the weights while at most ema_start_step steps
    # came before, an average after, with a decay that warms up to ema_decay (ema_power below).
    ema_decay: float  # the most the decay reaches
    ema_update_every: int
    ema_start_step: int  # ema-pytorch's update_after_step
    amp: bool  # bf16 autocast where supported, fp16 + loss scaling on older GPUs, off on CPU
    seed: int
    checkpoint_every: int
    fid_every: int  # optimizer steps between FID evaluations with EMA weights; 0 disables
    fid_samples: int
    fid_sampler: SamplerConfig  # the training-time FID's sampler (and the W&B sample grid's)
    fid_batch_size: int
    sample_grid_every: int  # steps between sample grids logged to W&B; 0 disables
    # The EMA warm-up: decay = min(ema_decay, 1 - (1 + k / ema_inv_gamma) ^ -ema_power) at the k-th
    # step past ema_start_step; the study's 1 and 2/3 reach 0.995 about 2,830 steps past it.
    # ema_power null: ema_decay from the start (no warm-up).
    ema_inv_gamma: float
    ema_power: float | None
    # Linear learning-rate warm-up over this many steps (ddpm_cifar.training.loop.learning_rate); 0 = none.
    warmup_steps: int
    # The training-time score whose best EMA weights go to models/ema_best.pt: kid or fid; null keeps
    # none (the file then holds no weights and says why).
    best_metric: str | None

    def __post_init__(self) -> None:
        # fid_samples, fid_sampler and fid_batch_size are checked with the FID off too: the W&B
        # sample grid uses the same sampler, and a value that is wrong now fails when it is turned on.
        check_fields("train", self)
        if self.best_metric is not None:
            _check_choice("train.best_metric", self.best_metric, BEST_METRICS)


@dataclass(frozen=True)
class SampleConfig:
    n: int
    sampler: SamplerConfig
    weights: str  # final (models/ema.pt) or best (models/ema_best.pt, train.best_metric's best)
    compile: bool  # torch.compile the network (CUDA only; see benchmarks/)
    batch_size: int
    seed: int  # image i uses seed + i, whatever the batch size
    grid_images: int
    strip_seeds: tuple[int, ...]
    strip_frames: int

    def __post_init__(self) -> None:
        check_fields("sample", self)
        _check_choice("sample.weights", self.weights, WEIGHTS)
        if not 1 <= len(self.strip_seeds) <= 64:  # a row of the strip's figure each
            raise ConfigError(f"sample.strip_seeds must list 1 to 64 seeds, got {len(self.strip_seeds)}")
        if self.grid_images > self.n:  # the grid shows the first grid_images samples: no more exist
            raise ConfigError(f"sample.grid_images {self.grid_images} exceeds sample.n {self.n}: the grid "
                              "shows the first grid_images of the n samples")
        if self.seed + self.n - 1 > SEED_MAX:  # image i uses seed + i
            raise ConfigError(f"sample.seed {self.seed} is too large for sample.n {self.n}: image i uses "
                              "seed + i, and the last must be below 2^63 (the samplers hold seeds as int64)")


@dataclass(frozen=True)
class FidConfig:
    inception_weights: str
    reference: str  # train | test | path to a .npz with mu and sigma
    reference_count: int  # use the first N reference images; 0 = all
    # Pool3 features of the first N reference images kept beside the statistics, for KID and
    # precision/recall (float32: 8 KB per image); 0 keeps none and those metrics are not measured.
    reference_features: int
    batch_size: int
    # pytorch-fid's op sequence exactly; false folds BatchNorm into the convolutions (float rounding
    # apart the same features, 1.6-1.8x as fast on a 2-core CPU,
    # benchmarks/inception_speed.py; evaluation/inception.py, fold_batchnorm)
    exact_inception: bool

    def __post_init__(self) -> None:
        check_fields("fid", self)
        if self.reference_count == 1:  # a covariance needs two images
            raise ConfigError("fid.reference_count must be 0 (all) or at least 2, got 1")


@dataclass(frozen=True)
class FrontierCurve:
    """One sampler of the frontier at several step counts: a sampler block whose ``steps`` is a list.
    The keys after ``steps`` may be left out (the defaults below)."""

    OPTIONAL = ("spacing", "eta", "variance", "clip_x0")

    name: str
    steps: tuple[int, ...]
    spacing: str = "quadratic"
    eta: float = 0.0
    variance: str = "posterior"
    clip_x0: bool = True
    where: InitVar[str] = "frontier.curves"

    def __post_init__(self, where: str) -> None:
        object.__setattr__(self, "_where", where)  # not a field: equal curves compare equal wherever listed
        if not self.steps:
            raise ConfigError(f"{where}.steps must list at least one step count")
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"{where}.steps lists a step count twice: {list(self.steps)}")
        object.__setattr__(self, "eta", float(self.eta))
        self.samplers()  # each step count as a sampler block: its checks, its messages naming this entry

    def samplers(self) -> list[SamplerConfig]:
        """The sampler block of each step count, in the order listed."""
        where = self.__dict__["_where"]
        return [SamplerConfig(self.name, steps, self.spacing, self.eta, self.variance, self.clip_x0,
                              where=where) for steps in self.steps]


@dataclass(frozen=True)
class FrontierConfig:
    """Quality against sampler steps: each curve's sampler at each step count, on the first n of the
    sample stage's seeds, scored like the samples (FID, KID) and timed."""

    enabled: bool
    n: int
    batch_size: int
    curves: tuple[FrontierCurve, ...]

    def __post_init__(self) -> None:
        check_fields("frontier", self)
        if not self.curves:
            raise ConfigError("frontier.curves must list at least one sampler")
        keys = [s.key() for c in self.curves for s in c.samplers()]
        if len(set(keys)) != len(keys):
            raise ConfigError("frontier.curves lists the same sampler settings twice")

    def samplers(self) -> list[SamplerConfig]:
        return [s for c in self.curves for s in c.samplers()]


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool
    project: str
    run_name: str | None
    entity: str | None
    mode: str  # online | offline

    def __post_init__(self) -> None:
        check_fields("wandb", self)
        _check_choice("wandb.mode", self.mode, ("online", "offline"))


@dataclass(frozen=True)
class PretrainedConfig:
    """The published DDPM CIFAR-10 model, scored with our sampler, seeds, reference and Inception."""

    enabled: bool
    folder: str  # google/ddpm-cifar10-32 in diffusers' layout: config.json + weights

    def __post_init__(self) -> None:
        check_fields("pretrained", self)


@dataclass(frozen=True)
class DistributedConfig:
    """How many processes torchrun starts for the stages that run data-parallel."""

    nnodes: int  # machines
    nproc_per_node: int  # processes per machine: one per GPU
    rdzv_endpoint: str  # host:port where the processes meet; localhost:0 picks a free port

    def __post_init__(self) -> None:
        check_fields("distributed", self)
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"distributed.rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        if int(port) > 65_535:  # TCP ports are 16-bit
            raise ConfigError(f"distributed.rdzv_endpoint must have a port of at most 65535, got {port}")
        if self.nnodes > 1 and port == "0":
            # A port picked at random on one node: the others could never find it, and every node
            # would wait for the rendezvous timeout.
            raise ConfigError(f"distributed.rdzv_endpoint must name the first node's host and a fixed port "
                              f"when distributed.nnodes is {self.nnodes}, got {self.rdzv_endpoint!r}")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "fid": FidConfig,
    "wandb": WandbConfig,
    "pretrained": PretrainedConfig,
    "frontier": FrontierConfig,
    "distributed": DistributedConfig,
}


def _check_unet(cfg: ModelConfig) -> None:
    if cfg.dim % 2 or cfg.dim < 4:  # the time embedding: dim/2 sines and cosines, 2 or more frequencies
        raise ConfigError(f"model.dim must be even and at least 4 for model.arch unet (its time embedding "
                          f"is dim/2 sines and cosines), got {cfg.dim}")
    if cfg.attn_dim_head < 1:
        raise ConfigError(f"model.attn_dim_head must be at least 1 for model.arch unet, "
                          f"got {cfg.attn_dim_head}")
    if cfg.attn_heads * cfg.attn_dim_head > WIDTH_MAX:
        raise ConfigError(f"model.attn_heads x model.attn_dim_head is {cfg.attn_heads * cfg.attn_dim_head} "
                          f"channels of attention: at most {WIDTH_MAX:,} (as wide as the widest level)")


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-able data (tuples become lists)."""
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, tuple | list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v
