"""Tests for ddpm_cifar.models.unet: shapes, size of the paper model, time conditioning, config checks."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_model

from ddpm_cifar.models.unet import UNet, count_parameters
from ddpm_cifar.runtime.config import ModelConfig
from ddpm_cifar.runtime.errors import ConfigError

PAPER = dict(image_size=32, channels=3, dim=64, dim_mults=(1, 2, 4, 8), num_res_blocks=2,
             full_attn=(False, False, False, True), attn_heads=4, attn_dim_head=32, dropout=0.0, arch="unet")
REFERENCE_PARAMETERS = 35_711_491  # lucidrains' Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def _model(cfg: ModelConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(cfg).eval()


@pytest.mark.parametrize(
    ("kw", "batch"),
    [
        ({}, 1),
        ({}, 3),
        ({"num_res_blocks": 2}, 3),
        ({"num_res_blocks": 2, "full_attn": (True, True)}, 1),
        ({"full_attn": (False, False)}, 3),
        ({"image_size": 16, "dim_mults": (1, 2, 2), "full_attn": (False, True, True)}, 3),
        ({"image_size": 16, "dim_mults": (1, 1, 2), "full_attn": (True, False, False),
          "num_res_blocks": 2}, 1),
        ({"channels": 1, "dim": 8, "dim_mults": (1,), "full_attn": (True,)}, 3),
    ],
)
def test_output_shape_equals_input_shape(kw: dict, batch: int) -> None:
    cfg = tiny_model(**kw)
    model = _model(cfg)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 20, (batch,))
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_paper_config_has_the_reference_parameter_count() -> None:
    model = UNet(ModelConfig(**PAPER))  # type: ignore[arg-type]
    n = count_parameters(model)
    assert abs(n - REFERENCE_PARAMETERS) <= 0.10 * REFERENCE_PARAMETERS, n
    # count_parameters counts every trainable weight exactly once.
    assert n == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_tiny_model_is_tiny() -> None:
    # The factories promise "a few hundred thousand weights": the test models stay fast.
    assert 50_000 < count_parameters(_model(tiny_model())) < 1_000_000


def test_output_depends_on_t() -> None:
    model = _model(tiny_model())
    x = torch.randn(1, 3, 8, 8).expand(4, -1, -1, -1).contiguous()
    t = torch.tensor([0, 1, 10, 19])
    with torch.no_grad():
        out = model(x, t)
        again = model(x, t)
    assert torch.equal(out, again)  # deterministic in eval mode
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 1e-4, (t[i], t[j])


def test_each_image_is_processed_independently_of_its_batch() -> None:
    # GroupNorm and attention act per image: image i's output does not see the others.
    model = _model(tiny_model(num_res_blocks=2))
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([3, 7, 15])
    with torch.no_grad():
        batched = model(x, t)
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_output_depends_on_input() -> None:
    model = _model(tiny_model())
    t = torch.tensor([5])
    with torch.no_grad():
        a = model(torch.zeros(1, 3, 8, 8), t)
        b = model(torch.ones(1, 3, 8, 8), t)
    assert (a - b).abs().max() > 1e-4


def test_full_attn_length_must_match_levels() -> None:
    with pytest.raises(ConfigError, match="full_attn"):
        tiny_model(full_attn=(False, True, True))
    with pytest.raises(ConfigError, match="full_attn"):
        ModelConfig(**{**PAPER, "full_attn": (False, True)})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("image_size", "dim_mults", "ok"),
    [
        (8, (1, 2), True),  # factor 2
        (6, (1, 2), True),
        (7, (1, 2), False),
        (8, (1, 2, 2, 2), True),  # factor 8
        (12, (1, 2, 2, 2), False),
        (20, (1, 2, 2), True),  # factor 4
        (18, (1, 2, 2), False),
        (7, (1,), True),  # one level: no downsampling at all
    ],
)
def test_image_size_must_be_divisible_by_the_downsampling_factor(
    image_size: int, dim_mults: tuple[int, ...], ok: bool
) -> None:
    kw = dict(image_size=image_size, dim_mults=dim_mults, full_attn=(False,) * len(dim_mults))
    if ok:
        assert tiny_model(**kw).image_size == image_size
    else:
        with pytest.raises(ConfigError, match=f"image_size {image_size}"):
            tiny_model(**kw)
