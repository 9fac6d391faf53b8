"""model.arch: the study's U-Net or Ho et al.'s DDPM network, built from params, trained, checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import one_thread, random_images, tiny_diffusion, tiny_model, tiny_train, train_outputs

from ddpm_cifar.models import checkpoint
from ddpm_cifar.models.ddpm_unet import DdpmUNet, DdpmUNetConfig, SelfAttention
from ddpm_cifar.models.networks import build_model, ddpm_unet_config, model_config_of
from ddpm_cifar.models.unet import UNet, count_parameters
from ddpm_cifar.runtime.config import ModelConfig
from ddpm_cifar.runtime.errors import ConfigError, UserError
from ddpm_cifar.training.loop import train

# Ho et al.'s CIFAR-10 network as params.yaml writes it.
PAPER_DDPM = ModelConfig(image_size=32, channels=3, dim=128, dim_mults=(1, 2, 2, 2), num_res_blocks=2,
                         full_attn=(False, True, False, False), attn_heads=1, attn_dim_head=0, dropout=0.1,
                         arch="ddpm")


def test_params_build_the_published_network() -> None:
    assert ddpm_unet_config(PAPER_DDPM) == DdpmUNetConfig()  # google/ddpm-cifar10-32's settings
    net = build_model(PAPER_DDPM)
    assert isinstance(net, DdpmUNet) and count_parameters(net) == 35_746_307
    assert isinstance(build_model(tiny_model()), UNet)
    assert model_config_of(DdpmUNetConfig(), "config.json") == PAPER_DDPM  # and back


def test_attention_runs_at_16x16_on_the_way_down_and_up() -> None:
    net = build_model(PAPER_DDPM).eval()
    sizes: list[tuple[str, int]] = []
    for name, m in net.named_modules():
        if isinstance(m, SelfAttention):
            part = name.split(".")[0]  # down_blocks, mid_block or up_blocks
            m.register_forward_hook(lambda mod, inp, out, part=part: sizes.append((part, inp[0].shape[-1])))
    with one_thread(), torch.no_grad():
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    assert sorted(set(sizes)) == [("down_blocks", 16), ("mid_block", 4), ("up_blocks", 16)]
    assert [s for s in sizes if s[0] != "mid_block"] == [("down_blocks", 16)] * 2 + [("up_blocks", 16)] * 3


def test_ddpm_arch_checks_its_params() -> None:
    with pytest.raises(ConfigError, match="model.attn_heads must be 1 for model.arch ddpm"):
        ModelConfig(**{**PAPER_DDPM.__dict__, "attn_heads": 4})
    with pytest.raises(ConfigError, match="multiples of 32"):
        ModelConfig(**{**PAPER_DDPM.__dict__, "dim": 48})
    with pytest.raises(ConfigError, match="model.arch must be one of unet, ddpm"):
        ModelConfig(**{**PAPER_DDPM.__dict__, "arch": "dit"})
    with pytest.raises(UserError, match="freq_shift=0"):
        model_config_of(DdpmUNetConfig(freq_shift=0), "config.json")  # not what model.arch ddpm builds


TINY_DDPM = dict(arch="ddpm", dim=32, dim_mults=(1, 2), attn_heads=1, full_attn=(False, True))


def test_ddpm_arch_trains_checkpoints_and_reloads(tmp_path: Path) -> None:
    outputs = train_outputs(tmp_path)
    with one_thread():
        result = train(tiny_model(**TINY_DDPM), tiny_diffusion(), tiny_train(steps=2),
                       images=random_images(8), data_id="random", outputs=outputs, device=torch.device("cpu"),
                       log=lambda _: None)
    assert result.step == 2
    loaded = checkpoint.load_model(outputs.ema)
    assert isinstance(loaded.net, DdpmUNet) and loaded.config == tiny_model(**TINY_DDPM)
    assert checkpoint.load(outputs.ema)["model_config"]["arch"] == "ddpm"


def test_a_checkpoint_names_its_network(tmp_path: Path) -> None:
    path = tmp_path / "ema.pt"
    payload = checkpoint.model_payload(tiny_model(), tiny_diffusion())
    checkpoint.save(path, {**payload, "step": 1, "ema": UNet(tiny_model()).state_dict()})
    assert isinstance(checkpoint.load_model(path).net, UNet)
    del payload["model_config"]["arch"]
    checkpoint.save(path, {**payload, "step": 1, "ema": UNet(tiny_model()).state_dict()})
    with pytest.raises(UserError, match="missing key model.arch"):
        checkpoint.load_model(path)


def test_ddpm_arch_starts_from_ho_et_al_initialisation() -> None:
    """diffusion_tf/nn.py: Glorot-uniform weights (variance_scaling fan_avg, scale 1) and zero
    biases; scale 1e-10 for each residual branch's last layer and the output conv."""
    from ddpm_cifar.models.ddpm_unet import ResnetBlock

    torch.manual_seed(0)
    net = build_model(PAPER_DDPM)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert all(m.bias is None or not m.bias.any() for m in convs)
    block = next(m for m in net.modules() if isinstance(m, ResnetBlock))
    w = block.conv1.weight  # (128, 128, 3, 3): fan_in = fan_out = 1152, Glorot std sqrt(2 / 2304)
    assert w.std().item() == pytest.approx((2 / 2304) ** 0.5, rel=0.01)
    assert w.abs().max().item() <= (6 / 2304) ** 0.5
    for tiny in (block.conv2.weight, net.conv_out.weight, next(
            m for m in net.modules() if isinstance(m, SelfAttention)).to_out[0].weight):
        fan_sum = tiny[0].numel() + tiny.shape[0] * tiny[0, 0].numel()  # fan_in + fan_out
        assert 0 < tiny.abs().max().item() <= 1e-5 * (6 / fan_sum) ** 0.5
    # So the fresh network predicts (nearly) zero noise everywhere: a block is the identity at first.
    with one_thread(), torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]))
    assert out.abs().max().item() < 1e-3
    # The study's U-Net keeps its reference implementation's (PyTorch's) initialisation.
    torch.manual_seed(0)
    unet = build_model(tiny_model())
    assert any(m.bias is not None and m.bias.any() for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
