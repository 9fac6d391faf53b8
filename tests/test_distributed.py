"""Sharding across a real torch.distributed process group: 2 CPU processes talking over gloo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from factories import one_thread, tiny_diffusion, tiny_model

from ddpm_cifar.diffusion import GaussianDiffusion
from ddpm_cifar.distributed import (
    generate_images_sharded,
    rank_and_world,
    shard,
    statistics_sharded,
    unshard,
)
from ddpm_cifar.fid import compute_statistics, load_inception, save_random_inception
from ddpm_cifar.sampling import generate_images
from ddpm_cifar.unet import UNet

SEEDS = list(range(100, 111))  # 11 images: the ranks get 6 and 5, so batches are padded too
OPTIONS = dict(sampler="dpmpp_2m", steps=4, batch_size=4, shape=(3, 8, 8), device="cpu", progress=False)


def _model() -> UNet:
    torch.manual_seed(0)
    return UNet(tiny_model()).eval()


def test_shard_and_unshard_round_trip() -> None:
    items = np.arange(11)
    parts = [np.asarray(shard(items, r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    np.testing.assert_array_equal(unshard(parts, 11), items)
    assert rank_and_world() == (0, 1)  # no process group in the test process


def _worker(rank: int, world: int, init_file: str, out: str, inception: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images = generate_images_sharded(_model(), GaussianDiffusion(tiny_diffusion()), SEEDS, **OPTIONS)
        net, _ = load_inception(inception)
        stats = statistics_sharded(images, net, n=len(SEEDS), batch_size=4, device="cpu")
        if rank == 0:
            np.savez(out, images=images, mu=stats.mu, sigma=stats.sigma)
        else:
            assert images is None and stats is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_sampling_and_fid_match_the_single_process_run(tmp_path: Path) -> None:
    out = tmp_path / "sharded.npz"
    inception = tmp_path / "inception.pth"
    save_random_inception(inception, seed=0)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), str(inception)), nprocs=2, join=True)
    with one_thread():
        single = generate_images(_model(), GaussianDiffusion(tiny_diffusion()), SEEDS, **OPTIONS)
        net, _ = load_inception(inception)
        stats = compute_statistics(single, net, batch_size=4, device="cpu", progress=False)
    sharded = np.load(out)
    assert sharded["images"].shape == single.shape == (11, 8, 8, 3)
    np.testing.assert_array_equal(sharded["images"], single)  # bit for bit
    # Features of other batch compositions may differ in the last float32 bits.
    np.testing.assert_allclose(sharded["mu"], stats.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded["sigma"], stats.sigma, rtol=1e-4, atol=1e-7)
