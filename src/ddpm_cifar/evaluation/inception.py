"""The FID Inception network: pytorch-fid's InceptionV3, loaded from a local file, and its features.

The network is pytorch-fid's FID Inception (the TensorFlow 2015-12-05 graph ported to PyTorch,
2048-d pool3 features, inputs bilinearly resized to 299x299 and scaled to [-1, 1]). pytorch-fid
builds it with a download inside the constructor; here the same architecture is built without
weights and the state dict comes from a local file, so nothing is fetched at model-build time
and a stage can run offline. With the official weights file the numbers are comparable to
pytorch-fid's; with a random-weight file (:func:`save_random_inception`) they are only good for
smoke tests.

Images enter as uint8 NHWC, i.e. quantised exactly as saved PNGs would be. Every metric of
:mod:`.fid` and :mod:`.feature_metrics` starts from the pool3 features of :func:`inception_features`;
the Inception Score's logits come from the same features (:func:`unbiased_logits`), with no second pass.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid.inception import (
    FID_WEIGHTS_URL,
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
)
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.inception import BasicConv2d, Inception3
from tqdm import tqdm

from ..runtime.distributed import gather_to_main, rank_and_world, shard
from ..runtime.errors import UserError
from ..runtime.fileio import (
    atomic_path,
    download,
    file_digest,
    load_weights_only,
    verify_checksum,
    why_unreadable,
)

OFFICIAL_INCEPTION_URL = FID_WEIGHTS_URL
OFFICIAL_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch hub convention: the file name carries the first hex digits of the file's SHA-256.
OFFICIAL_INCEPTION_SHA256_PREFIX = "6726825d"

FEATURE_DIM = 2048
_INPUT_SIZE = 299


@dataclass(frozen=True)
class InceptionInfo:
    """Where the weights came from; ``official`` says whether FIDs are comparable to others'."""

    path: str
    sha256: str
    official: bool
    # pytorch-fid's op sequence exactly (NCHW, BatchNorm as its own op), or BatchNorm folded into the
    # convolutions in channels_last: the same features within 1e-6 relative, 1.6-1.8x as fast on CPU
    exact: bool = False

    @property
    def id(self) -> str:
        """What the features depend on besides the images: the weights, and the exact or folded network
        (float rounding apart the same features, but cached values and curves do not mix the two)."""
        return self.sha256 + (":exact-inception" if self.exact else "")


class FidInceptionV3(Inception3):
    """pytorch-fid's FID Inception, returning pool3 features of shape (N, 2048).

    It subclasses torchvision's Inception3 and swaps in the FID blocks exactly as
    ``pytorch_fid.inception.fid_inception_v3()`` does, so its ``state_dict()`` keys are those of
    the official weights file and that file loads with ``strict=True`` unchanged. The forward
    pass is ``pytorch_fid.inception.InceptionV3(output_blocks=[3], resize_input=True,
    normalize_input=True)``: the same layers in the same order, stopping at the average pool
    (the 1008-way ``fc`` is kept only so the state dict matches the official file).
    """

    def __init__(self) -> None:
        # init_weights=False skips torchvision's truncated-normal init, which is slow and pointless
        # when weights are loaded afterwards (pytorch-fid does the same, see its issue #28).
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.channels_last = False  # the input layout; fold_batchnorm sets it, as oneDNN is fastest so

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(N, 3, H, W) float in [0, 1] -> (N, 2048) pool3 features."""
        x = F.interpolate(x, size=(_INPUT_SIZE, _INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # the TF graph expects [-1, 1]
        # The layout is chosen here, not inherited from the caller's strides (a permuted NHWC batch is
        # channels_last already): the exact network runs NCHW as pytorch-fid does, the folded one
        # channels_last, where oneDNN's convolutions are fastest on CPU.
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        # Block 0, (N, 3, 299, 299) -> (N, 64, 73, 73)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = self.maxpool1(x)
        # Block 1, -> (N, 192, 35, 35)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = self.maxpool2(x)
        # Block 2, -> (N, 768, 17, 17)
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(x)
        x = self.Mixed_5d(x)
        x = self.Mixed_6a(x)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)
        # Block 3, -> (N, 2048, 8, 8) -> average pool (N, 2048, 1, 1)
        x = self.Mixed_7a(x)
        x = self.Mixed_7b(x)
        x = self.Mixed_7c(x)
        x = self.avgpool(x)
        return torch.flatten(x, 1)  # (N, 2048, 1, 1) -> (N, 2048)


def fold_batchnorm(model: FidInceptionV3) -> FidInceptionV3:
    """A copy of ``model`` (eval mode) with every BatchNorm folded into the convolution before it, in
    channels_last: per channel, conv(x) * g / sqrt(var + eps) + (b - mean * g / sqrt(var + eps)) is
    one convolution with a bias, so the network reads and writes each activation once instead of twice.

    The features differ from the unfolded network's by float32 rounding only (the largest relative
    difference over a batch is about 1e-6, ``tests/test_inception_fold.py``); ``fc`` is kept unchanged
    for :func:`unbiased_logits`. The copy's state dict no longer matches the official file's keys.
    """
    if model.training:
        raise UserError("fold_batchnorm needs an eval-mode Inception (BatchNorm's running statistics)")
    folded = copy.deepcopy(model)
    for block in folded.modules():
        if isinstance(block, BasicConv2d):
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = nn.Identity()  # type: ignore[assignment]
    folded.channels_last = True
    return folded.to(memory_format=torch.channels_last).eval()  # type: ignore[return-value]


def _random_init(model: nn.Module) -> None:
    """Variance-preserving init, so random features neither vanish nor blow up over ~50 layers.

    PyTorch's default conv init (kaiming-uniform with a=sqrt(5)) shrinks activations at every
    layer; through this depth the pool3 features would be tiny and nearly constant, which makes
    a smoke-test FID meaningless. BatchNorm keeps its identity running statistics.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def build_inception(seed: int | None = None) -> FidInceptionV3:
    """The FID Inception architecture with random weights; never downloads anything.

    With ``seed`` the weights are deterministic (the global RNG is left untouched); without it
    they come from the global RNG. Returned in eval mode with gradients off.
    """
    if seed is None:
        model = FidInceptionV3()
        _random_init(model)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FidInceptionV3()
            _random_init(model)
    model.requires_grad_(False)
    return model.eval()


def _missing_message(path: Path) -> str:
    return (
        f"Inception weights {path} not found: run `python scripts/get_inception.py {path}` "
        f"(downloads {OFFICIAL_INCEPTION_URL}) or copy {OFFICIAL_INCEPTION_FILENAME} to {path}; "
        f"for a non-comparable smoke test, `python scripts/make_random_inception.py {path}`"
    )


def _refetch_advice(path: Path) -> str:
    seed = random_inception_seed(path)
    if seed is not None:
        return (f"remove it and rerun `dvc repro`, whose inception stage makes it again (or "
                f"`python scripts/make_random_inception.py {path} --seed {seed}`)")
    return (f"get the official file again with `python scripts/get_inception.py {path}` "
            f"(it replaces a damaged file), or copy {OFFICIAL_INCEPTION_FILENAME} to {path}")


def _mismatch_summary(model: nn.Module, state: dict[str, Any], exc: Exception) -> str:
    """One line out of load_state_dict's multi-line error: counts and first examples."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        k for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    parts = [
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                           ("keys with the wrong shape", wrong_shape))
        if keys
    ]
    if parts:
        return ", ".join(parts)
    return " ".join(str(exc).split())[:300]


def load_inception(
    path: str | Path, device: torch.device | str = "cpu", *, exact: bool = False
) -> tuple[FidInceptionV3, InceptionInfo]:
    """Load FID Inception weights from a local state-dict file; eval mode, on ``device``.

    ``exact`` keeps pytorch-fid's op sequence (features equal to its own); otherwise BatchNorm is
    folded into the convolutions (:func:`fold_batchnorm`), which changes them by float rounding only.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(_missing_message(path))
    try:
        state = load_weights_only(path)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a weights file"
        raise UserError(f"{path} is not a readable Inception weights file ({why_unreadable(exc)}): "
                        f"{_refetch_advice(path)}") from exc
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not an Inception state dict")
    model = FidInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"{path} is not a state dict for pytorch-fid's FID Inception: "
            f"{_mismatch_summary(model, state, exc)}"
        ) from exc
    sha256 = file_digest(path, "sha256")
    info = InceptionInfo(
        path=str(path), sha256=sha256, official=sha256.startswith(OFFICIAL_INCEPTION_SHA256_PREFIX),
        exact=exact,
    )
    model.requires_grad_(False).eval()
    return (model if exact else fold_batchnorm(model)).to(device), info


def random_inception_seed(path: str | Path) -> int | None:
    """The seed N when ``path`` is named ``inception-random-seedN.pth`` (a random-weight file that the
    inception stage makes itself), else None."""
    match = re.fullmatch(r"inception-random-seed(\d+)\.pth", Path(path).name)
    return int(match.group(1)) if match else None


def save_random_inception(path: str | Path, seed: int = 0) -> None:
    """Write a random-weight FID Inception file in the official file's state-dict format.

    For offline smoke tests only: FIDs computed with it are not comparable to anything else.
    """
    state = build_inception(seed=seed).state_dict()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: reproducible bytes
        torch.save(state, f)


def download_official_inception(path: str | Path) -> Path:
    """Download the official weights to ``path`` (kept if already there and verified)."""
    path = Path(path)
    if path.is_file():
        try:
            verify_checksum(path, sha256_prefix=OFFICIAL_INCEPTION_SHA256_PREFIX)
            return path
        except UserError:
            pass  # a wrong or truncated file: fetch it again, replacing it atomically
    try:
        return download(OFFICIAL_INCEPTION_URL, path,
                        sha256_prefix=OFFICIAL_INCEPTION_SHA256_PREFIX)
    except UserError as exc:
        raise UserError(
            f"{exc}; offline, copy {OFFICIAL_INCEPTION_FILENAME} (from {OFFICIAL_INCEPTION_URL}) "
            f"to {path}"
        ) from exc


def inception_features(
    images: np.ndarray,
    model: nn.Module,
    *,
    batch_size: int,
    device: torch.device | str,
    progress: bool = True,
) -> np.ndarray:
    """Pool3 features of uint8 NHWC images (N, H, W, 3) -> float64 (N, 2048).

    ``model`` must already be on ``device`` (as :func:`load_inception` returns it) and in eval
    mode: in train mode BatchNorm would use batch statistics and the features would be wrong.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        # Refuse floats: FID is defined on quantised images, and [0,1] vs [0,255] vs [-1,1]
        # mix-ups silently give plausible-looking but wrong numbers.
        raise TypeError(f"inception_features takes uint8 images (N, H, W, 3), got {got}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"inception_features takes images of shape (N, H, W, 3), got "
                        f"{images.shape}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if model.training:
        raise UserError("the Inception model is in train mode; call .eval() first")
    n = images.shape[0]
    out = np.empty((n, FEATURE_DIM), dtype=np.float64)
    with torch.inference_mode(), tqdm(total=n, unit="img", desc="inception",
                                      disable=not progress) as bar:
        for start in range(0, n, batch_size):
            # Copy (the array may be read-only or a strided view) and move as uint8, a quarter
            # of the bytes of float32; convert on the device.
            batch = torch.from_numpy(np.array(images[start:start + batch_size], copy=True))
            x = batch.to(device).permute(0, 3, 1, 2).float().div_(255.0)  # (B,H,W,3)->(B,3,H,W)
            feats = model(x)  # (B, 2048)
            out[start:start + feats.shape[0]] = feats.double().cpu().numpy()
            bar.update(feats.shape[0])
    return out


def unbiased_logits(features: np.ndarray, model: FidInceptionV3) -> np.ndarray:
    """The 1008-way logits of (N, 2048) pool3 features without the fc layer's bias, (N, 1008) float64:
    what the Inception Score is computed from (the original TF code and torch-fidelity's
    ``logits_unbiased``)."""
    weight = model.fc.weight.detach().double().cpu().numpy()  # (1008, 2048)
    return np.asarray(features, dtype=np.float64) @ weight.T


def features_sharded(images: np.ndarray, model: nn.Module, *, batch_size: int, device: torch.device | str,
                     progress: bool = True) -> np.ndarray | None:
    """Pool3 features (N, 2048) of ``images`` (uint8 NHWC, the same on every rank), Inception's batches
    split across the ranks; rank 0 gets them all, the others None. Each batch holds the images one
    process would put in it, so the features are the one-process ones."""
    rank, world = rank_and_world()
    feats = inception_features(shard(images, batch_size, rank, world), model, batch_size=batch_size,
                               device=device, progress=progress and rank == 0)
    return gather_to_main(feats, len(images), batch_size)
