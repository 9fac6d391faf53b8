"""Data parallelism across a real torch.distributed process group: 2 CPU processes over gloo.

Training with world size 2 is compared with world size 1 at the same global batch, resume under
DDP with an uninterrupted DDP run, and sharded sampling and FID statistics with one process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from factories import one_thread, random_images, tiny_diffusion, tiny_model, tiny_train, train_outputs

from ddpm_cifar.diffusion.generate import generate_images, generate_images_sharded
from ddpm_cifar.diffusion.process import GaussianDiffusion
from ddpm_cifar.evaluation.fid import statistics_sharded
from ddpm_cifar.evaluation.inception import load_inception, save_random_inception
from ddpm_cifar.models.unet import LinearAttention, ResBlock, UNet
from ddpm_cifar.runtime.config import SamplerConfig
from ddpm_cifar.runtime.distributed import rank_and_world, shard, unshard
from ddpm_cifar.runtime.errors import UserError
from ddpm_cifar.runtime.loaders import live_metric_path, load_live_metric
from ddpm_cifar.training.ema import EMA
from ddpm_cifar.training.loop import TrainResult, train

SEEDS = list(range(100, 111))  # 11 images: the ranks get 6 and 5, so batches are padded too
SPEC = SamplerConfig("dpmpp_2m", 4)
OPTIONS = dict(batch_size=4, shape=(3, 8, 8), device="cpu", progress=False)
IMAGES = random_images(n=12, size=8, seed=3)
CPU = torch.device("cpu")
LR, STEPS = 1e-3, 4  # tiny_train's learning rate; steps of the compared runs
# World size 2 vs 1 after 4 steps. The same images, timesteps and noise reach the network; what
# differs is where the batch gets summed: inside one backward pass over 4 images, or as two 2-image
# gradients averaged by the all-reduce. That moves float32 rounding (~1e-7 relative). Adam divides
# each update by the gradient's magnitude, so an entry whose gradient is nearly zero can move by
# up to lr in either direction: the weights differ by much more than the outputs.
# - Network outputs on a fixed batch (scale ~0.25): within 1e-4 (measured 1.4e-5, EMA 1.8e-5).
OUTPUT_ATOL = 1e-4
# - Weights: within 0.2 lr (measured up to 8e-5), except biases that a GroupNorm right after them
#   cancels (one channel per group in the tiny model): their gradient is rounding noise, which Adam
#   turns into +-lr steps in any run; they cannot change the output, and are bounded by 2 lr a step.
WEIGHT_ATOL = 0.2 * LR

def _model() -> UNet:
    torch.manual_seed(0)
    return UNet(tiny_model()).eval()


def test_shard_and_unshard_round_trip() -> None:
    items = np.arange(11)
    parts = [shard(items, 2, r, 3) for r in range(3)]  # batches [0 1] [2 3] [4 5] [6 7] [8 9] [10]
    assert [p.tolist() for p in parts] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]
    np.testing.assert_array_equal(unshard(parts, 11, 2), items)
    assert shard(list(range(5)), 2, 1, 2) == [2, 3]
    assert shard(list(range(3)), 4, 1, 2) == []  # more ranks than batches: nothing to do
    assert rank_and_world() == (0, 1)  # no process group in the test process


def _join(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _sample_worker(rank: int, world: int, init_file: str, out: str, inception: str) -> None:
    _join(rank, world, init_file)
    images = generate_images_sharded(_model(), GaussianDiffusion(tiny_diffusion()), SEEDS, SPEC, **OPTIONS)
    net, _ = load_inception(inception)
    stats = statistics_sharded(np.load(Path(out).parent / "all.npy"), net, batch_size=4, device="cpu",
                               progress=False)
    if rank == 0:
        np.savez(out, images=images, mu=stats.mu, sigma=stats.sigma)
    else:
        assert images is None and stats is None
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_sampling_and_fid_match_the_single_process_run(tmp_path: Path) -> None:
    inception = tmp_path / "inception.pth"
    save_random_inception(inception, seed=0)
    with one_thread():
        single = generate_images(_model(), GaussianDiffusion(tiny_diffusion()), SEEDS, SPEC, **OPTIONS)
    np.save(tmp_path / "all.npy", single)  # what the FID half embeds
    # Both runs in fresh processes: a process's earlier convolutions (other thread counts, other
    # shapes) can change oneDNN's choice of kernels, and with it the last bits of the features.
    for world in (1, 2):
        out = tmp_path / f"world{world}.npz"
        mp.spawn(_sample_worker, args=(world, str(tmp_path / f"init{world}"), str(out), str(inception)),
                 nprocs=world, join=True)
    one, two = np.load(tmp_path / "world1.npz"), np.load(tmp_path / "world2.npz")
    assert two["images"].shape == single.shape == (11, 8, 8, 3)
    np.testing.assert_array_equal(one["images"], single)
    np.testing.assert_array_equal(two["images"], single)  # bit for bit
    # Each Inception batch holds the same images as with one process: the same statistics.
    np.testing.assert_array_equal(two["mu"], one["mu"])
    np.testing.assert_array_equal(two["sigma"], one["sigma"])


def _train(root: Path, steps: int, **train_kw: object) -> TrainResult:
    return train(tiny_model(), tiny_diffusion(objective="pred_x0"), tiny_train(steps=steps, **train_kw),
                 images=IMAGES, data_id="random-12", outputs=train_outputs(root), device=CPU,
                 log=lambda _: None)


def _train_worker(rank: int, world: int, init_file: str, root: str) -> None:
    _join(rank, world, init_file)
    base = Path(root)
    # A: 4 steps in one go. Rank 1 is pointed at a folder of its own, which must stay unwritten.
    result = _train(base / ("ddp" if rank == 0 else "rank1-outputs"), steps=4)
    torch.save(result.ema.state_dict(), base / f"ema-rank{rank}.pt")  # each rank's own replica
    # B: 2 steps, then resumed to 4 (both ranks read the checkpoint rank 0 wrote).
    _train(base / "ddp-resumed", steps=2)
    _train(base / "ddp-resumed", steps=4)
    # C: a one-process checkpoint at step 2 (made before the spawn), continued by 2 processes.
    _train(base / "from-one-process", steps=4)
    # D: without gradient clipping, which would hide gradients of the wrong scale from the weights.
    _train(base / "ddp-unclipped", steps=1, max_grad_norm=None)
    dist.destroy_process_group()


def _weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = torch.load(root / "checkpoint.pt", weights_only=True)
    return {"model": ckpt["model"], "ema": ckpt["ema"]}


def _max_diff(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> float:
    return max((a[p][k] - b[p][k]).abs().max().item() for p in a for k in a[p])


def _losses(root: Path) -> np.ndarray:
    return np.array([value for _, value in load_live_metric(root / "dvclive", "loss")])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    with one_thread():
        _train(root / "single", steps=4)
        _train(root / "from-one-process", steps=2)
        _train(root / "single-unclipped", steps=1, max_grad_norm=None)
    mp.spawn(_train_worker, args=(2, str(root / "init"), str(root)), nprocs=2, join=True)
    return root


def _cancelled_biases() -> set[str]:
    """Names of biases a GroupNorm with one channel per group follows: the output ignores them."""
    net, names = UNet(tiny_model()), set()
    for name, m in net.named_modules():
        pairs = {ResBlock: (("conv1", "norm1"), ("conv2", "norm2")), LinearAttention: (("out", "out_norm"),)}
        for conv, norm in pairs.get(type(m), ()):
            gn = getattr(m, norm)
            if gn.num_groups == gn.num_channels:
                names.add(f"{name}.{conv}.bias")
    return names


def _outputs(state: dict[str, torch.Tensor]) -> torch.Tensor:
    net = UNet(tiny_model()).eval()
    net.load_state_dict(state)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 20, (8,), generator=g)
    with torch.no_grad():
        return net(x, t)  # (8, 3, 8, 8)


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(ddp_runs: Path) -> None:
    single, ddp = _weights(ddp_runs / "single"), _weights(ddp_runs / "ddp")
    for part in ("model", "ema"):
        diff = (_outputs(single[part]) - _outputs(ddp[part])).abs().max().item()
        assert diff < OUTPUT_ATOL, f"{part}: world size 2 vs 1, outputs differ by {diff:.2e}"
    cancelled = _cancelled_biases()
    assert "downs.0.blocks.0.conv1.bias" in cancelled  # the structure the exemption relies on
    for part in ("model", "ema"):
        for k, v in single[part].items():
            bound = 2 * LR * STEPS if k in cancelled else WEIGHT_ATOL
            diff = (v - ddp[part][k]).abs().max().item()
            assert diff <= bound, f"{part} {k}: world size 2 vs 1 differ by {diff:.2e} (bound {bound:.0e})"
    # Not equal because nothing moved: training changed the outputs by far more.
    torch.manual_seed(0)
    moved = (_outputs(single["model"]) - _outputs(UNet(tiny_model()).state_dict())).abs().max().item()
    assert moved > 100 * OUTPUT_ATOL
    np.testing.assert_allclose(_losses(ddp_runs / "ddp"), _losses(ddp_runs / "single"), rtol=1e-5)
    assert torch.load(ddp_runs / "ddp" / "checkpoint.pt", weights_only=True)["world_size"] == 2


def _adam_moments(root: Path) -> list[torch.Tensor]:
    state = torch.load(root / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


@pytest.mark.slow
def test_the_ranks_average_their_gradients(ddp_runs: Path) -> None:
    """Adam's weights barely notice a gradient scale; its first moment does. After one step without
    clipping it is (1 - beta1) x the gradient: summed instead of averaged gradients would double it.
    (After more steps the moments also reflect the weights, which Adam moves apart, see above.)"""
    ones, twos = _adam_moments(ddp_runs / "single-unclipped"), _adam_moments(ddp_runs / "ddp-unclipped")
    ratios = [float(b.norm() / a.norm()) for a, b in zip(ones, twos, strict=True) if a.norm() > 1e-6]
    assert len(ratios) > 10
    worst = max(abs(r - 1) for r in ratios)
    assert worst < 1e-4, f"gradient scale, world size 2 / 1: {min(ratios)} to {max(ratios)}"


@pytest.mark.slow
def test_checkpoints_record_how_many_processes_trained_them(ddp_runs: Path) -> None:
    def history(name: str) -> list[list[int]]:
        return torch.load(ddp_runs / name / "checkpoint.pt", weights_only=True)["world_history"]

    assert history("ddp") == [[0, 4, 2]]
    assert history("ddp-resumed") == [[0, 4, 2]]  # one stretch: the resume did not change the world size
    assert history("from-one-process") == [[0, 2, 1], [2, 4, 2]]


@pytest.mark.slow
def test_only_rank_0_writes(ddp_runs: Path) -> None:
    assert not (ddp_runs / "rank1-outputs").exists()
    written = {p.name for p in (ddp_runs / "ddp").iterdir()}
    assert written == {"checkpoint.pt", "ema.pt", "dvclive"}


@pytest.mark.slow
def test_resume_under_ddp_is_exact(ddp_runs: Path) -> None:
    straight, resumed = _weights(ddp_runs / "ddp"), _weights(ddp_runs / "ddp-resumed")
    assert _max_diff(straight, resumed) == 0.0
    for name in ("loss", "lr"):
        straight_log, resumed_log = (live_metric_path(ddp_runs / run / "dvclive", name)
                                     for run in ("ddp", "ddp-resumed"))
        assert straight_log.read_text() == resumed_log.read_text(), name


@pytest.mark.slow
def test_ema_is_identical_on_every_rank(ddp_runs: Path) -> None:
    a = torch.load(ddp_runs / "ema-rank0.pt", weights_only=True)
    b = torch.load(ddp_runs / "ema-rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_one_process_checkpoint_continues_on_two(ddp_runs: Path) -> None:
    single, continued = _weights(ddp_runs / "single"), _weights(ddp_runs / "from-one-process")
    for part in ("model", "ema"):
        diff = (_outputs(single[part]) - _outputs(continued[part])).abs().max().item()
        assert diff < OUTPUT_ATOL, f"{part}: outputs differ by {diff:.2e}"
    np.testing.assert_allclose(_losses(ddp_runs / "from-one-process"), _losses(ddp_runs / "single"),
                               rtol=1e-5)


def _indivisible_worker(rank: int, world: int, init_file: str, root: str) -> None:
    _join(rank, world, init_file)
    with pytest.raises(UserError, match="train.batch_size 3 does not divide among 2 processes"):
        train(tiny_model(), tiny_diffusion(), tiny_train(batch_size=3), images=IMAGES, data_id="x",
              outputs=train_outputs(Path(root)), device=CPU)
    dist.barrier()  # the error came before any collective: let both ranks finish connecting first
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_global_batch_that_does_not_divide_is_a_clear_error(tmp_path: Path) -> None:
    mp.spawn(_indivisible_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)


def _diverging_ema_worker(rank: int, world: int, init_file: str, root: str) -> None:
    _join(rank, world, init_file)
    if rank == 1:  # a replica that drifts: the check at each checkpoint must notice
        update = EMA.update

        def drifting(self: EMA, model: torch.nn.Module, step: int) -> None:
            update(self, model, step)
            with torch.no_grad():
                next(self.model.parameters()).add_(1e-6)

        EMA.update = drifting  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="step 3: EMA weights differ across ranks"):
        _train(Path(root), steps=4)  # tiny_train checkpoints every 3 steps
    dist.destroy_process_group()


@pytest.mark.slow
def test_ema_replicas_that_differ_stop_the_run(tmp_path: Path) -> None:
    mp.spawn(_diverging_ema_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
