"""Inception feature throughput (images/s) of CPU levers, each against pytorch-fid's own InceptionV3 run in
the same process, with the largest feature difference each lever makes.

The FID pass is the quick run's second-largest cost (issue 24). Every variant runs the same random
weights (seeded; the official file is not needed for speed) on the same uint8 batches, resized to
299 x 299 inside the network as pytorch-fid does. pytorch-fid gets an NCHW batch, as its data loader
makes; our variants get what ``inception_features`` makes, a permuted NHWC batch (channels_last
strides). Timed blocks alternate between variants, the first variant rotating each repeat, so load
from other jobs lands on all of them. Printed per variant: images/s (median over repeats), the ratio
to pytorch-fid, and max |f - f_ref| / max |f_ref| over the features, f_ref being pytorch-fid's fp32
features of the same images.

    python benchmarks/inception_speed.py                          # batch 100, 3 repeats
    python benchmarks/inception_speed.py --batch 25 --retain-freed-memory   # as the stages run it
    python benchmarks/inception_speed.py --batch 200 --repeats 5 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ddpm_cifar.evaluation.inception import FidInceptionV3, fold_batchnorm
from ddpm_cifar.runtime.memory import retain_freed_memory

Variant = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, 32, 32) float in [0, 1] -> (B, 2048)


def random_inception(seed: int) -> FidInceptionV3:
    """The FID network with seeded random weights, BatchNorm statistics included, in eval mode."""
    torch.manual_seed(seed)
    model = FidInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, std=(2.0 / module.weight[0].numel()) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def pytorch_fid_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (pool3, resize and normalise in the network) with ``state`` as weights
    (its download is replaced by them: the same keys, as FidInceptionV3 keeps the official layout)."""
    import pytorch_fid.inception as pf

    original = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        pf.load_state_dict_from_url = original
    return model.eval()


def variants(model: FidInceptionV3, compile_too: bool) -> dict[str, Variant]:
    """What to time: pytorch-fid, and our network on the pipeline's input layout, one lever at a time."""
    reference = pytorch_fid_model(model.state_dict())
    last = channels_last_copy(model)
    folded = fold_batchnorm(model)
    out: dict[str, Variant] = {
        "pytorch-fid": lambda x: reference(x.contiguous())[0].flatten(1),
        "exact (NCHW)": model,  # fid.exact_inception: true
        "channels_last": last,  # the pipeline before folding: NHWC input kept its strides
        "folded + channels_last": folded,  # fid.exact_inception: false, the default
    }
    if compile_too:
        compiled = torch.compile(fold_batchnorm(model))
        out["folded + compile"] = compiled
    return out


def channels_last_copy(model: FidInceptionV3) -> FidInceptionV3:
    """BatchNorm unfolded in channels_last: what the network ran before it chose its own layout."""
    copy = FidInceptionV3()
    copy.load_state_dict(model.state_dict())
    copy.channels_last = True  # its BatchNorm layers stay
    return copy.eval().to(memory_format=torch.channels_last)  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=100, help="images per forward (quick run: fid.batch_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    ap.add_argument("--retain-freed-memory", action="store_true",
                    help="keep freed pages in the process, as every stage does (runtime/memory.py)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.retain_freed_memory:
        retain_freed_memory()
    rng = np.random.default_rng(args.seed)
    nhwc = torch.from_numpy(rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8))
    images = nhwc.permute(0, 3, 1, 2).float() / 255  # (B,H,W,3)->(B,3,H,W), as inception_features does
    todo = variants(random_inception(args.seed), args.compile)
    names = list(todo)
    features, times = {}, {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up (and compilation), and the features compared
            features[name] = todo[name](images).double()
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                start = time.perf_counter()
                todo[name](images)
                times[name].append(time.perf_counter() - start)
    ref = features["pytorch-fid"]
    base = args.batch / statistics.median(times["pytorch-fid"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.repeats} repeats, freed pages {'retained' if args.retain_freed_memory else 'returned'}")
    print(f"{'variant':<26}{'images/s':>10}{'vs pytorch-fid':>16}{'max rel. diff':>15}")
    for name in names:
        rate = args.batch / statistics.median(times[name])
        diff = ((features[name] - ref).abs().max() / ref.abs().max()).item()
        print(f"{name:<26}{rate:>10.2f}{rate / base:>15.3f}x{diff:>15.2e}")


if __name__ == "__main__":
    main()
