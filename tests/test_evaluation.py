"""Provenance keys: what makes cached sample batches and the training-time FID curve stale."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from factories import tiny_train

from ddpm_cifar.diffusion.generate import sample_cache_key
from ddpm_cifar.diffusion.samplers import SAMPLING_VERSION
from ddpm_cifar.evaluation.scoring import training_fid_id
from ddpm_cifar.runtime.config import SampleConfig

SAMPLE = SampleConfig(n=10, sampler="ddim", steps=50, eta=0.0, spacing="quadratic", compile=False,
                      batch_size=5, seed=0, clip_x0=True, grid_images=4, strip_seeds=(0,), strip_frames=5)


@pytest.mark.parametrize(("key", "value"), [("sampler", "ddpm"), ("steps", 20), ("eta", 0.5),
                                            ("spacing", "uniform"), ("seed", 1), ("clip_x0", False),
                                            ("compile", True), ("batch_size", 4)])
def test_every_sampling_setting_changes_the_cache_key(key: str, value: object) -> None:
    base = sample_cache_key("abc", SAMPLE, torch.device("cpu"))
    assert sample_cache_key("abc", dataclasses.replace(SAMPLE, **{key: value}), torch.device("cpu")) != base
    assert sample_cache_key("abd", SAMPLE, torch.device("cpu")) != base
    assert sample_cache_key("abc", SAMPLE, torch.device("cuda")) != base


def test_the_cache_key_ignores_what_does_not_change_the_images() -> None:
    def key(**changes: object) -> str:
        return sample_cache_key("abc", dataclasses.replace(SAMPLE, **changes), torch.device("cpu"))

    assert key(sampler="ddpm", eta=0.5) == key(sampler="ddpm")  # only DDIM reads eta
    assert key(variance="beta") == key()  # only DDPM reads the variance
    assert key(sampler="ddpm", variance="beta") != key(sampler="ddpm")
    assert key(n=99, grid_images=2, strip_frames=3) == key()  # more or fewer images: same batches


@pytest.mark.parametrize(("key", "value"), [("fid_sampler", "ddpm"), ("fid_sample_steps", 7),
                                            ("fid_spacing", "trailing"), ("fid_samples", 9),
                                            ("fid_batch_size", 3)])
def test_training_fid_curve_restarts_when_its_sampler_changes(key: str, value: object) -> None:
    cfg = tiny_train(fid_sampler="dpmpp_2m", fid_spacing="quadratic")
    base = training_fid_id("inc", "ref", cfg)
    assert training_fid_id("inc", "ref", dataclasses.replace(cfg, **{key: value})) != base
    ddpm = dataclasses.replace(cfg, fid_sampler="ddpm")
    assert training_fid_id("inc", "ref", dataclasses.replace(ddpm, fid_variance="beta")) != training_fid_id(
        "inc", "ref", ddpm)
    assert training_fid_id("inc", "ref", dataclasses.replace(cfg, fid_variance="beta")) == base  # not read
    assert training_fid_id("inc", "ref", dataclasses.replace(cfg, lr=0.5)) == base  # not an FID setting
    assert training_fid_id("inc2", "ref", cfg) != base and training_fid_id("inc", "ref2", cfg) != base


def test_training_fid_id_of_existing_checkpoints_still_matches() -> None:
    """Checkpoints store the id; a resumed run keeps its FID curve only if the id is unchanged, so
    the id's text must stay what it was before the sampler settings became a SamplerSpec."""
    cfg = tiny_train(fid_sampler="dpmpp_2m", fid_sample_steps=20, fid_spacing="quadratic", fid_samples=8,
                     fid_batch_size=4)
    assert training_fid_id("inc", "ref", cfg) == f"inc:ref:{SAMPLING_VERSION}:8:dpmpp_2m:20:quadratic:4"
