"""Provenance keys: what makes cached sample batches and the training-time FID curve stale."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from factories import tiny_train

from ddpm_cifar.diffusion.generate import sample_cache_key
from ddpm_cifar.evaluation.scoring import training_fid_id
from ddpm_cifar.runtime.config import SampleConfig, SamplerConfig

SPEC = SamplerConfig("ddim", 50, "quadratic", 0.0)
SAMPLE = SampleConfig(n=10, sampler=SPEC, weights="final", compile=False, batch_size=5, seed=0, grid_images=4,
                      strip_seeds=(0,), strip_frames=5)


def _sample(**changes: object) -> SampleConfig:
    """SAMPLE with ``changes``: sampler settings (name, steps, ...) and sample keys alike."""
    fields = ("name", "steps", "spacing", "eta", "variance", "clip_x0")
    sampler = {k: v for k, v in changes.items() if k in fields}
    rest = {k: v for k, v in changes.items() if k not in sampler}
    return dataclasses.replace(SAMPLE, sampler=dataclasses.replace(SPEC, **sampler), **rest)


@pytest.mark.parametrize(("key", "value"), [("name", "ddpm"), ("steps", 20), ("eta", 0.5),
                                            ("spacing", "uniform"), ("seed", 1), ("clip_x0", False),
                                            ("compile", True), ("batch_size", 4)])
def test_every_sampling_setting_changes_the_cache_key(key: str, value: object) -> None:
    base = sample_cache_key("abc", SAMPLE, torch.device("cpu"))
    assert sample_cache_key("abc", _sample(**{key: value}), torch.device("cpu")) != base
    assert sample_cache_key("abd", SAMPLE, torch.device("cpu")) != base
    assert sample_cache_key("abc", SAMPLE, torch.device("cuda")) != base


def test_the_cache_key_ignores_what_does_not_change_the_images() -> None:
    def key(**changes: object) -> str:
        return sample_cache_key("abc", _sample(**changes), torch.device("cpu"))

    assert key(name="ddpm", eta=0.5) == key(name="ddpm")  # only DDIM reads eta
    assert key(variance="beta") == key()  # only DDPM reads the variance
    assert key(name="ddpm", variance="beta") != key(name="ddpm")
    assert key(n=99, grid_images=2, strip_frames=3) == key()  # more or fewer images: same batches


FID_SPEC = SamplerConfig("dpmpp_2m", 20, "quadratic")


@pytest.mark.parametrize(("key", "value"), [("name", "ddpm"), ("steps", 7), ("spacing", "trailing"),
                                            ("clip_x0", False), ("fid_samples", 9), ("fid_batch_size", 3)])
def test_training_fid_curve_restarts_when_its_sampler_changes(key: str, value: object) -> None:
    cfg = tiny_train(fid_sampler=FID_SPEC)
    base = training_fid_id("inc", "ref", cfg)
    if key.startswith("fid_"):
        changed = dataclasses.replace(cfg, **{key: value})
    else:
        changed = dataclasses.replace(cfg, fid_sampler=dataclasses.replace(FID_SPEC, **{key: value}))
    assert training_fid_id("inc", "ref", changed) != base
    ddpm = dataclasses.replace(cfg, fid_sampler=SamplerConfig("ddpm", 20, "quadratic"))
    beta = dataclasses.replace(cfg, fid_sampler=SamplerConfig("ddpm", 20, "quadratic", variance="beta"))
    assert training_fid_id("inc", "ref", beta) != training_fid_id("inc", "ref", ddpm)
    not_read = dataclasses.replace(cfg, fid_sampler=dataclasses.replace(FID_SPEC, variance="beta"))
    assert training_fid_id("inc", "ref", not_read) == base
    assert training_fid_id("inc", "ref", dataclasses.replace(cfg, lr=0.5)) == base  # not an FID setting
    assert training_fid_id("inc2", "ref", cfg) != base and training_fid_id("inc", "ref2", cfg) != base
