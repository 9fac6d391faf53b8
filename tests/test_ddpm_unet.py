"""Tests for ddpm_cifar.models.ddpm_unet: equivalence with diffusers' UNet2DModel, loading, config checks.

diffusers is a test-only dependency: it builds the reference network and writes folders in the layout
of https://huggingface.co/google/ddpm-cifar10-32, with random weights (nothing is downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from diffusers import UNet2DModel
from factories import one_thread
from safetensors.torch import save_file

from ddpm_cifar.diffusion.process import linear_betas
from ddpm_cifar.models.ddpm_unet import (
    BIN_NAME,
    CONFIG_NAME,
    HUB_URL,
    PAPER_DROPOUT,
    SAFETENSORS_NAME,
    SCHEDULE,
    DdpmUNet,
    DdpmUNetConfig,
    diffusion_config,
    load_diffusers_folder,
)
from ddpm_cifar.models.unet import count_parameters
from ddpm_cifar.runtime.errors import UserError

diffusers.utils.logging.set_verbosity_error()  # it warns about attention_head_dim=None, as published

# google/ddpm-cifar10-32's config.json (diffusers 0.0.4), written from the paper's architecture and the
# published 256x256 DDPM configs' conventions: the file itself cannot be downloaded here. Attention
# sits at 16x16 in both paths; up blocks are listed deepest first (tests/test_networks.py checks where
# attention runs).
PUBLISHED_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# Measured: diffusers' UNet2DModel with PUBLISHED_CONFIG has 35,746,307 parameters, and so has ours.
PUBLISHED_PARAMETERS = 35_746_307

# Small configs that exercise the other code paths: multi-head attention, symmetric downsample
# padding, [cos, sin] order, a mid-block scale factor, centred input, explicit time width, mid-attention
# GroupNorm groups; and a three-level version of the published layout.
SMALL_VARIANT: dict[str, Any] = {
    "sample_size": 16, "block_out_channels": [32, 64],
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
    "layers_per_block": 1, "norm_num_groups": 8, "attn_norm_num_groups": 4, "attention_head_dim": 16,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 2**0.5,
    "center_input_sample": True, "time_embedding_dim": 96, "norm_eps": 1e-5,
}
SMALL_PUBLISHED_LAYOUT: dict[str, Any] = {
    **PUBLISHED_CONFIG, "sample_size": 16, "block_out_channels": [32, 64, 64], "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def _diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _reference(config: dict[str, Any], seed: int = 0) -> UNet2DModel:
    """diffusers' network with random weights, every parameter perturbed so that GroupNorm scales
    (initialised to 1) and biases (0) are not trivial: a swapped or ignored one changes the output."""
    torch.manual_seed(seed)
    model = UNet2DModel(**_diffusers_config(config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
    return model


def _inputs(config: dict[str, Any], batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(batch, config.get("in_channels", 3), size, size, generator=g)
    # The ends of the range, where the sinusoid's float32 rounding differs most, plus random steps.
    t = torch.cat((torch.tensor([0, 999]), torch.randint(1, 999, (batch - 2,), generator=g)))
    return x, t


def _max_diff(ours: DdpmUNet, ref: UNet2DModel, config: dict[str, Any]) -> float:
    x, t = _inputs(config)
    with torch.no_grad():
        expected = ref(x, t).sample
        got = ours(x, t)
    assert got.shape == expected.shape == x.shape
    return (got - expected).abs().max().item()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[UNet2DModel, Path]:
    """The full-size reference and a folder written by save_pretrained (safetensors, current key names)."""
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    with one_thread():
        ref = _reference(PUBLISHED_CONFIG)
        ref.save_pretrained(folder)
    assert (folder / SAFETENSORS_NAME).is_file() and not (folder / BIN_NAME).exists()
    return ref, folder


def _save_small(folder: Path, config: dict[str, Any], safe: bool, seed: int = 0) -> UNet2DModel:
    ref = _reference(config, seed)
    ref.save_pretrained(folder, safe_serialization=safe)
    return ref


def test_full_size_matches_diffusers(published: tuple[UNet2DModel, Path]) -> None:
    ref, folder = published
    ours = load_diffusers_folder(folder)
    assert not ours.training
    assert count_parameters(ours) == count_parameters(ref) == PUBLISHED_PARAMETERS  # 35.7M
    # Measured max |difference| here: 2.9e-6 (diffusers 0.42.1, torch 2.14.1 CPU), outputs of order 1.
    assert _max_diff(ours, ref, PUBLISHED_CONFIG) < 1e-5


@pytest.mark.parametrize("config", [SMALL_VARIANT, SMALL_PUBLISHED_LAYOUT],
                         ids=["variant", "published-layout"])
def test_small_configs_match_diffusers_from_bin(tmp_path: Path, config: dict[str, Any]) -> None:
    ref = _save_small(tmp_path, config, safe=False)
    assert (tmp_path / BIN_NAME).is_file() and not (tmp_path / SAFETENSORS_NAME).exists()
    ours = load_diffusers_folder(tmp_path)
    assert _max_diff(ours, ref, config) < 1e-5


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    ref = _save_small(tmp_path, SMALL_VARIANT, safe=True)
    # A .bin beside it with other weights: were it read, the outputs would differ.
    torch.save(_reference(SMALL_VARIANT, seed=5).state_dict(), tmp_path / BIN_NAME)
    assert _max_diff(load_diffusers_folder(tmp_path), ref, SMALL_VARIANT) < 1e-5


def test_old_attention_key_names_load(tmp_path: Path) -> None:
    ref = _save_small(tmp_path, SMALL_VARIANT, safe=True)
    (tmp_path / SAFETENSORS_NAME).unlink()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in ref.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    renamed = [k for k in state if k.rsplit(".", 2)[-2] in old_names.values()]
    # Every attention weight and bias (down, mid and up) now has an old name.
    assert len(renamed) == 8 * sum(k.endswith(".group_norm.weight") for k in state) > 0
    torch.save(state, tmp_path / BIN_NAME)
    assert _max_diff(load_diffusers_folder(tmp_path), ref, SMALL_VARIANT) < 1e-5


def test_channels_last_and_autocast(tmp_path: Path) -> None:
    _save_small(tmp_path, SMALL_PUBLISHED_LAYOUT, safe=True)
    ours = load_diffusers_folder(tmp_path)
    x, t = _inputs(SMALL_PUBLISHED_LAYOUT)
    with torch.no_grad():
        plain = ours(x, t)
        ours_cl = ours.to(memory_format=torch.channels_last)
        cl = ours_cl(x.contiguous(memory_format=torch.channels_last), t)
        with torch.autocast("cpu", torch.bfloat16):
            low = ours_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(cl, plain, atol=1e-5, rtol=1e-5)
    assert low.dtype == torch.bfloat16  # it really ran in bf16
    assert torch.isfinite(low).all()
    # bf16 keeps about 3 significant digits; errors accumulate over ~20 layers.
    assert (low.float() - plain).abs().max() < 0.1 * plain.abs().max()


def test_published_config_parses_to_defaults() -> None:
    cfg = DdpmUNetConfig.from_diffusers(PUBLISHED_CONFIG)
    assert cfg == DdpmUNetConfig()
    assert cfg.dropout == PAPER_DROPOUT == 0.1  # absent from the published config: the paper's value
    net = DdpmUNet(cfg)
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.1] * 22  # 22 resnets
    # Only the 16x16 level (down index 1; up blocks run deepest first, so up index 2) and the middle
    # block attend.
    assert [len(b.attentions) for b in net.down_blocks] == [0, 2, 0, 0]
    assert [len(b.attentions) for b in net.up_blocks] == [0, 0, 3, 0]


def test_diffusion_config_is_the_papers_schedule() -> None:
    cfg = diffusion_config()
    assert (cfg.timesteps, cfg.beta_schedule, cfg.objective) == (1000, "linear", "pred_noise")
    betas = linear_betas(cfg.timesteps)
    assert betas[0].item() == pytest.approx(SCHEDULE["beta_start"], rel=1e-12)
    assert betas[-1].item() == pytest.approx(SCHEDULE["beta_end"], rel=1e-12)


def test_forward_rejects_sizes_the_unet_cannot_halve() -> None:
    net = DdpmUNet(DdpmUNetConfig.from_diffusers(SMALL_PUBLISHED_LAYOUT))  # 3 levels: multiples of 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 10, 12), torch.tensor([3]))


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
         "CrossAttnDownBlock2D"),
        ("up_block_types", ["UpBlock2D", "AttnSkipUpBlock2D", "UpBlock2D", "UpBlock2D"], "AttnSkipUpBlock2D"),
        ("time_embedding_type", "fourier", "fourier"),
        ("act_fn", "gelu", "gelu"),
        ("_class_name", "UNet2DConditionModel", "UNet2DConditionModel"),
        ("resnet_time_scale_shift", "scale_shift", "scale_shift"),
        ("add_attention", False, "False"),
        ("class_embed_type", "timestep", "timestep"),
        ("upsample_type", "resnet", "resnet"),
        ("a_future_option", 1, "a_future_option"),
        ("attention_head_dim", 48, "48"),
        ("norm_num_groups", 24, "24"),
        ("block_out_channels", [128, 256, 256], "block_out_channels"),
    ],
)
def test_unsupported_config_is_one_line_user_error(key: str, value: Any, named: str) -> None:
    with pytest.raises(UserError) as info:
        DdpmUNetConfig.from_diffusers({**PUBLISHED_CONFIG, key: value}, source="folder/config.json")
    message = str(info.value)
    assert named in message and key in message and "folder/config.json" in message
    assert "\n" not in message


def test_missing_folder_names_it_and_says_where_to_get_it(tmp_path: Path) -> None:
    folder = tmp_path / "ddpm-cifar10-32"
    with pytest.raises(UserError) as info:
        load_diffusers_folder(folder)
    message = str(info.value)
    assert str(folder) in message and HUB_URL in message and "hf download" in message
    assert "\n" not in message


def test_missing_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"no {CONFIG_NAME}"):
        load_diffusers_folder(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(PUBLISHED_CONFIG))
    with pytest.raises(UserError, match=f"no weights file.*{SAFETENSORS_NAME}"):
        load_diffusers_folder(tmp_path)


def test_damaged_config_json(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text("{not json")
    save_file({}, str(tmp_path / SAFETENSORS_NAME))
    with pytest.raises(UserError, match="not readable JSON"):
        load_diffusers_folder(tmp_path)


def _state_with(tmp_path: Path, edit: str) -> None:
    ref = _save_small(tmp_path, SMALL_VARIANT, safe=True)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    if edit == "drop":
        del state["mid_block.attentions.0.to_k.weight"]
    elif edit == "extra":
        state["mid_block.attentions.0.to_k.scale"] = torch.ones(1)
    else:
        state["conv_in.weight"] = state["conv_in.weight"][:16]
    save_file(state, str(tmp_path / SAFETENSORS_NAME))


@pytest.mark.parametrize(
    ("edit", "named"),
    [("drop", "1 missing: mid_block.attentions.0.to_k.weight"),
     ("extra", "1 unexpected: mid_block.attentions.0.to_k.scale"),
     ("shape", "1 mis-shaped: conv_in.weight (16, 3, 3, 3) (needs (32, 3, 3, 3))")],
)
def test_weights_that_do_not_fit_are_one_user_error(tmp_path: Path, edit: str, named: str) -> None:
    _state_with(tmp_path, edit)
    with pytest.raises(UserError) as info:
        load_diffusers_folder(tmp_path)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_unreadable_weights_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(json.dumps(SMALL_PUBLISHED_LAYOUT))
    (tmp_path / BIN_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable weights file"):
        load_diffusers_folder(tmp_path)
